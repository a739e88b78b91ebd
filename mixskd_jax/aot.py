r"""A config's train and eval steps compiled for a TPU slice, on any host, before launch.

  python -m mixskd_jax.aot --config=configs/imagenet_resnet50_mixskd.py --topology=v5e:16x16 \
      [--config.model.dtype=bfloat16] [--json_out=report.json]
  python -m mixskd_jax.aot --config=configs/imagenet_resnet50_mixskd.py --topology=v5e:2x2 --fit

The TPU compiler (libtpu: `pip install -e ".[tpu]"`) compiles the steps exactly as a run
on the slice builds them (the config resolved for its devices: global batch, mix and BatchNorm
groups, learning rate; the same model, method, optimizer, shardings and donation; the TPU's
compiler options) and prints, per chip: HBM for arguments, outputs, temporaries and the peak
against the chip's (fits, or over by how much), FLOPs per step, every collective with its
bytes, the TPU cost model's step estimate where the target gives one, and the compile times.
Nothing is allocated and no TPU is needed. `--fit` instead finds the largest per-chip batch
that fits the chip, in float32 and bfloat16, with and without `model.remat_branches`, and the
global batch and learning rate the config's scaling rule gives for it (`bench/aot_fit.py`).

Bad input (an unknown topology, a batch the chips do not divide, libtpu missing, a step that
does not fit) answers in one line with exit status 2.
"""

from __future__ import annotations

import json
import os
import sys

EXIT_BAD_INPUT = 2
REMATS = {"both": (False, True), "False": (False,), "True": (True,)}


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def run(config, *, topology: str, num_slices: int = 1, fit: bool = False,
        fit_granularity: int = 8, fit_dtypes=("float32", "bfloat16"),
        fit_remats=(False, True), fit_log: str | None = None, with_eval: bool = True,
        json_out: str | None = None, label: str = "") -> dict:
  """The command without its flags: the report (or the fit) for `config` on `topology`,
  printed as a table; written as JSON to `json_out` if given."""
  # pylint: disable=import-outside-toplevel  (JAX starts after the flags are read)
  import jax
  # A TPU executable cannot be read back from JAX's persistent cache on a host without TPUs
  # (it needs a TPU client), so writing it there only costs disk and a warning on the next
  # read.
  jax.config.update("jax_enable_compilation_cache", False)
  from mixskd_jax import backends
  from mixskd_jax.bench import aot, aot_table, tpu_slice
  backends.start()  # this host's backends, before libtpu is asked for the slice
  tpu = tpu_slice.describe(topology, num_slices=num_slices)
  if fit:
    from mixskd_jax.bench import aot_fit
    print(f"fitting {label or config.model.name} on {topology}: one TPU compile per batch "
          "tried", flush=True)
    result = aot_fit.fit_report(config, tpu, granularity=fit_granularity, dtypes=fit_dtypes,
                                remats=fit_remats, progress=lambda line: print(line, flush=True),
                                log_path=fit_log)
    text = aot_table.format_fit(result, label=label)
  else:
    result = aot.compile_for_slice(config, tpu, with_eval=with_eval)
    text = aot_table.format_report(result, label=label)
  print(text)
  if json_out:
    os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
    with open(json_out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"\nwrote {json_out}")
  return result


def main(argv):
  """CLI: the flags below plus `--config` and its `--config.<field>` overrides."""
  # pylint: disable=import-outside-toplevel  (nothing heavy loads before the flags are read)
  from absl import flags
  from mixskd_jax.bench import aot_table, command_line
  from mixskd_jax.bench.tpu_slice import LibtpuMissingError, TopologyError
  from mixskd_jax.config.errors import ConfigValueError
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every option is a --flag.")
  f = flags.FLAGS
  try:
    result = run(f.config, topology=f.topology, num_slices=f.num_slices, fit=f.fit,
                 fit_granularity=f.fit_granularity, fit_dtypes=tuple(f.fit_dtypes),
                 fit_remats=REMATS[f.fit_remat], fit_log=f.fit_log, with_eval=not f.skip_eval,
                 json_out=f.json_out, label=command_line.config_label())
  except (TopologyError, LibtpuMissingError, ConfigValueError) as e:
    _fail(str(e))
  if not f.fit and result["train_step"]["fits"] is False:
    _fail(aot_table.does_not_fit_line(result))


if __name__ == "__main__":
  from absl import app, flags

  from mixskd_jax.bench.command_line import define_config_flag
  define_config_flag()
  flags.DEFINE_string("topology", None, "The TPU slice, GENERATION:SHAPE: v5e:2x2, v5e:16x16, "
                      "v4:2x2x4, v5p:4x4x8, v6e:8x8, v2:4x4, v3:4x4.")
  flags.mark_flags_as_required(["topology"])
  flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network.")
  flags.DEFINE_bool("fit", False, "Find the largest per-chip batch that fits the chip "
                    "(float32 and bfloat16, with and without model.remat_branches).")
  flags.DEFINE_integer("fit_granularity", 8, "--fit: per-chip batches searched in steps of it.")
  flags.DEFINE_list("fit_dtypes", ["float32", "bfloat16"], "--fit: the model.dtype values.")
  flags.DEFINE_enum("fit_remat", "both", list(REMATS), "--fit: model.remat_branches values.")
  flags.DEFINE_string("fit_log", None, "--fit: append each compile's outcome to this file and "
                      "take the ones already there from it (a stopped fit resumes).")
  flags.DEFINE_bool("skip_eval", False, "Compile the train step only.")
  flags.DEFINE_string("json_out", None, "Write the report as JSON to this path.")
  app.run(main)
