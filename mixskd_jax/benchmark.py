r"""How fast a config's train step runs, against the machine's limit and a plain CE step.

  python -m mixskd_jax.benchmark --config=configs/cifar100_resnet18_mixskd.py \
      --json_out=/tmp/bench.json [--steps=10 --warmup=2 --skip_ce --skip_pipeline]

Any config field can be overridden as in training (`--config.model.dtype=bfloat16`).
From Python: `print(format_table(run_benchmark(config)))`. `--against=torch [--rounds=3]` times
the step side by side with the PyTorch implementation of the same network instead
(`bench/torch_side.py`, `bench/side_by_side.py`). `--profile` prints where the step's thread
time goes instead: each kind of XLA op's (with the thread-pool work it scheduled), the runtime's
between ops and idle threads', adding up to wall time x threads, and the ops that take most
(`bench/op_profile.py`); with `--against=torch`, next to PyTorch's step, row by row
(`bench/breakdown.py`).

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

# The command's door: the measuring lives in mixskd_jax.bench (step, suite, table, host,
# side_by_side); these names are re-exported for `from mixskd_jax.benchmark import ...`.

from __future__ import annotations

from mixskd_jax.bench.host import (DATASHEET_BF16_TFLOPS, datasheet_peak_tflops, device_info,
                                   matmul_probe, measure_pipeline)
from mixskd_jax.bench.step import StepRunner, compile_step, measure_step, synthetic_batch
from mixskd_jax.bench.suite import run_benchmark
from mixskd_jax.bench.table import format_table

__all__ = ["DATASHEET_BF16_TFLOPS", "StepRunner", "compile_step", "datasheet_peak_tflops",
           "device_info", "format_table", "main", "matmul_probe", "measure_pipeline",
           "measure_step", "run_benchmark", "synthetic_batch"]


def main(argv):
  """CLI: the flags below plus `--config` and its `--config.<field>` overrides."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from mixskd_jax.bench import command_line  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.profile and f.against == "torch":
    from mixskd_jax.bench import breakdown  # pylint: disable=import-outside-toplevel
    breakdown.main(f, label=command_line.config_label())
    return
  if f.profile:
    from mixskd_jax.bench import op_profile  # pylint: disable=import-outside-toplevel
    print(op_profile.format_profile(op_profile.profile_step(f.config, steps=max(f.steps, 1),
                                                            warmup=f.warmup)))
    return
  if f.against == "torch":
    from mixskd_jax.bench import side_by_side  # pylint: disable=import-outside-toplevel
    side_by_side.main(f, label=command_line.config_label())
    return
  result = run_benchmark(f.config, steps=f.steps, warmup=f.warmup, skip_ce=f.skip_ce,
                         skip_pipeline=f.skip_pipeline, peak_gflops=f.peak_gflops,
                         probe_size=f.probe_size, pipeline_batches=f.pipeline_batches,
                         pipeline_mock_examples=f.pipeline_mock_examples, json_out=f.json_out,
                         label=command_line.config_label())
  print(format_table(result))
  if f.json_out:
    print(f"\nwrote {f.json_out}")


if __name__ == "__main__":
  from absl import app, flags

  from mixskd_jax.bench.command_line import define_config_flag
  define_config_flag()
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
                    "same network and objective (bench/side_by_side.py); --steps per round.")
  flags.DEFINE_bool("profile", False, "Instead of the table: trace --steps steps of the "
                    "config's train step and print where its thread time goes, by kind of op "
                    "(bench/op_profile.py); with --against=torch, next to PyTorch's "
                    "(bench/breakdown.py).")
  flags.DEFINE_integer("rounds", 3, "--against: alternating rounds of --steps timed steps.")
  flags.DEFINE_integer("pipeline_batches", 20, "Batches the input pipeline is timed over.")
  flags.DEFINE_integer("pipeline_mock_examples", 0,
                       "> 0: time the pipeline on that many tfds mock images of the real shape "
                       "(for datasets this machine does not have).")
  app.run(main)
