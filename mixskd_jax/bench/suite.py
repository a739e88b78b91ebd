"""The whole benchmark of one config: the machine and its peak, the config's train step next to
the plain cross-entropy step of the same backbone and batch (`recipes.with_method(config,
"cross_entropy")`), and the host input pipeline; written as JSON if asked.

The peak a step's FLOP/s is compared with is `peak_gflops` if given, else the datasheet's dense
bf16 peak on known accelerators (MFU), else a float32 matmul probe measured in the same run.
The input pipeline (`data.train_iterator`) is timed alone, images/s next to what the step
consumes, when the dataset is prepared on this machine ("unavailable: <reason>" otherwise; the
benchmark never downloads or builds a dataset). `format_table` (`bench.table`) prints the
result; `mixskd_jax.benchmark` re-exports `run_benchmark`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from mixskd_jax import backends
from mixskd_jax.bench.host import datasheet_peak_tflops, device_info, matmul_probe, \
    measure_pipeline
from mixskd_jax.bench.step import measure_step
from mixskd_jax.config import recipes
from mixskd_jax.train import layout


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
  config = layout.resolve(config, len(backends.start()))
  info = device_info()
  on_cpu = info["platform"] == "cpu"
  probe = matmul_probe(probe_size or (2048 if on_cpu else 8192), iterations=1 if on_cpu else 20)
  peak = _peak(peak_gflops, info["device_kind"], probe)
  result = {"label": label, "machine": info, "probe": probe, "peak": peak,
            "config": _config_fields(config)}
  timing = dict(steps=steps, warmup=warmup, peak_flops_per_s=peak["gflops"] * 1e9)
  result["step"] = measure_step(config, **timing)
  if not skip_ce and result["step"]["method"] != "cross_entropy":
    result["ce_step"] = measure_step(recipes.with_method(config, "cross_entropy"), **timing)
    result["ratios"] = _ratios(result["step"], result["ce_step"])
  if not skip_pipeline:  # last: its reader threads slow XLA's CPU steps while they exist
    result["pipeline"] = _pipeline(config, result["step"], batches=pipeline_batches,
                                   mock_examples=pipeline_mock_examples)
  result["machine"]["load_average_1min_end"] = device_info()["load_average_1min"]
  if json_out:
    _write_json(result, json_out)
  return result


def _peak(peak_gflops: float | None, device_kind: str, probe: dict[str, Any]
          ) -> dict[str, Any]:
  """The peak per device to compare with, and where it comes from."""
  datasheet = datasheet_peak_tflops(device_kind)
  if peak_gflops:
    return {"gflops": float(peak_gflops), "source": "--peak_gflops"}
  if datasheet:
    return {"gflops": datasheet * 1e3, "source": f"datasheet dense bf16 ({device_kind})"}
  return {"gflops": probe["gflops"], "source": "float32 matmul probe"}


def _config_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields the table's title names."""
  return {"model": config.model.name, "data": config.data.name,
          "method": config.get("method"), "variant": config.objective.variant,
          "dtype": config.model.dtype, "batch_size": config.batch_size,
          "conv_input_barrier": config.model.conv_input_barrier,
          "remat_branches": config.model.remat_branches}


def _pipeline(config: ml_collections.ConfigDict, step: dict[str, Any], *, batches: int,
              mock_examples: int) -> dict[str, Any]:
  """The input pipeline's images/s, and its ratio to what the step consumes."""
  pipeline = measure_pipeline(config, batches=batches, mock_examples=mock_examples)
  if "images_per_s" in pipeline and "clean_images_per_s" in step:
    pipeline["over_step_consumption"] = pipeline["images_per_s"] / step["clean_images_per_s"]
  return pipeline


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


def _write_json(result: dict[str, Any], path: str) -> None:
  """`result` as indented JSON at `path`, its folder created if needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
