"""The fair transfer suite's report: which pre-training gives the best start, and why.

Reads each backbone's protocol results (`<workdir>/<source>/seed<k>/transfer/results.json`,
written by `experiments.transfer_fair`) and its pre-training's own test top-1, and writes:

* `transfer.md`: per source, the linear probe's and fine-tuning's test top-1 and the
  segmentation mIoU at the validation-chosen settings, mean ± sd over seeds, each with its
  paired difference to the cross-entropy backbone;
* `vs_full.md`: the same for `full` and the rows that change one part of it, paired against
  `full` itself (does removing or changing that part help?);
* `choices.md`: the chosen BatchNorm mode and learning rate per seed, and how often the choice
  sat at an end of the learning-rate grid;
* `diagnosis.md`: the backbones' weight norms, BatchNorm running variances and feature scale
  next to their transfer differences;
* `transfer_fair.png`: the three differences per source, seeds as dots.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from experiments import analysis, protocol, tables
from experiments.transfer_fair import eval_dir
from mixskd_jax.transfer import run as transfer_run

BASELINE = "cross_entropy"
FULL = "mixskd_full"  # the rows that change one part of it are named full_*
TASKS = (("linear_probe", "linear probe top-1 %"), ("fine_tune", "fine-tuned top-1 %"),
         ("segmentation", "segmentation mIoU %"))
PARTS = ("stem", "layer1", "layer2", "layer3")


def load(runs: Sequence[protocol.Run], workdir: str) -> dict[str, dict[int, dict]]:
  """source -> seed -> {'pretrain_top1', 'transfer' (the protocol's results.json)} for every
  run whose protocol results exist."""
  out: dict[str, dict[int, dict]] = {}
  for run in runs:
    path = os.path.join(eval_dir(workdir, run), transfer_run.RESULTS_FILE)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      transfer = json.load(f)
    with open(os.path.join(workdir, run.name, "results.json")) as f:
      pretrain = json.load(f)
    out.setdefault(run.spec.name, {})[run.seed] = {
        "pretrain_top1": pretrain["final"]["eval/top1/backbone"], "transfer": transfer}
  return out


def metric(loaded: dict, source: str, task: str) -> dict[int, float]:
  """seed -> the task's test metric for `source` (seeds where the task ran)."""
  return {seed: r["transfer"]["tasks"][task]["test_metric"]
          for seed, r in loaded.get(source, {}).items() if task in r["transfer"]["tasks"]}


def _cell(values: dict[int, float]) -> str:
  if not values:
    return "not run"
  mean, std = tables.mean_std(list(values.values()))
  return f"{tables.fmt(mean, std)} ({len(values)})"


def _diff_cell(diff: dict | None) -> str:
  if diff is None:
    return ""
  mark = "**" if diff["significant"] else ""
  return (f"{mark}{diff['mean']:+.2f}{mark} (p {diff['p']:.3f}, {diff['wins']}/{diff['n']} "
          "seeds)")


def transfer_table(sources: Sequence[str], loaded: dict, baseline: str = BASELINE,
                   label: str = "CE") -> str:
  """Per source: its own top-1 and each task's test metric with its paired difference to
  `baseline` (shown as "vs `label`")."""
  head = "| pre-training | its top-1 % (classes 0-4) | " + " | ".join(
      f"{title} | vs {label}" for _, title in TASKS) + " |"
  lines = [head, "|" + "---|" * (2 + 2 * len(TASKS))]
  for source in sources:
    if source not in loaded:
      continue
    own = {s: r["pretrain_top1"] for s, r in loaded[source].items()}
    cells = [_cell(own)]
    for task, _ in TASKS:
      values = metric(loaded, source, task)
      cells.append(_cell(values))
      cells.append("" if source == baseline else _diff_cell(
          analysis.paired_difference(values, metric(loaded, baseline, task))))
    lines.append(f"| {source} | " + " | ".join(cells) + " |")
  return ("Test metric at the setting chosen on validation, mean ± sd (number of seeds); "
          f"\"vs {label}\": paired by seed against the {baseline} backbone (bold: p < 0.05)."
          "\n\n" + "\n".join(lines) + "\n")


def choices_table(sources: Sequence[str], loaded: dict) -> str:
  lines = ["| pre-training | " + " | ".join(title.split(" top-1")[0].split(" mIoU")[0]
                                         for _, title in TASKS) + " |",
           "|" + "---|" * (1 + len(TASKS))]
  edges = {task: [0, 0] for task, _ in TASKS}
  for source in sources:
    cells = []
    for task, _ in TASKS:
      picks = []
      for seed in sorted(loaded.get(source, {})):
        result = loaded[source][seed]["transfer"]["tasks"].get(task)
        if result is None:
          continue
        grid = sorted({row["lr"] for row in result["grid"]})
        lr = result["chosen"]["lr"]
        edges[task][0] += lr in (grid[0], grid[-1])
        edges[task][1] += 1
        picks.append(f"{result['chosen']['bn']} {lr:g}")
      cells.append(", ".join(picks) or "not run")
    if source in loaded:
      lines.append(f"| {source} | " + " | ".join(cells) + " |")
  edge_text = "; ".join(f"{task}: {n} of {total}" for task, (n, total) in edges.items() if total)
  return ("BatchNorm mode and peak learning rate chosen on validation, per seed (seed 0 "
          "first).\n\n" + "\n".join(lines) + f"\n\nChoices at an end of the grid: {edge_text}.\n")


def _mean_over_seeds(loaded: dict, source: str, pick) -> float:
  return float(np.mean([pick(r["transfer"]["diagnostics"]) for r in loaded[source].values()]))


def diagnosis_table(sources: Sequence[str], loaded: dict) -> str:
  cols = ([f"‖W‖ {p}" for p in PARTS] + ["BN var max stem", "BN var max layer1"]
          + [f"RMS {p}" for p in ("layer1", "layer2", "layer3", "pooled")]
          + ["probe vs CE", "fine-tune vs CE", "mIoU vs CE"])
  lines = ["| pre-training | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
  for source in sources:
    if source not in loaded:
      continue
    vals = [_mean_over_seeds(loaded, source, lambda d, p=p: d["weight_norm"][p]) for p in PARTS]
    vals += [_mean_over_seeds(loaded, source, lambda d, p=p: d["batchnorm"][p]["max_var"])
             for p in ("stem", "layer1")]
    vals += [_mean_over_seeds(loaded, source, lambda d, p=p: d["feature_rms"][p])
             for p in ("layer1", "layer2", "layer3", "pooled")]
    cells = [f"{v:.3g}" for v in vals]
    for task, _ in TASKS:
      mine, base = metric(loaded, source, task), metric(loaded, BASELINE, task)
      shared = sorted(set(mine) & set(base))
      cells.append(f"{np.mean([mine[s] - base[s] for s in shared]):+.2f}"
                   if shared and source != BASELINE else "")
    lines.append(f"| {source} | " + " | ".join(cells) + " |")
  return ("Per backbone, mean over its seeds: L2 norm of every convolution kernel of a part "
          "(‖W‖), the largest BatchNorm running variance of the stem and of the first stage, "
          "the root mean square of each stage's output and of the pooled features on the "
          "downstream training images (inference mode, pre-training statistics), and the "
          "difference to the cross-entropy backbone on the seeds both have.\n\n"
          + "\n".join(lines) + "\n")


def cost_text(loaded: dict) -> str:
  """What the protocol cost per backbone: median and range of each task's wall time."""
  parts, total = [], 0.0
  for task, title in TASKS:
    times = [r["transfer"]["tasks"][task].get("wall_time_s") for seeds in loaded.values()
             for r in seeds.values() if task in r["transfer"]["tasks"]]
    times = [t for t in times if t is not None]
    if times:
      total += float(np.sum(times))
      parts.append(f"{title.split(' top-1')[0].split(' mIoU')[0]} {np.median(times):.0f} s "
                   f"(range {min(times):.0f}-{max(times):.0f})")
  count = sum(len(seeds) for seeds in loaded.values())
  return (f"- Transfer protocol: {count} backbone(s) evaluated, {total / 60:.1f} min in all; per "
          f"backbone (median wall time, on the same 2 cores as whatever else ran): "
          f"{', '.join(parts)}.\n")


def plot(sources: Sequence[str], loaded: dict, out: str) -> str | None:
  names = [s for s in sources if s in loaded and s != BASELINE]
  if not names or BASELINE not in loaded:
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 0.45 * len(names) + 1.5),
                           sharey=True)
  for ax, (task, title) in zip(axes, TASKS):
    base = metric(loaded, BASELINE, task)
    for i, name in enumerate(names):
      mine = metric(loaded, name, task)
      diffs = [mine[s] - base[s] for s in sorted(set(mine) & set(base))]
      if diffs:
        ax.barh(i, np.mean(diffs), color="tab:blue" if np.mean(diffs) >= 0 else "tab:red",
                alpha=0.6)
        ax.plot(diffs, [i] * len(diffs), "k.", markersize=4)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_title(f"{title.replace(' %', '')}: vs cross-entropy (points)", fontsize=9)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, "transfer_fair.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return os.path.basename(path)


def write(suite: protocol.Suite, runs: Sequence[protocol.Run], workdir: str,
          results_dir: str) -> tuple[dict, list[str], str]:
  """Writes the tables and the plot; returns (rows for summary.json, plots written, a line on
  the protocol's cost for RUN.md)."""
  loaded = load(runs, workdir)
  sources = [m.name for m in suite.methods]
  for name, title, text in (
      ("transfer.md", "Fair transfer", transfer_table(sources, loaded)),
      ("vs_full.md", "Against MixSKD `full`: what removing or changing one part does",
       transfer_table([s for s in sources if s == FULL or s.startswith("full_")], loaded,
                      baseline=FULL, label="full")),
      ("choices.md", "Settings chosen on validation", choices_table(sources, loaded)),
      ("diagnosis.md", "What the backbones look like", diagnosis_table(sources, loaded))):
    with open(os.path.join(results_dir, name), "w") as f:
      f.write(f"# {title}: {suite.description}\n\n{text}")
  written = plot(sources, loaded, results_dir)
  rows = {source: {str(seed): r for seed, r in seeds.items()} for source, seeds in loaded.items()}
  return rows, [written] if written else [], cost_text(loaded)
