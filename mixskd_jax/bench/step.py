"""One train step, compiled and timed as the trainer runs it, on a synthetic batch.

* compile time: tracing + lowering, and XLA compilation, of the step jitted with the trainer's
  shardings and donation and with `models.compiler_options(config.model)`;
* step time: median, min and max over `steps` steps after `warmup` steps, each step waited for
  with `block_until_ready`, on a synthetic uint8 batch already on the devices (no dataset
  needed); clean images/s = batch_size / median;
* FLOPs per step from XLA's cost analysis of the compiled step, achieved FLOP/s, and the
  fraction of a given peak;
* peak device memory from the compiled step's memory analysis, and what the step sends between
  devices (`bench.collectives`).

FLOPs and memory are per device (XLA analyses the partitioned per-device program); step time
and images/s are global. `mixskd_jax.benchmark` re-exports these.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mixskd_jax.bench import collectives
from mixskd_jax.data import datasets
from mixskd_jax.method.methods import check_config, method_name
from mixskd_jax.train import builder, layout, sharding

# The schedule only sets the learning rate's value, never the step's cost: any length will do.
_NOMINAL_STEPS_PER_EPOCH = 1000


def flops_of(cost: Any) -> float | None:
  """'flops' from a cost analysis: a dict, or a list of dicts in some JAX versions."""
  entries = cost if isinstance(cost, (list, tuple)) else [cost]
  values = [e.get("flops") for e in entries if isinstance(e, dict) and e.get("flops") is not None]
  return float(sum(values)) if values else None


def memory_of(compiled) -> dict[str, Any]:
  """Peak bytes per device from the compiled step's memory analysis.

  `peak_bytes` is the larger of XLA's `peak_memory_in_bytes` and arguments + outputs -
  aliased (donated) + temporaries. The second is what is live when every temporary buffer is:
  XLA:CPU's reported peak leaves the temporaries out (jax 0.10: 2 MB reported for a step with
  300 MB of temporaries), so it alone would understate the peak badly.
  """
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError as e:
    return {"unavailable": str(e)}
  if stats is None:
    return {"unavailable": "memory_analysis() returned None on this backend"}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
  out = {f: int(getattr(stats, f, 0) or 0) for f in fields}
  bound = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
           - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  out["peak_bytes"] = max(out["peak_memory_in_bytes"], bound)
  return out


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{field: (shape, dtype)} of a global train batch as the input pipeline yields it: uint8
  images, int32 labels, and the extra fields the method needs (`data.example_ids`,
  `data.class_pairs`)."""
  spec = datasets.get_spec(config.data.name)
  b = config.batch_size
  shapes = {"image": ((b,) + tuple(spec.image_shape), np.uint8), "label": ((b,), np.int32)}
  if config.data.get("example_ids", False):
    shapes["example_id"] = ((b,), np.int32)
  if config.data.get("class_pairs", False):
    shapes["pair_image"] = shapes["image"]
    shapes["pair_label"] = shapes["label"]
  return shapes


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch of `batch_shapes(config)`: random images and labels; example ids 0..B-1
  (rows of a one-batch PS-KD table); same-class pairs carry the batch's own labels."""
  spec = datasets.get_spec(config.data.name)
  rng = np.random.default_rng(seed)
  batch = {}
  for name, (shape, dtype) in batch_shapes(config).items():
    if name.endswith("image"):
      batch[name] = rng.integers(0, 256, shape, dtype=dtype)
    elif name == "example_id":
      batch[name] = np.arange(shape[0], dtype=dtype)
    elif name == "pair_label":
      batch[name] = batch["label"]
    else:
      batch[name] = rng.integers(0, spec.num_classes, shape).astype(dtype)
  return batch


def _build(config: ml_collections.ConfigDict, mesh) -> tuple[ml_collections.ConfigDict, Any]:
  """`config` resolved for `mesh` and its run built as the trainer builds it (same model,
  method, optimizer, shardings, donation, compiler options), without touching the dataset."""
  check_config(config)
  config = layout.resolve(config, mesh.size)
  spec = datasets.get_spec(config.data.name)
  # PS-KD's prediction table gets one batch of rows: synthetic ids never exceed it.
  shape = builder.DataShape(num_classes=spec.num_classes, image_shape=spec.image_shape,
                            mean=spec.mean, std=spec.std, num_examples=config.batch_size)
  return config, builder.build_steps(config, mesh, shape,
                                     steps_per_epoch=_NOMINAL_STEPS_PER_EPOCH,
                                     num_epochs=max(config.num_epochs, 1))


class StepRunner:
  """Times a compiled train step again and again on one state (the state is donated, so each
  call keeps the newest): what alternating rounds against another implementation need."""

  def __init__(self, compiled, init_state, batch, key, mesh):
    self._compiled, self._init_state, self._mesh = compiled, init_state, mesh
    self._batch, self._key = batch, key
    self._state = None

  def hlo_text(self) -> str:
    """The compiled step's optimized HLO (which ops its fusions hold: `op_profile`)."""
    return self._compiled.as_text()

  def time(self, *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones."""
    repl, data = sharding.replicated(self._mesh), sharding.data_sharding(self._mesh)
    if self._state is None:
      # Parameters from an "rbg" key: the same initializers, values that do not change the
      # step's cost, and an init that compiles ~3x faster than with the default threefry key.
      self._state = self._init_state(jax.random.key(0, impl="rbg"))
      local = self._batch if jax.process_count() == 1 else _local_slice(self._batch)
      self._batch = sharding.to_global(local, data)
      self._key = jax.device_put(self._key, repl)
    times, self._state = _time_steps(self._compiled, self._state, self._batch, self._key,
                                     steps=steps, warmup=warmup)
    return times


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A train step compiled ahead of time for a mesh: the resolved config, the built run, the
  abstract (shape-only) state, the executable and its lowering and compile seconds."""
  config: ml_collections.ConfigDict
  built: Any
  mesh: Any
  abstract_state: Any
  compiled: Any
  lower_s: float
  compile_s: float


def lower_train_step(config: ml_collections.ConfigDict, mesh) -> tuple[Any, ...]:
  """(resolved config, built run, abstract state, lowered step, lowering seconds) of
  `config`'s train step built as the trainer builds it for `mesh` (any mesh: this host's
  devices, or a TPU slice described on it), lowered with abstract arguments."""
  config, built = _build(config, mesh)
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  key = jax.random.key(config.seed)
  abstract_state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      jax.eval_shape(built.init_state, key))
  abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
                    for k, (shape, dtype) in batch_shapes(config).items()}
  abstract_key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
  t0 = time.perf_counter()
  lowered = built.train_step.lower(abstract_state, abstract_batch, abstract_key)
  return config, built, abstract_state, lowered, time.perf_counter() - t0


def compile_train_step(config: ml_collections.ConfigDict, mesh) -> CompiledStep:
  """`lower_train_step`, compiled. Nothing is allocated."""
  config, built, abstract_state, lowered, lower_s = lower_train_step(config, mesh)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return CompiledStep(config=config, built=built, mesh=mesh, abstract_state=abstract_state,
                      compiled=compiled, lower_s=lower_s, compile_s=time.perf_counter() - t0)


def analysis(step: CompiledStep) -> dict[str, Any]:
  """What the benchmark reports of a compiled step: its config's method, model, dtype, batch,
  devices and groups; lowering and compile seconds; FLOPs, memory and collectives per device;
  the parameters' bytes."""
  config, compiled = step.config, step.compiled
  return {"method": method_name(config),
          "model": config.model.name, "dtype": config.model.dtype,
          "batch_size": config.batch_size, "devices": step.mesh.size,
          "mix_groups": config.objective.mix_groups,
          "batchnorm_groups": config.model.batchnorm_groups,
          "lower_s": step.lower_s, "compile_s": step.compile_s,
          "flops_per_step_per_device": flops_of(compiled.cost_analysis()),
          "memory": memory_of(compiled),
          "communication": collectives.communication(compiled),
          "parameter_bytes": sum(x.size * x.dtype.itemsize for x in
                                 jax.tree_util.tree_leaves(step.abstract_state.params))}


def compile_step(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], StepRunner]:
  """Compiles `config`'s train step as the trainer does, on this host's devices (AOT: nothing
  is allocated yet) and returns (its `analysis`, a StepRunner)."""
  step = compile_train_step(config, sharding.make_mesh())
  return analysis(step), StepRunner(step.compiled, step.built.init_state,
                                    synthetic_batch(step.config),
                                    jax.random.key(step.config.seed), step.mesh)


def measure_step(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
                 peak_flops_per_s: float | None = None) -> dict[str, Any]:
  """Compile and time `config`'s train step (see the module docstring).

  `steps=0` compiles and analyses only (AOT: no state is allocated, nothing runs), which is
  how memory is read for batches this machine could not run.
  """
  out, runner = compile_step(config)
  if steps <= 0:
    return out
  times = runner.time(steps=steps, warmup=warmup)
  median = statistics.median(times)
  flops = out["flops_per_step_per_device"]
  out.update(step_s={"median": median, "min": min(times), "max": max(times), "all": times},
             clean_images_per_s=out["batch_size"] / median)
  if flops is not None:
    out["achieved_gflops_per_device"] = flops / median / 1e9
    if peak_flops_per_s:
      out["fraction_of_peak"] = flops / median / peak_flops_per_s
  return out


def _time_steps(compiled, state, batch, root_key, *, steps: int, warmup: int
                ) -> tuple[list[float], Any]:
  """(seconds of each of `steps` calls after `warmup` untimed ones, the last state); each call
  is waited for: the host neither dispatches ahead nor overlaps steps, so a step's time is
  its own."""
  for _ in range(warmup):
    state, _ = compiled(state, batch, root_key)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, root_key)  # the state is donated: keep the new one
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  return times, state


def _local_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch (multi-host)."""
  n, i = jax.process_count(), jax.process_index()
  return {k: np.split(v, n)[i] for k, v in batch.items()}
