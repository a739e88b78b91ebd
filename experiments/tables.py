"""The report's tables as markdown, from the rows `report.summarize` builds: the main table,
the ablation, the paired comparisons over seeds, the convergence check and the self-teacher
investigation (its lead over the backbone, and when a gated run's KL was on)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from experiments import analysis, protocol


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
  return float(np.mean(values)), std


def fmt(mean: float, std: float, digits: int = 2) -> str:
  if np.isnan(std):
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def final_top1(rows: dict[str, dict], name: str) -> dict[int, float]:
  """Seed -> final test top-1 of the row `name` ({} when it has no finished run)."""
  return {seed: s["final_top1"] for seed, s in rows.get(name, {}).get("seeds", {}).items()}


def _paired_cells(diff: dict[str, Any] | None) -> str:
  """'| +0.52 | [-0.1, +1.1] | 0.071 | 3/3 |' (mean difference, 95% CI, p, seeds won)."""
  if diff is None:
    return "| | | | |"
  lo, hi = diff["ci95"]
  mark = "**" if diff["significant"] else ""
  return (f"| {mark}{diff['mean']:+.2f}{mark} | [{lo:+.2f}, {hi:+.2f}] | {diff['p']:.3f} "
          f"| {diff['wins']}/{diff['n']} |")


def main_table(suite: protocol.Suite, rows: dict[str, dict]) -> str:
  lines = [
      "| method | top-1 % (last epoch) | seeds | top-1 % (best epoch) | MixSKD max over heads, "
      "best epoch | ECE % | step (ms) | cost vs CE |",
      "|---|---|---|---|---|---|---|---|"]
  for spec in suite.methods:
    row = rows.get(spec.name)
    if row is None:
      lines.append(f"| {spec.name} | not run | | | | | | |")
      continue
    heads = (fmt(row["max_over_heads_best_mean"], row["max_over_heads_best_std"])
             if spec.method == "mixskd" else "")
    step = row["step_time_s_median"]
    cost = row["cost_vs_cross_entropy"]
    lines.append(
        f"| {spec.name} | {fmt(row['final_top1_mean'], row['final_top1_std'])} "
        f"| {len(row['seeds'])} | {fmt(row['best_top1_mean'], row['best_top1_std'])} "
        f"| {heads} | {fmt(row['ece_mean'], row['ece_std'])} "
        f"| {'' if step is None else f'{1000 * step:.0f}'} "
        f"| {'' if cost is None else f'{cost:.2f}x'} |")
  return "\n".join(lines) + "\n"


def ablation_table(suite: protocol.Suite, rows: dict[str, dict]) -> str:
  """Each ablation's final top-1 and its paired difference to `full` over the seeds both
  have (a single seed: the plain difference)."""
  full = final_top1(rows, "mixskd_full")
  lines = ["| MixSKD `full` | top-1 % (last epoch) | change vs full | 95% CI | p (paired t) "
           "| seeds above full |", "|---|---|---|---|---|---|"]
  base = [full[s] for s in suite.ablation_seeds if s in full]
  if base:
    lines.append(f"| full (all terms) | {fmt(*mean_std(base))} | | | | |")
  for spec in suite.ablations + suite.investigations:
    values = {s: v for s, v in final_top1(rows, spec.name).items() if s in suite.ablation_seeds}
    if not values:
      lines.append(f"| {spec.name} | not run | | | | |")
      continue
    shown = fmt(*mean_std(list(values.values())))
    shared = [s for s in values if s in full]
    diff = analysis.paired_difference(values, full)
    if diff is not None:
      lines.append(f"| {spec.name} | {shown} {_paired_cells(diff)}")
    elif shared:
      delta = np.mean([values[s] - full[s] for s in shared])
      lines.append(f"| {spec.name} | {shown} | {delta:+.2f} | | | |")
    else:
      lines.append(f"| {spec.name} | {shown} | | | | |")
  return (f"Seed(s) {', '.join(map(str, suite.ablation_seeds))}; `full` is the main table's run "
          "of the same seed. Change: mean over seeds of (ablation - full), paired by seed; bold "
          f"where the paired t-test gives p < {analysis.SIGNIFICANCE_LEVEL}.\n\n"
          + "\n".join(lines) + "\n")


def comparison_table(suite: protocol.Suite, rows: dict[str, dict],
                     references: Sequence[str] = ("cross_entropy", "mixskd_full")) -> str:
  """Every main-table row against each reference row: the paired difference of final top-1
  over seeds, its 95% CI, the paired t-test's p and the seeds won."""
  out = []
  for reference in references:
    ref = final_top1(rows, reference)
    if not ref:
      continue
    lines = [f"| method - {reference} | difference (points) | 95% CI | p (paired t) "
             "| seeds above |", "|---|---|---|---|---|"]
    for spec in suite.methods:
      if spec.name == reference or spec.name not in rows:
        continue
      lines.append(f"| {spec.name} "
                   f"{_paired_cells(analysis.paired_difference(final_top1(rows, spec.name), ref))}")
    out.append("\n".join(lines))
  return ("Final test top-1 of the backbone head, paired by seed (same seed: same "
          "initialization, data order and draws for every method). Bold: p < "
          f"{analysis.SIGNIFICANCE_LEVEL}, a difference larger than the seed-to-seed noise.\n\n"
          + "\n\n".join(out) + "\n")


def _seed_values(row: dict, key: str) -> list[float]:
  return [s[key] for s in row["seeds"].values() if s.get(key) is not None]


def convergence_table(suite: protocol.Suite, rows: dict[str, dict]) -> str:
  """Per row: last epoch's training-batch accuracy and how far test top-1 moves over the last
  20% of epochs (mean ± sd over seeds)."""
  lines = ["| method | training-set top-1 % (eval mode, end) | training-batch accuracy %, "
           "last epoch | test top-1 movement over the last 20% of epochs (points, max - min) |",
           "|---|---|---|---|"]
  for spec in suite.methods + suite.ablations + suite.investigations:
    row = rows.get(spec.name)
    if row is None:
      continue
    cells = []
    for key in ("train_set_top1", "train_accuracy_last_epoch", "late_movement"):
      values = _seed_values(row, key)
      cells.append(f"{fmt(*mean_std(values))} ({len(values)})" if values else "")
    lines.append(f"| {spec.name} | " + " | ".join(cells) + " |")
  return ("Training-set top-1: every training example once, unaugmented, BatchNorm in "
          "inference mode, after the last epoch (`eval_on_train_set`). Training-batch accuracy: "
          "the clean rows of each training batch, in train mode before the step's update, as "
          "the step logs it (mixup, CutMix: the batch the network sees). In parentheses: the "
          "seeds with the value.\n\n" + "\n".join(lines) + "\n")


def teacher_table(suite: protocol.Suite, rows: dict[str, dict]) -> str:
  """For every MixSKD row: the self-teacher's lead over the backbone (test top-1 points) at
  a few points of training, and from which epoch on it leads for good."""
  names = [s.name for s in suite.methods + suite.ablations + suite.investigations
           if s.method == "mixskd" and s.name in rows]
  if not names:
    return ""
  epochs = sorted({e for n in names for s in rows[n]["seeds"].values()
                   for e, _ in s["teacher_lead"]})
  if not epochs:
    return ""
  picks = sorted({epochs[0], epochs[len(epochs) // 4], epochs[len(epochs) // 2], epochs[-1]})
  lines = ["| run | " + " | ".join(f"lead at epoch {e:g}" for e in picks)
           + " | leads for good from epoch |", "|---" * (len(picks) + 2) + "|"]
  for name in names:
    cells = []
    for e in picks:
      values = [g for s in rows[name]["seeds"].values() for ep, g in s["teacher_lead"] if ep == e]
      cells.append(fmt(*mean_std(values)) if values else "")
    firsts = [analysis.first_lead_epoch(s["teacher_lead"]) for s in rows[name]["seeds"].values()]
    first = ", ".join("never" if f is None else f"{f:g}" for f in firsts)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {first} |")
  return ("Self-teacher top-1 minus backbone top-1 on the test set (points; positive: the "
          "teacher leads the head it distils into), mean ± sd over seeds; last column per "
          "seed.\n\n" + "\n".join(lines) + "\n")


def gate_table(suite: protocol.Suite, rows: dict[str, dict], windows: int = 4) -> str:
  """For every row trained with `objective.kl_gate`: the share of steps on which the
  self-teacher's KL was applied and the teacher's lead on the rows it distils (training
  batches), per `windows` equal spans of the schedule and over all of it; mean ± sd over
  seeds of each seed's mean over the logged windows in the span."""
  names = [n for n in rows if any(s.get("kl_gate") for s in rows[n]["seeds"].values())]
  if not names:
    return ""
  epochs = suite.base().num_epochs
  spans = [(epochs * i / windows, epochs * (i + 1) / windows) for i in range(windows)]
  spans.append((0.0, float(epochs)))
  header = [f"epochs {lo:g}-{hi:g}" for lo, hi in spans[:-1]] + ["all"]
  lines = ["| run | quantity | " + " | ".join(header) + " |", "|---" * (len(spans) + 2) + "|"]
  for name in names:
    for column, label in ((1, "KL on (% of steps)"),
                          (2, "teacher - backbone accuracy on the KL's rows (points)")):
      cells = []
      for lo, hi in spans:
        per_seed = [float(np.mean(picked)) for s in rows[name]["seeds"].values()
                    if (picked := [g[column] for g in s.get("kl_gate", []) if lo < g[0] <= hi])]
        cells.append(fmt(*mean_std(per_seed)) if per_seed else "")
      lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
  return ("Training batches, as the gate saw them: the self-teacher's and the backbone's "
          "lam-weighted accuracy on the mixed rows the self-teacher's KL pairs, compared at "
          "every step (the KL applies where the teacher is strictly ahead). Mean ± sd over "
          "seeds.\n\n" + "\n".join(lines) + "\n")
