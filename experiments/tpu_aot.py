r"""The TPU-compiler analyses behind experiments/SCALING.md, one `python -m mixskd_jax.aot`
command each, run in order and resumed: a run whose JSON exists is skipped.

  python -m experiments.tpu_aot [--only=NAME,...] [--list]
  python -m experiments.tpu_aot --tables     # the markdown tables SCALING.md quotes
  python -m experiments.tpu_aot --write      # ... written into SCALING.md in place

Each run writes experiments/results/tpu_aot/NAME.json (the command's --json_out) and NAME.txt
(what it printed); a fit also NAME.compiles.jsonl, each compile's outcome as it finishes, from
which a stopped fit resumes. R50 MixSKD compiles take 5 to 8 minutes each on the 2-core development
machine, a fit several of them. `--tables` renders the finished runs' JSON as the tables of
experiments/SCALING.md (tests/test_aot.py checks that the document quotes them as rendered).
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

OUT = os.path.join(os.path.dirname(__file__), "results", "tpu_aot")
MIXSKD = "configs/imagenet_resnet50_mixskd.py"
CE = "configs/imagenet_resnet50_ce.py"
BF16 = ("--config.model.dtype=bfloat16",)
# One fit per (slice, dtype), without remat_branches: each is hours of compiles on two cores.
FIT_F32 = ("--fit", "--fit_dtypes=float32", "--fit_remat=False")
FIT_BF16 = ("--fit", "--fit_dtypes=bfloat16", "--fit_remat=False")

# (name, config, topology, extra flags), most wanted first.
RUNS = (
    ("mixskd_v5e_2x2_f32", MIXSKD, "v5e:2x2", ()),
    ("ce_v5e_2x2_f32", CE, "v5e:2x2", ()),
    ("mixskd_v5e_2x2_bf16", MIXSKD, "v5e:2x2", BF16),
    ("mixskd_v5e_16x16_f32", MIXSKD, "v5e:16x16", ("--skip_eval",)),
    ("mixskd_v4_2x2x1_f32", MIXSKD, "v4:2x2x1", ("--skip_eval",)),
    ("mixskd_v5p_2x2x1_f32", MIXSKD, "v5p:2x2x1", ("--skip_eval",)),
    ("mixskd_v6e_2x2_f32", MIXSKD, "v6e:2x2", ("--skip_eval",)),
    ("fit_mixskd_v5e_2x2_f32", MIXSKD, "v5e:2x2", FIT_F32),
    ("fit_mixskd_v5e_2x2_bf16", MIXSKD, "v5e:2x2", FIT_BF16),
    ("mixskd_v5e_2x2_f32_128", MIXSKD, "v5e:2x2", ("--skip_eval",
                                                   "--config.per_device_batch_size=128")),
    ("ce_v5p_2x2x1_f32", CE, "v5p:2x2x1", ("--skip_eval",)),
    ("mixskd_v4_2x2x1_bf16", MIXSKD, "v4:2x2x1", BF16 + ("--skip_eval",)),
    ("mixskd_v5p_2x2x1_bf16", MIXSKD, "v5p:2x2x1", BF16 + ("--skip_eval",)),
    ("mixskd_v6e_2x2_bf16", MIXSKD, "v6e:2x2", BF16 + ("--skip_eval",)),
    ("fit_mixskd_v4_2x2x1_f32", MIXSKD, "v4:2x2x1", FIT_F32),
    ("fit_mixskd_v5p_2x2x1_f32", MIXSKD, "v5p:2x2x1", FIT_F32),
    ("fit_mixskd_v4_2x2x1_bf16", MIXSKD, "v4:2x2x1", FIT_BF16),
    ("fit_mixskd_v5p_2x2x1_bf16", MIXSKD, "v5p:2x2x1", FIT_BF16),
    ("fit_mixskd_v5e_2x2_f32_remat", MIXSKD, "v5e:2x2", (
        "--fit", "--fit_dtypes=float32", "--fit_remat=True")),
    ("fit_mixskd_v6e_2x2_f32", MIXSKD, "v6e:2x2", FIT_F32),
    ("ce_v5e_2x2_bf16", CE, "v5e:2x2", BF16 + ("--skip_eval",)),
    ("ce_v4_2x2x1_f32", CE, "v4:2x2x1", ("--skip_eval",)),
    ("ce_v5p_2x2x1_bf16", CE, "v5p:2x2x1", BF16 + ("--skip_eval",)),
    ("fit_ce_v5e_2x2_f32", CE, "v5e:2x2", FIT_F32),
    ("fit_ce_v5e_2x2_bf16", CE, "v5e:2x2", FIT_BF16),
    ("fit_ce_v4_2x2x1_f32", CE, "v4:2x2x1", FIT_F32),
    ("ce_v6e_2x2_f32", CE, "v6e:2x2", ("--skip_eval",)),
)


def command(config: str, topology: str, extra, json_out: str) -> list[str]:
  return [sys.executable, "-m", "mixskd_jax.aot", f"--config={config}",
          f"--topology={topology}", f"--json_out={json_out}", *extra]


GIB = 2 ** 30


def _method_name(report: dict) -> str:
  return "MixSKD" if report["method"] == "mixskd" else "CE"


def _load(name: str) -> dict | None:
  path = os.path.join(OUT, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _collectives(step: dict) -> str:
  by_kind = step["communication"]["by_kind"]
  return ", ".join(f"{v['count']} {kind} {v['bytes'] / 1e6:.1f} MB"
                   for kind, v in sorted(by_kind.items())) or "none"


def _reports() -> list[tuple[str, dict]]:
  """(name, report) of every finished run: each single compile, then each fit's train step at
  the largest per-chip batch that fits."""
  out = []
  for name, *_ in RUNS:
    r = _load(name)
    if r is None:
      continue
    if not name.startswith("fit_"):
      out.append((name, r))
      continue
    for row in r["rows"]:
      if row.get("train_step", {}).get("memory"):
        remat = ", remat" if row["remat_branches"] else ""
        out.append((f"{name}: largest{remat}", {
            **{k: r[k] for k in ("topology", "devices", "device_kind", "processes", "method")},
            "dtype": row["dtype"], "per_device_batch_size": row["largest_per_device_batch"],
            "global_batch_size": row["global_batch_size"],
            "hbm_usable_bytes_per_device": r["hbm_usable_bytes"],
            "train_step": row["train_step"]}))
  return out


def step_table() -> str:
  """Per chip, every finished run: the train step (and eval step where compiled) at its
  batch, as the TPU compiler analysed it."""
  rows = ["| run | slice | method, dtype | per chip / global batch | train: HBM peak (compiler) "
          "| args + outputs - donated + temps | GFLOP / step / chip | collectives per step "
          "| activation bytes | eval: HBM peak (batch / chip) | compile (train) |",
          "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
  for name, r in _reports():
    train = r["train_step"]
    method = _method_name(r)
    chips = f"{r['topology']} ({r['devices']} x {r['device_kind']}, {r['processes']} host(s))"
    batch = f"{r['per_device_batch_size']} / {r['global_batch_size']}"
    if train.get("out_of_memory"):
      need = train["out_of_memory"]["needed_bytes"]
      rows.append(f"| {name} | {chips} | {method}, {r['dtype']} | {batch} | does not fit: "
                  f"needs {need / GIB:.2f} of {r['hbm_usable_bytes_per_device'] / GIB:.2f} GiB "
                  f"| - | - | - | - | - | {train['compile_s']:.0f} s |")
      continue
    memory = train["memory"]
    evaluation = r.get("eval_step")
    eval_cell = ("-" if evaluation is None else
                 f"{evaluation['memory']['peak_memory_in_bytes'] / GIB:.2f} GiB "
                 f"({r['eval_batch_size'] // r['devices']})")
    rows.append(
        f"| {name} | {chips} | {method}, {r['dtype']} | {batch} "
        f"| {memory['peak_memory_in_bytes'] / GIB:.2f} of "
        f"{r['hbm_usable_bytes_per_device'] / GIB:.2f} GiB | {memory['peak_bytes'] / GIB:.2f} GiB "
        f"| {train['flops_per_step_per_device'] / 1e9:,.1f} | {_collectives(train)} "
        f"| {train['communication']['data_moving_bytes']} | {eval_cell} "
        f"| {train['compile_s']:.0f} s |")
  return "\n".join(rows)


def fit_table() -> str:
  """Every finished fit: the largest per-chip batch per dtype and remat setting."""
  from mixskd_jax.bench.aot_table import largest_cell  # pylint: disable=import-outside-toplevel
  rows = ["| method | slice | dtype | remat_branches | largest per chip "
          "| HBM peak there (compiler) | usable HBM | global batch, lr on this slice "
          "| compiles (batches tried) |",
          "|---|---|---|---|---:|---:|---:|---|---|"]
  for path in sorted(glob.glob(os.path.join(OUT, "fit_*.json"))):
    with open(path) as f:
      fit = json.load(f)
    for row in fit["rows"]:
      tried = ", ".join(f"{b}{'' if m['fits'] else ' x'}" for b, m in row["measured"].items())
      peak = row.get("peak_bytes")
      rows.append(
          f"| {_method_name(fit)} | {fit['topology']} ({fit['device_kind']}) | {row['dtype']} | "
          f"{row['remat_branches']} | "
          f"{largest_cell(row['largest_per_device_batch'], row.get('boundary_found', True))} | "
          f"{'-' if peak is None else f'{peak / GIB:.2f} GiB'} | "
          f"{fit['hbm_usable_bytes'] / GIB:.2f} GiB | "
          f"{row.get('global_batch_size', '-')}, {row.get('learning_rate', float('nan')):g} | "
          f"{row['compiles']} ({tried}) |")
  return "\n".join(rows)


IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 305  # the official MixSKD run
MFUS = (0.20, 0.35)  # about what record ResNet-50 training reaches; the project's aim
PROJECTED_CHIPS = 64


def projection_table() -> str:
  """Estimates, not measurements: step and training time from the compiler's FLOPs per chip
  at the recipe's 16 clean images per chip, an assumed MFU of the dense bf16 datasheet peak,
  and ImageNet's 1,281,167 training images over 305 epochs on a 64-chip slice."""
  from mixskd_jax.bench.host import datasheet_peak_tflops  # pylint: disable=import-outside-toplevel
  rows = [f"| generation | bf16 peak / chip (datasheet) | GFLOP / step / chip (compiler) "
          f"| step @{MFUS[0]:.0%} / @{MFUS[1]:.0%} MFU | clean images / s / chip @{MFUS[1]:.0%} "
          f"| {EPOCHS} epochs on {PROJECTED_CHIPS} chips @{MFUS[0]:.0%} / @{MFUS[1]:.0%} |",
          "|---|---:|---:|---:|---:|---:|"]
  for name, r in _reports():
    if not (name.startswith("mixskd_") and name.endswith("_f32") and r["devices"] == 4):
      continue
    peak = datasheet_peak_tflops(r["device_kind"])
    flops = r["train_step"].get("flops_per_step_per_device")
    if peak is None or flops is None:
      continue
    per_chip = r["per_device_batch_size"]
    steps = [flops / (mfu * peak * 1e12) for mfu in MFUS]
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // (per_chip * PROJECTED_CHIPS)
    hours = [s * steps_per_epoch * EPOCHS / 3600 for s in steps]
    generation = r["topology"].split(":")[0]
    rows.append(f"| {generation} ({r['device_kind']}) | {peak:g} TFLOP/s | {flops / 1e9:,.1f} "
                f"| {steps[0] * 1e3:.1f} / {steps[1] * 1e3:.1f} ms "
                f"| {per_chip / steps[1]:,.0f} | {hours[0]:.1f} / {hours[1]:.1f} h |")
  return "\n".join(rows)


def tables() -> str:
  return (f"<!-- tpu_aot: steps -->\n{step_table()}\n<!-- /tpu_aot -->\n\n"
          f"<!-- tpu_aot: fits -->\n{fit_table()}\n<!-- /tpu_aot -->\n\n"
          f"<!-- tpu_aot: projections -->\n{projection_table()}\n<!-- /tpu_aot -->")


SCALING = os.path.join(os.path.dirname(__file__), "SCALING.md")
_BLOCK = re.compile(r"<!-- tpu_aot: (\w+) -->\n.*?<!-- /tpu_aot -->", re.S)


def write_tables(path: str = SCALING) -> None:
  """Replaces each `<!-- tpu_aot: NAME -->` ... `<!-- /tpu_aot -->` block of `path` with the
  table of that name rendered now."""
  blocks = {m.group(1): m.group(0) for m in _BLOCK.finditer(tables())}
  with open(path) as f:
    text = f.read()
  text = _BLOCK.sub(lambda m: blocks[m.group(1)], text)
  with open(path, "w") as f:
    f.write(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--list", action="store_true", help="print the commands and exit")
  parser.add_argument("--tables", action="store_true", help="print SCALING.md's tables")
  parser.add_argument("--write", action="store_true", help="write them into SCALING.md")
  args = parser.parse_args()
  if args.tables:
    print(tables())
    return
  if args.write:
    write_tables()
    return
  only = set(filter(None, args.only.split(",")))
  os.makedirs(OUT, exist_ok=True)
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  for name, config, topology, extra in RUNS:
    if only and name not in only:
      continue
    json_out = os.path.join(OUT, f"{name}.json")
    if "--fit" in extra:
      # Each compile of a fit is logged as it finishes; a stopped fit resumes from there.
      extra = (*extra, f"--fit_log={os.path.relpath(os.path.join(OUT, name + '.compiles.jsonl'), root)}")
    cmd = command(config, topology, extra, os.path.relpath(json_out, root))
    if args.list:
      print(" ".join(cmd[1:]))
      continue
    if os.path.exists(json_out):
      continue
    start = time.time()
    with open(os.path.join(OUT, f"{name}.txt"), "a") as log:
      rc = subprocess.call(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit {rc} in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
