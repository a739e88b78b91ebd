r"""The TPU-compiler analyses behind experiments/SCALING.md, one `python -m mixskd_jax.aot`
command each, run in order and resumed: a run whose JSON exists is skipped.

  python -m experiments.tpu_aot [--only=NAME,...] [--list]

Each run writes experiments/results/tpu_aot/NAME.json (the command's --json_out) and NAME.txt
(what it printed). R50 MixSKD compiles take about 5 minutes each on the 2-core development
machine, a fit several of them.
"""

import argparse
import os
import subprocess
import sys
import time

OUT = os.path.join(os.path.dirname(__file__), "results", "tpu_aot")
MIXSKD = "configs/imagenet_resnet50_mixskd.py"
CE = "configs/imagenet_resnet50_ce.py"
BF16 = ("--config.model.dtype=bfloat16",)

# (name, config, topology, extra flags), most wanted first.
RUNS = (
    ("mixskd_v5e_2x2_f32", MIXSKD, "v5e:2x2", ()),
    ("ce_v5e_2x2_f32", CE, "v5e:2x2", ()),
    ("mixskd_v5e_2x2_bf16", MIXSKD, "v5e:2x2", BF16),
    ("mixskd_v4_2x2x1_f32", MIXSKD, "v4:2x2x1", ("--skip_eval",)),
    ("mixskd_v5p_2x2x1_f32", MIXSKD, "v5p:2x2x1", ("--skip_eval",)),
    ("mixskd_v6e_2x2_f32", MIXSKD, "v6e:2x2", ("--skip_eval",)),
    ("mixskd_v5e_16x16_f32", MIXSKD, "v5e:16x16", ("--skip_eval",)),
    ("mixskd_v5e_2x2_f32_128", MIXSKD, "v5e:2x2", ("--skip_eval",
                                                   "--config.per_device_batch_size=128")),
    ("fit_mixskd_v5e_2x2", MIXSKD, "v5e:2x2", ("--fit", "--fit_remat=False")),
    ("ce_v5p_2x2x1_f32", CE, "v5p:2x2x1", ("--skip_eval",)),
    ("mixskd_v4_2x2x1_bf16", MIXSKD, "v4:2x2x1", BF16 + ("--skip_eval",)),
    ("mixskd_v5p_2x2x1_bf16", MIXSKD, "v5p:2x2x1", BF16 + ("--skip_eval",)),
    ("mixskd_v6e_2x2_bf16", MIXSKD, "v6e:2x2", BF16 + ("--skip_eval",)),
    ("fit_mixskd_v6e_2x2", MIXSKD, "v6e:2x2", ("--fit", "--fit_remat=False")),
    ("fit_mixskd_v4_2x2x1", MIXSKD, "v4:2x2x1", ("--fit", "--fit_remat=False")),
    ("fit_mixskd_v5p_2x2x1", MIXSKD, "v5p:2x2x1", ("--fit", "--fit_remat=False")),
)


def command(config: str, topology: str, extra, json_out: str) -> list[str]:
  return [sys.executable, "-m", "mixskd_jax.aot", f"--config={config}",
          f"--topology={topology}", f"--json_out={json_out}", *extra]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--list", action="store_true", help="print the commands and exit")
  args = parser.parse_args()
  only = set(filter(None, args.only.split(",")))
  os.makedirs(OUT, exist_ok=True)
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  for name, config, topology, extra in RUNS:
    if only and name not in only:
      continue
    json_out = os.path.join(OUT, f"{name}.json")
    cmd = command(config, topology, extra, os.path.relpath(json_out, root))
    if args.list:
      print(" ".join(cmd[1:]))
      continue
    if os.path.exists(json_out):
      continue
    start = time.time()
    with open(os.path.join(OUT, f"{name}.txt"), "w") as log:
      rc = subprocess.call(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit {rc} in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
