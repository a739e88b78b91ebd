"""A config's train and eval steps compiled by the TPU compiler for a named slice, on any host.

`compile_for_slice(config, tpu)` builds the steps exactly as a run on that slice builds them
(`train.builder`, through `bench.step.compile_train_step`): the config resolved for the slice's
device count (global batch, mix and BatchNorm groups, learning rate: `train.layout`), the same
model, method, optimizer, shardings and donation, and the compiler options of the target
platform (a TPU: none of XLA:CPU's). It reports per chip what the compiler says: HBM for
arguments, outputs, temporaries and the peak against what the compiler may use of the chip,
FLOPs, every collective with its bytes, the TPU cost model's step estimate where it gives one,
and the compile time. A step that does not fit is reported with what it needs (the compiler's
RESOURCE_EXHAUSTED message), not raised.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mixskd_jax.bench import collectives, step as step_lib
from mixskd_jax.bench.tpu_slice import TpuSlice
from mixskd_jax.data import datasets
from mixskd_jax.method.methods import method_name
from mixskd_jax.train import layout, sharding

_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# libtpu 0.0.42: "Ran out of memory on HBM, the total memory required for HLO temporaries
# (17.35G) exceeds available HBM (15.75G)."
_NEEDED = re.compile(r"required for [^(]*\(" + _SIZE + r"\)")
_AVAILABLE = re.compile(r"available HBM \(" + _SIZE + r"\)")


def _bytes(match: re.Match | None) -> int | None:
  return None if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])


def out_of_memory(error: Exception) -> dict[str, Any] | None:
  """{"message", "needed_bytes", "available_bytes"} of the TPU compiler's RESOURCE_EXHAUSTED
  error (sizes None where the message does not give them); None for any other error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  return {"message": text.splitlines()[0], "needed_bytes": _bytes(_NEEDED.search(text)),
          "available_bytes": _bytes(_AVAILABLE.search(text))}


def usable_hbm_bytes(tpu: TpuSlice) -> int:
  """HBM per device the TPU compiler may use (v5e: 15.75 of 16 GiB), read from its own
  RESOURCE_EXHAUSTED message for a program far larger than any chip; the datasheet figure
  where the message cannot be read."""
  mesh = jax.sharding.Mesh(tpu.mesh.devices.flat[:1], (sharding.DATA_AXIS,))
  huge = jax.ShapeDtypeStruct((2 ** 26, 1024), jnp.float32,  # 256 GiB
                              sharding=sharding.replicated(mesh))
  try:
    jax.jit(lambda a: (jnp.sin(a), jnp.cos(a))).lower(huge).compile()
  except Exception as e:  # pylint: disable=broad-except  (the message is what we want)
    available = (out_of_memory(e) or {}).get("available_bytes")
    if available:
      return available
  return tpu.hbm_bytes_per_device


def cost_model_seconds(cost: Any) -> float | None:
  """The TPU cost model's step estimate ("optimal_seconds"); None where it gives none or a
  non-positive number (v5e in libtpu 0.0.42 returns a negative one)."""
  entries = cost if isinstance(cost, (list, tuple)) else [cost]
  for entry in entries:
    if isinstance(entry, dict) and entry.get("optimal_seconds") is not None:
      value = float(entry["optimal_seconds"])
      return value if value > 0 else None
  return None


def _fit(memory: dict[str, Any], usable: int) -> dict[str, Any]:
  """A compiled step fits: the TPU compiler refuses one that does not (RESOURCE_EXHAUSTED).
  Its headroom is the usable HBM less the compiler's own peak, which counts what is live at
  once (below arguments + outputs - donated + temporaries, the bound `peak_bytes` is)."""
  peak = memory.get("peak_memory_in_bytes") or memory.get("peak_bytes")
  if peak is None:
    return {"fits": True}
  return {"fits": True, "peak_bytes": peak, "headroom_bytes": usable - peak}


def _compiled_report(compiled, abstract_params, usable: int, lower_s: float,
                     compile_s: float) -> dict[str, Any]:
  memory = step_lib.memory_of(compiled)
  comm = collectives.communication(compiled)
  cost = compiled.cost_analysis()
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_params))
  return {"lower_s": lower_s, "compile_s": compile_s, "memory": memory, **_fit(memory, usable),
          "flops_per_step_per_device": step_lib.flops_of(cost),
          "cost_model_seconds": cost_model_seconds(cost), "communication": comm,
          "activation_check": collectives.activation_check(comm, param_bytes)}


def _not_fitting(error: Exception, usable: int, lower_s: float, compile_s: float
                 ) -> dict[str, Any]:
  oom = out_of_memory(error)
  if oom is None:
    raise error
  return {"lower_s": lower_s, "compile_s": compile_s, "fits": False, "out_of_memory": oom,
          "headroom_bytes": (usable - oom["needed_bytes"]) if oom["needed_bytes"] else None}


def compile_train(config: ml_collections.ConfigDict, tpu: TpuSlice, usable: int
                  ) -> tuple[dict[str, Any], step_lib.CompiledStep | None]:
  """(report, the compiled step or None when it does not fit) of `config`'s train step."""
  t0 = time.perf_counter()
  try:
    compiled = step_lib.compile_train_step(config, tpu.mesh)
  except Exception as e:  # pylint: disable=broad-except  (RESOURCE_EXHAUSTED is a result)
    return _not_fitting(e, usable, 0.0, time.perf_counter() - t0), None
  return _compiled_report(compiled.compiled, compiled.abstract_state.params, usable,
                          compiled.lower_s, compiled.compile_s), compiled


def compile_eval(step: step_lib.CompiledStep, usable: int) -> dict[str, Any]:
  """The eval step of a compiled train step's run, on its padded, masked eval batch."""
  config, mesh = step.config, step.mesh
  spec = datasets.get_spec(config.data.name)
  data = sharding.data_sharding(mesh)
  b = config.eval_batch_size
  batch = {"image": jax.ShapeDtypeStruct((b,) + tuple(spec.image_shape), jnp.uint8,
                                         sharding=data),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data),
           "mask": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=data)}
  t0 = time.perf_counter()
  lowered = step.built.eval_step.lower(step.abstract_state, batch)
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (RESOURCE_EXHAUSTED is a result)
    return _not_fitting(e, usable, t1 - t0, time.perf_counter() - t1)
  return _compiled_report(compiled, step.abstract_state.params, usable, t1 - t0,
                          time.perf_counter() - t1)


def resolved_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a run on the slice trains with, from the config resolved for its devices."""
  return {"method": method_name(config),
          "model": config.model.name, "dtype": config.model.dtype,
          "remat_branches": bool(config.model.remat_branches),
          "per_device_batch_size": config.per_device_batch_size,
          "global_batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size,
          "mix_groups": config.objective.mix_groups,
          "batchnorm_groups": config.model.batchnorm_groups,
          "learning_rate": config.optimizer.learning_rate}


def compile_for_slice(config: ml_collections.ConfigDict, tpu: TpuSlice, *,
                      usable: int | None = None, with_eval: bool = True) -> dict[str, Any]:
  """The report of `config`'s steps compiled for `tpu` (see the module docstring).

  Args:
    config: an experiment config (not yet resolved: the slice's device count resolves it).
    tpu: the slice (`tpu_slice.describe`).
    usable: HBM bytes per device the compiler may use (default: `usable_hbm_bytes(tpu)`).
    with_eval: also compile the eval step (skipped when the train step does not fit).
  """
  usable = usable_hbm_bytes(tpu) if usable is None else usable
  resolved = layout.resolve(config, tpu.num_devices, log_costs=False)
  train, compiled = compile_train(config, tpu, usable)
  report = {"topology": tpu.topology, "device_kind": tpu.device_kind,
            "devices": tpu.num_devices, "processes": tpu.num_processes,
            "slices": tpu.num_slices, "jax": jax.__version__, "libtpu": _libtpu_version(),
            "hbm_datasheet_bytes_per_device": tpu.hbm_bytes_per_device,
            "hbm_usable_bytes_per_device": usable, **resolved_summary(resolved),
            "train_step": train}
  if with_eval and compiled is not None:
    report["eval_step"] = compile_eval(compiled, usable)
  return report


def _libtpu_version() -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None
