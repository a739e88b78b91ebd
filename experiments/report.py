"""Reads a suite's finished runs and writes its tables, plots and run record.

Files written to the results directory:
* `table.md`: main table. Test top-1 of the backbone head (the network used at inference)
  after the last epoch, mean +- sample std over seeds; the best epoch's top-1 (the official
  scripts' protocol, selected on the test set, so optimistic); expected calibration error
  of the backbone (15 bins, %); measured training step time (median of the timing phase,
  experiments/timing.py, else of the runs) and its ratio to cross-entropy.
* `ablation.md`: MixSKD `full` with one part removed (and the investigation rows), the change
  in top-1 paired by seed.
* `comparisons.md`: every row against cross-entropy and MixSKD `full`, paired by seed
  (experiments/analysis.py); `convergence.md`: training-set accuracy and late test movement;
  `teacher.md`: the self-teacher's lead over the backbone; `gate.md` (rows trained with
  `objective.kl_gate`): how often the self-teacher's KL was on, and the lead it was gated on.
* `summary.json`: every number above, per seed.
* `accuracy_vs_epoch.png`, `mixskd_heads.png`, `mixskd_loss_terms.png`, `reliability.png`,
  `teacher_lead.png`.
* A transfer suite writes `transfer.md` and `transfer.png` instead (experiments/transfer.py).
* `RUN.md`: the exact command, library versions, machine and wall times.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import textwrap
from typing import Any, Sequence

import numpy as np

from experiments import analysis, protocol, tables, transfer, transfer_fair_report
from mixskd_jax.train.steps import expected_calibration_error

MIXSKD_HEADS_RUN = "mixskd_full"
RELIABILITY_RUNS = ("cross_entropy", "mixup", "mixskd_full")
LOSS_TERMS = ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
              "feature_mse", "discriminator", "loss")


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  # A run killed and resumed may log a step twice; keep the latest record of each step.
  by_step = {r["step"]: r for r in records}
  return [by_step[s] for s in sorted(by_step)]


def load_run(workdir: str, run: protocol.Run) -> dict[str, Any] | None:
  """The run's results, histories and timing, or None if it has not finished."""
  run_dir = os.path.join(workdir, run.name)
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  if not results.get("finished"):
    return None
  timing_path = os.path.join(run_dir, "experiment_timing.json")
  timing = {}
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      timing = json.load(f)
  return {"results": results, "eval": _read_jsonl(os.path.join(run_dir, "eval_history.jsonl")),
          "train": _read_jsonl(os.path.join(run_dir, "train_history.jsonl")),
          "timing": timing}


def _mean_confidence(calibration: dict | None) -> float | None:
  """The backbone's mean max-softmax probability on the test set, in %, from its bins."""
  if not calibration or not sum(calibration["count"]):
    return None
  return 100.0 * sum(calibration["confidence"]) / sum(calibration["count"])


def summarize(suite: protocol.Suite, runs: Sequence[protocol.Run], loaded: dict[str, dict],
              step_timing: dict[str, dict] | None = None) -> dict[str, Any]:
  """Per row: per-seed final/best top-1, ECE, step time; then means, stds and cost vs CE.

  The step time is the timing phase's median (`step_timing`, all methods measured back to
  back) where there is one, else the median over seeds of the runs' own measurement.
  """
  rows: dict[str, dict] = {}
  for run in runs:
    data = loaded.get(run.name)
    if data is None:
      continue
    r = data["results"]
    row = rows.setdefault(run.spec.name, {"ablation": run.ablation, "seeds": {}})
    row["seeds"][run.seed] = {
        "final_top1": r["final"]["eval/top1/backbone"],
        "best_top1": r["best_backbone_top1"],
        "max_over_heads_best": r["best_max_over_heads_reference_protocol"],
        "ece": r["final"].get("eval/ece/backbone"),
        "mean_confidence": _mean_confidence(r.get("calibration")),
        # Every head's (and a MixSKD self-teacher's) last-epoch top-1, for the discussion.
        "final_top1_by_head": {k.split("/")[-1]: v for k, v in r["final"].items()
                               if k.startswith("eval/top1/")},
        "step_time_s": r.get("train_step_time_s"),
        "wall_time_s": data["timing"].get("wall_time_s"),
        # Convergence: the last epoch's training-batch accuracy, how far test top-1 moves
        # over the last 20% of epochs, and (MixSKD) the self-teacher's lead over the backbone.
        "train_accuracy_last_epoch": analysis.final_train_accuracy(
            data["train"], after_step=r["num_steps"] * (1 - 1 / run.config.num_epochs)),
        "late_movement": analysis.late_movement(data["eval"], run.config.num_epochs),
        "train_set_top1": r["final"].get("train_set/top1/backbone"),
        "teacher_lead": analysis.teacher_lead(data["eval"]),
        "kl_gate": analysis.gate_history(
            data["train"], steps_per_epoch=r["num_steps"] / run.config.num_epochs),
    }
  for row in rows.values():
    seeds = row["seeds"].values()
    for key in ("final_top1", "best_top1", "max_over_heads_best", "ece"):
      values = [s[key] for s in seeds if s[key] is not None]
      if values:
        row[key + "_mean"], row[key + "_std"] = tables.mean_std(values)
    times = [s["step_time_s"] for s in seeds if s["step_time_s"]]
    row["in_run_step_time_s_median"] = float(np.median(times)) if times else None
    row["step_time_s_median"] = row["in_run_step_time_s_median"]
    row["step_time_source"] = "runs"
  for name, measured in (step_timing or {}).items():
    if name in rows:
      rows[name]["step_time_s_median"] = measured["median_s"]
      rows[name]["step_time_source"] = "timing phase"
  reference = rows.get("cross_entropy", {}).get("step_time_s_median")
  for row in rows.values():
    t = row["step_time_s_median"]
    row["cost_vs_cross_entropy"] = t / reference if t and reference else None
  return rows


def _plots(suite: protocol.Suite, runs: Sequence[protocol.Run], loaded: dict[str, dict],
           out: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  by_spec: dict[str, list[dict]] = {}
  for run in runs:
    if run.name in loaded and not run.ablation:
      by_spec.setdefault(run.spec.name, []).append(loaded[run.name])

  # Test accuracy vs epoch, mean over seeds with the min-max band.
  fig, ax = plt.subplots(figsize=(8, 5))
  for spec in suite.methods:
    histories = by_spec.get(spec.name)
    if not histories:
      continue
    n = min(len(h["eval"]) for h in histories)
    epochs = [e["epoch"] for e in histories[0]["eval"][:n]]
    acc = np.array([[e["eval/top1/backbone"] for e in h["eval"][:n]] for h in histories])
    style = "-" if spec.method == "mixskd" else "--"
    line, = ax.plot(epochs, acc.mean(0), style, label=spec.name, marker=".")
    ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
  ax.set(xlabel="epoch", ylabel="test top-1 % (backbone head)",
         title=textwrap.fill(f"{suite.description}: mean over seeds, band = min-max", 80))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  written.append(_save(fig, out, "accuracy_vs_epoch.png"))

  mixskd = by_spec.get(MIXSKD_HEADS_RUN)
  if mixskd:
    first = mixskd[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    heads = sorted({k.split("/")[-1] for k in first["eval"][0] if k.startswith("eval/top1/")
                    and "max_over" not in k})
    epochs = [e["epoch"] for e in first["eval"]]
    for head in heads:
      ax.plot(epochs, [e[f"eval/top1/{head}"] for e in first["eval"]], marker=".", label=head)
    ax.set(xlabel="epoch", ylabel="test top-1 %",
           title=f"{MIXSKD_HEADS_RUN}, seed {mixskd_seed(runs, loaded)}: every head")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out, "mixskd_heads.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [t["step"] for t in first["train"]]
    for term in LOSS_TERMS:
      key = f"train/{term}"
      if first["train"] and key in first["train"][0]:
        ax.plot(steps, [t[key] for t in first["train"]], label=term,
                linewidth=2.5 if term == "loss" else 1.2)
    ax.set(xlabel="step", ylabel="value (unweighted; mean over the logging window)",
           yscale="log", title=f"{MIXSKD_HEADS_RUN}: loss terms during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "mixskd_loss_terms.png"))

  # The self-teacher's lead over the backbone during training, every MixSKD row (ablations
  # and investigations included), mean over seeds. Not reference_cifar's: its teacher never
  # trains (chance level, 60-80 points behind), which would flatten every other curve.
  leads: dict[str, list] = {}
  for run in runs:
    if (run.spec.method == "mixskd" and run.spec.variant != "reference_cifar"
        and run.name in loaded):
      lead = analysis.teacher_lead(loaded[run.name]["eval"])
      if lead:
        leads.setdefault(run.spec.name, []).append(lead)
  if leads:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, per_seed in leads.items():
      n = min(len(lead) for lead in per_seed)
      epochs = [e for e, _ in per_seed[0][:n]]
      gaps = np.array([[g for _, g in lead[:n]] for lead in per_seed])
      ax.plot(epochs, gaps.mean(0), marker=".", label=f"{name} ({len(per_seed)} seeds)",
              linestyle="-" if not name.startswith("full_") else "--")
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set(xlabel="epoch", ylabel="self-teacher top-1 - backbone top-1 (test, points)",
           title="Does the self-teacher lead the head it distils into?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(_save(fig, out, "teacher_lead.png"))

  # Reliability diagram: bin sums pooled over seeds, final epoch.
  present = [name for name in RELIABILITY_RUNS if by_spec.get(name)]
  if present:
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 4), squeeze=False)
    for ax, name in zip(axes[0], present):
      cal = [h["results"]["calibration"] for h in by_spec[name] if h["results"].get("calibration")]
      count = np.sum([c["count"] for c in cal], axis=0)
      conf = np.sum([c["confidence"] for c in cal], axis=0)
      correct = np.sum([c["correct"] for c in cal], axis=0)
      bins = len(count)
      centres = (np.arange(bins) + 0.5) / bins
      safe = np.maximum(count, 1)
      ax.bar(centres, np.where(count > 0, correct / safe, 0), width=1 / bins, edgecolor="k",
             label="accuracy")
      ax.plot([0, 1], [0, 1], "k--", linewidth=1)
      ax.plot(centres[count > 0], (conf / safe)[count > 0], "r.", label="mean confidence")
      ece = expected_calibration_error(count, conf, correct)
      ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{name}: ECE {ece:.2f}%")
      ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("accuracy (backbone head)")
    written.append(_save(fig, out, "reliability.png"))
  return written


def mixskd_seed(runs, loaded) -> int | None:
  for run in runs:
    if run.spec.name == MIXSKD_HEADS_RUN and run.name in loaded and not run.ablation:
      return run.seed
  return None


def _save(fig, out: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=110)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.close(fig)
  return name


def environment() -> dict[str, Any]:
  """Library versions and the machine, as the report records them."""
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                  "tensorflow-cpu", "tensorflow", "tensorflow-datasets", "ml-collections",
                  "clu"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      pass
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  memory = None
  try:
    with open("/proc/meminfo") as f:
      memory = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
  except (OSError, ValueError, IndexError):
    pass
  try:
    import jax  # pylint: disable=import-outside-toplevel
    devices = [str(d.device_kind) for d in jax.devices()]
  except Exception:  # pylint: disable=broad-except
    devices = []
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=os.path.dirname(__file__)).stdout.strip()
  except OSError:
    commit = ""
  return {"python": platform.python_version(), "packages": versions, "cpu": cpu,
          "cpu_count": os.cpu_count(), "memory": memory, "platform": platform.platform(),
          "jax_devices": devices, "git_commit": commit}


def _comparison_report(suite, runs, loaded, rows, results_dir) -> list[str]:
  """Writes the comparison suite's tables and plots; returns the plots written."""
  main = tables.main_table(suite, rows)
  ablation = tables.ablation_table(suite, rows)
  with open(os.path.join(results_dir, "table.md"), "w") as f:
    f.write(f"# {suite.description}\n\n{main}")
  with open(os.path.join(results_dir, "ablation.md"), "w") as f:
    f.write(f"# MixSKD `full` ablation: {suite.description}\n\n{ablation}")
  extra = {"comparisons.md": ("Paired comparisons", tables.comparison_table(suite, rows)),
           "convergence.md": ("Convergence", tables.convergence_table(suite, rows)),
           "teacher.md": ("The self-teacher against the backbone",
                          tables.teacher_table(suite, rows)),
           "gate.md": ("When the self-teacher's KL was on", tables.gate_table(suite, rows))}
  for name, (title, text) in extra.items():
    if text:
      with open(os.path.join(results_dir, name), "w") as f:
        f.write(f"# {title}: {suite.description}\n\n{text}")
  return _plots(suite, runs, loaded, results_dir)


def write_report(suite: protocol.Suite, runs: Sequence[protocol.Run], workdir: str,
                 results_dir: str, *, command: str, invocation_wall_time_s: float) -> dict:
  """Writes every file listed in the module docstring; returns the summary."""
  os.makedirs(results_dir, exist_ok=True)
  loaded = {run.name: data for run in runs if (data := load_run(workdir, run)) is not None}
  step_timing = None
  timing_path = os.path.join(workdir, "step_timing.json")
  if os.path.exists(timing_path):
    with open(timing_path) as f:
      step_timing = json.load(f)
  rows = summarize(suite, runs, loaded, step_timing)
  extra_run_md = ""
  if suite.kind == "transfer_fair":
    rows["transfer"], plots, extra_run_md = transfer_fair_report.write(suite, runs, workdir,
                                                                       results_dir)
  elif suite.kind == "transfer":
    plots = transfer.write(suite, rows, results_dir)
  else:
    plots = _comparison_report(suite, runs, loaded, rows, results_dir)
  env = environment()
  total = sum(d["timing"].get("wall_time_s") or 0.0 for d in loaded.values())
  summary = {"suite": suite.name, "description": suite.description, "command": command,
             "runs_finished": len(loaded), "runs_listed": len(runs),
             "sum_of_run_wall_times_s": total,
             "this_invocation_wall_time_s": invocation_wall_time_s,
             "environment": env, "rows": rows, "plots": plots, "step_timing": step_timing}
  with open(os.path.join(results_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=str)
  packages = "\n".join(f"- {k} {v}" for k, v in env["packages"].items())
  with open(os.path.join(results_dir, "RUN.md"), "w") as f:
    f.write(
        f"# How these results were made\n\n"
        f"Command (from the repository root):\n\n```bash\n{command}\n```\n\n"
        f"- Protocol: {suite.description}; seeds {list(suite.seeds)}, ablation seeds "
        f"{list(suite.ablation_seeds)}. Full config of every run: "
        f"`<workdir>/<method>/seed<k>/config.json`.\n"
        f"- Runs finished: {len(loaded)} of {len(runs)}.\n"
        f"- Wall time, summed over the runs (start-up, compilation, training, evaluation, "
        f"all invocations): {total / 60:.1f} min. This invocation: "
        f"{invocation_wall_time_s / 60:.1f} min.\n{extra_run_md}"
        f"- Machine: {env['cpu']}, {env['cpu_count']} CPUs, {env['memory']} memory, "
        f"{env['platform']}; JAX devices: {', '.join(env['jax_devices'])}.\n"
        f"- Python {env['python']}; git commit when this report was written: "
        f"{env['git_commit']}.\n\n"
        f"Packages:\n\n{packages}\n")
  return summary
