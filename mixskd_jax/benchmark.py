r"""How fast a config's train step runs, against the machine's limit and a plain CE step.

  python -m mixskd_jax.benchmark --config=configs/cifar100_resnet18_mixskd.py \
      --json_out=/tmp/bench.json [--steps=10 --warmup=2 --skip_ce --skip_pipeline]

Any config field can be overridden as in training (`--config.model.dtype=bfloat16`).
From Python: `print(format_table(run_benchmark(config)))`. `--against=torch [--rounds=3]` times
the step side by side with the PyTorch implementation of the same network instead
(`benchmark_torch.py`).

What is measured, for the config's train step and for the plain cross-entropy step of the same
backbone and batch (`recipes.with_method(config, "cross_entropy")`):

* compile time: tracing + lowering, and XLA compilation, of the step jitted with the trainer's
  shardings and donation and with `models.compiler_options(config.model)`;
* step time: median, min and max over `steps` steps after `warmup` steps, each step waited for
  with `block_until_ready`, on a synthetic uint8 batch already on the devices (no dataset
  needed); clean images/s = batch_size / median;
* FLOPs per step from XLA's cost analysis of the compiled step, achieved FLOP/s, and the
  fraction of the peak: a float32 matmul probe measured in the same run, or the datasheet's
  dense bf16 peak on known accelerators (MFU), or `peak_gflops`;
* peak device memory from the compiled step's memory analysis;
* the host input pipeline alone (`data.train_iterator`), images/s next to what the step
  consumes, when the dataset is prepared on this machine ("unavailable: <reason>" otherwise;
  the benchmark never downloads or builds a dataset).

FLOPs and memory are per device (XLA analyses the partitioned per-device program); step time
and images/s are global.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mixskd_jax import collectives, recipes
from mixskd_jax.data import datasets
from mixskd_jax.benchmark_host import (  # noqa: F401  (part of this module's API)
    DATASHEET_BF16_TFLOPS, datasheet_peak_tflops, device_info as _device_info, matmul_probe,
    measure_pipeline)
from mixskd_jax.train import builder, layout, sharding
from mixskd_jax.train.methods import check_config

# The schedule only sets the learning rate's value, never the step's cost: any length will do.
_NOMINAL_STEPS_PER_EPOCH = 1000


def _flops(cost: Any) -> float | None:
  """'flops' from a cost analysis: a dict, or a list of dicts in some JAX versions."""
  entries = cost if isinstance(cost, (list, tuple)) else [cost]
  values = [e.get("flops") for e in entries if isinstance(e, dict) and e.get("flops") is not None]
  return float(sum(values)) if values else None


def _memory(compiled) -> dict[str, Any]:
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


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A global batch as the input pipeline yields it: uint8 images, int32 labels, and the extra
  fields the method needs (`data.example_ids`, `data.class_pairs`)."""
  spec = datasets.get_spec(config.data.name)
  rng = np.random.default_rng(seed)
  b = config.batch_size
  batch = {"image": rng.integers(0, 256, (b,) + spec.image_shape, dtype=np.uint8),
           "label": rng.integers(0, spec.num_classes, b).astype(np.int32)}
  if config.data.get("example_ids", False):
    batch["example_id"] = np.arange(b, dtype=np.int32)  # rows of a one-batch PS-KD table
  if config.data.get("class_pairs", False):
    batch["pair_image"] = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
    batch["pair_label"] = batch["label"]
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


def compile_step(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], StepRunner]:
  """Compiles `config`'s train step as the trainer does (AOT: nothing is allocated yet) and
  returns (its analysis: compile times, FLOPs, memory, communication; a StepRunner)."""
  mesh = sharding.make_mesh()
  config, built = _build(config, mesh)
  step, init_state = built.train_step, built.init_state
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  key = jax.random.key(config.seed)
  abstract_state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
      jax.eval_shape(init_state, key))
  batch = synthetic_batch(config)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
                    for k, v in batch.items()}
  abstract_key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
  t0 = time.perf_counter()
  lowered = step.lower(abstract_state, abstract_batch, abstract_key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  out = {"method": config.get("method") or ("mixskd" if config.model.mixskd else
                                            "cross_entropy"),
         "model": config.model.name, "dtype": config.model.dtype,
         "batch_size": config.batch_size, "devices": mesh.size,
         "mix_groups": config.objective.mix_groups,
         "batchnorm_groups": config.model.batchnorm_groups,
         "lower_s": t1 - t0, "compile_s": t2 - t1,
         "flops_per_step_per_device": _flops(compiled.cost_analysis()),
         "memory": _memory(compiled),
         "communication": collectives.communication(compiled),
         "parameter_bytes": sum(x.size * x.dtype.itemsize for x in
                                jax.tree_util.tree_leaves(abstract_state.params))}
  return out, StepRunner(compiled, init_state, batch, key, mesh)


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


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
                  skip_ce: bool = False, skip_pipeline: bool = False,
                  peak_gflops: float | None = None, probe_size: int | None = None,
                  pipeline_batches: int = 20, pipeline_mock_examples: int = 0,
                  json_out: str | None = None, label: str = "") -> dict[str, Any]:
  """Measures `config` (see the module docstring); returns the results and writes them as JSON
  to `json_out` if given. `format_table(result)` prints them.

  Args:
    steps, warmup: timed steps after untimed ones; steps=0 compiles and analyses only.
    skip_ce: leave out the plain cross-entropy step (set when the config is that step).
    skip_pipeline: leave out the input pipeline.
    peak_gflops: the peak to compare with, per device; None: the datasheet's on known
      accelerators, else the float32 matmul probe.
    probe_size: matmul probe size; None: 2048 on CPU, 8192 elsewhere.
    pipeline_batches: batches the pipeline is timed over.
    pipeline_mock_examples: > 0 times the pipeline on that many tfds mock images
      (`measure_pipeline`), for datasets this machine does not have.
    label: a name for the table's title, e.g. the config's path.
  """
  # Resolved once for these devices (idempotent: measure_step resolves again), so the pipeline
  # reads the same global batch the step runs.
  config = layout.resolve(config, jax.device_count())
  info = _device_info()
  on_cpu = info["platform"] == "cpu"
  probe = matmul_probe(probe_size or (2048 if on_cpu else 8192), iterations=1 if on_cpu else 20)
  datasheet = datasheet_peak_tflops(info["device_kind"])
  if peak_gflops:
    peak = {"gflops": float(peak_gflops), "source": "--peak_gflops"}
  elif datasheet:
    peak = {"gflops": datasheet * 1e3, "source": f"datasheet dense bf16 ({info['device_kind']})"}
  else:
    peak = {"gflops": probe["gflops"], "source": "float32 matmul probe"}
  result = {"label": label, "machine": info, "probe": probe, "peak": peak,
            "config": {"model": config.model.name, "data": config.data.name,
                       "method": config.get("method"), "variant": config.objective.variant,
                       "dtype": config.model.dtype, "batch_size": config.batch_size,
                       "conv_input_barrier": config.model.conv_input_barrier,
                       "remat_branches": config.model.remat_branches}}
  timing = dict(steps=steps, warmup=warmup, peak_flops_per_s=peak["gflops"] * 1e9)
  result["step"] = measure_step(config, **timing)
  if not skip_ce and result["step"]["method"] != "cross_entropy":
    result["ce_step"] = measure_step(recipes.with_method(config, "cross_entropy"), **timing)
    result["ratios"] = _ratios(result["step"], result["ce_step"])
  if not skip_pipeline:  # last: its reader threads slow XLA's CPU steps while they exist
    result["pipeline"] = measure_pipeline(config, batches=pipeline_batches,
                                          mock_examples=pipeline_mock_examples)
    if "images_per_s" in result["pipeline"] and "clean_images_per_s" in result["step"]:
      result["pipeline"]["over_step_consumption"] = (
          result["pipeline"]["images_per_s"] / result["step"]["clean_images_per_s"])
  result["machine"]["load_average_1min_end"] = _device_info()["load_average_1min"]
  if json_out:
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  return result


def _ratios(step: dict, ce: dict) -> dict[str, float]:
  """Step-time ratio next to FLOP ratio; `time_over_flop_ratio` 1.0 means the extra work runs
  exactly as efficiently as the plain step."""
  out = {}
  if step.get("flops_per_step_per_device") and ce.get("flops_per_step_per_device"):
    out["flops"] = step["flops_per_step_per_device"] / ce["flops_per_step_per_device"]
  if "step_s" in step and "step_s" in ce:
    out["step_time"] = step["step_s"]["median"] / ce["step_s"]["median"]
    if "flops" in out:
      out["time_over_flop_ratio"] = out["step_time"] / out["flops"]
  return out


def _fmt(value, spec: str, unit: str = "") -> str:
  return "-" if value is None else f"{value:{spec}}{unit}"


def _step_rows(s: dict) -> dict[str, str]:
  st = s.get("step_s")
  mem = s["memory"].get("peak_bytes")
  return {
      "compile: lower + XLA": f"{s['lower_s']:.1f} + {s['compile_s']:.1f} s",
      "step median [min, max]": (f"{st['median'] * 1e3:.0f} [{st['min'] * 1e3:.0f}, "
                                 f"{st['max'] * 1e3:.0f}] ms" if st else "-"),
      "clean images/s": _fmt(s.get("clean_images_per_s"), ".1f"),
      "GFLOP/step/device": _fmt((s["flops_per_step_per_device"] or 0) / 1e9 or None, ".1f"),
      "achieved GFLOP/s/device": _fmt(s.get("achieved_gflops_per_device"), ".1f"),
      "fraction of peak": _fmt(s.get("fraction_of_peak"), ".1%"),
      "peak memory/device": _fmt(None if mem is None else mem / 2 ** 30, ".2f", " GiB"),
      "communication/step/device": _fmt_bytes(s["communication"]["total_bytes"]),
  } | {f"  {kind}": f"{v['count']} x, {_fmt_bytes(v['bytes'])}"
       for kind, v in sorted(s["communication"]["by_kind"].items())}


def _fmt_bytes(n: int) -> str:
  return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_table(result: dict[str, Any]) -> str:
  """The benchmark's results as a plain-text table."""
  m, c, p = result["machine"], result["config"], result["probe"]
  lines = [f"benchmark {result.get('label') or ''}: {c['data']} / {c['model']} / "
           f"{result['step']['method']} ({c['variant']}) / {c['dtype']} / batch "
           f"{c['batch_size']} clean per step, barrier={c['conv_input_barrier']}, "
           f"remat={c['remat_branches']}",
           f"machine: {m['devices']} x {m['device_kind']} ({m['platform']}), host "
           f"{m['host_cpu']}, {m['host_cores']} cores, jax {m['jax']}, load avg "
           f"{_fmt(m['load_average_1min'], '.2f')} -> "
           f"{_fmt(m.get('load_average_1min_end'), '.2f')}",
           f"peak: {result['peak']['gflops']:.0f} GFLOP/s/device ({result['peak']['source']}); "
           f"{p['dtype']} matmul probe {p['size']}^3 x{p['iterations']}: "
           f"{p['gflops']:.0f} GFLOP/s",
           ""]
  cols = [(result["step"]["method"], _step_rows(result["step"]))]
  if "ce_step" in result:
    cols.append(("cross_entropy", _step_rows(result["ce_step"])))
  ratios = result.get("ratios", {})
  ratio_col = {"step median [min, max]": _fmt(ratios.get("step_time"), ".2f", "x"),
               "GFLOP/step/device": _fmt(ratios.get("flops"), ".2f", "x"),
               "clean images/s": ("time/FLOP " + _fmt(ratios.get("time_over_flop_ratio"), ".2f")
                                  if ratios else "")}
  width = max(len(k) for k in cols[0][1]) + 2
  header = "".join(f"{name:>24}" for name, _ in cols) + ("   ratio" if ratios else "")
  lines.append(" " * width + header)
  rows = list(dict.fromkeys(row for _, col in cols for row in col))
  for row in rows:
    cells = "".join(f"{col.get(row, '-'):>24}" for _, col in cols)
    extra = f"   {ratio_col.get(row, '')}" if ratios else ""
    lines.append(f"{row:<{width}}{cells}{extra}".rstrip())
  pipe = result.get("pipeline")
  if pipe is not None:
    lines.append("")
    if "unavailable" in pipe:
      lines.append(f"input pipeline: unavailable: {pipe['unavailable']}")
    else:
      mock = (f" (tfds mock data, {pipe['mock_examples']} images of the real shape)"
              if pipe.get("mock_examples") else "")
      lines.append(f"input pipeline{mock}: {pipe['images_per_s']:.0f} images/s alone = "
                   f"{_fmt(pipe.get('over_step_consumption'), '.1f', 'x')} what the step "
                   "consumes")
  return "\n".join(lines)


def main(argv):
  """CLI: the flags below plus `--config` and its `--config.<field>` overrides."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.against == "torch":
    from mixskd_jax import benchmark_torch  # pylint: disable=import-outside-toplevel
    benchmark_torch.main(f, label=_config_label())
    return
  result = run_benchmark(f.config, steps=f.steps, warmup=f.warmup, skip_ce=f.skip_ce,
                         skip_pipeline=f.skip_pipeline, peak_gflops=f.peak_gflops,
                         probe_size=f.probe_size, pipeline_batches=f.pipeline_batches,
                         pipeline_mock_examples=f.pipeline_mock_examples, json_out=f.json_out,
                         label=_config_label())
  print(format_table(result))
  if f.json_out:
    print(f"\nwrote {f.json_out}")


def _config_label() -> str:
  """The --config argument as given (path and ':tokens'), for the table's title."""
  import sys  # pylint: disable=import-outside-toplevel
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return ""


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file: configs/NAME.py in a checkout, or the one "
      "`python -m mixskd_jax.configs NAME` prints.", lock_config=True)
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_integer("steps", 10, "Timed steps (after --warmup); 0: compile and analyse only.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_string("json_out", None, "Write the results as JSON to this path.")
  flags.DEFINE_bool("skip_ce", False, "Leave out the plain cross-entropy step.")
  flags.DEFINE_bool("skip_pipeline", False, "Leave out the host input pipeline.")
  flags.DEFINE_float("peak_gflops", None, "Peak GFLOP/s per device to compare with (default: "
                     "datasheet bf16 peak of known accelerators, else a float32 matmul probe).")
  flags.DEFINE_integer("probe_size", None, "Matmul probe size (default 2048 on CPU, 8192 else).")
  flags.DEFINE_enum("against", "", ["", "torch"],
                    "torch: time the step side by side with the PyTorch implementation of the "
                    "same network and objective (benchmark_torch.py); --steps per round.")
  flags.DEFINE_integer("rounds", 3, "--against: alternating rounds of --steps timed steps.")
  flags.DEFINE_integer("pipeline_batches", 20, "Batches the input pipeline is timed over.")
  flags.DEFINE_integer("pipeline_mock_examples", 0,
                       "> 0: time the pipeline on that many tfds mock images of the real shape "
                       "(for datasets this machine does not have).")
  app.run(main)
