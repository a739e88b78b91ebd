"""The statistics a converged comparison needs beyond mean ± sd: paired differences over seeds
(every method trains each seed's data order, initialization and draws from the same seed, so
method A's seed-k run and method B's seed-k run form a pair), whether a run has converged
(training accuracy, and how far test accuracy still moves late in training), and how the
self-teacher compares with the backbone while it teaches.

Pure functions over the runs' records (results.json, eval and train histories as loaded by
report.load_run); report.py renders them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

# A difference is called larger than the noise when the two-sided paired t-test over seeds
# gives p below this; with 3 seeds (2 degrees of freedom) that needs a consistent difference.
SIGNIFICANCE_LEVEL = 0.05
# The share of training, at its end, over which the plateau check measures how far test
# accuracy still moves (issue #13: the last 20% of epochs).
LATE_FRACTION = 0.2


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any] | None:
  """a - b over the seeds both have.

  Args:
    a, b: seed -> value (e.g. final test top-1 in %).

  Returns:
    None with fewer than 2 shared seeds; else n, mean and sample sd of the per-seed
    differences, the 95% confidence interval of the mean difference and the two-sided paired
    t-test's p-value (`scipy.stats.ttest_rel`, Student t with n-1 degrees of freedom), how many seeds a wins, and
    `significant` (p < SIGNIFICANCE_LEVEL).
  """
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    return None
  d = np.array([a[s] - b[s] for s in seeds], np.float64)
  n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
  if sd == 0.0:  # identical differences: scipy's t statistic is inf or nan; the limit is this
    p = 1.0 if mean == 0.0 else 0.0
    low = high = mean
  else:
    test = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    p = float(test.pvalue)
    low, high = (float(x) for x in test.confidence_interval(0.95))
  return {"n": n, "mean": mean, "sd": sd, "ci95": (low, high), "p": p,
          "wins": int((d > 0).sum()), "significant": p < SIGNIFICANCE_LEVEL}


def late_movement(eval_history: Sequence[Mapping[str, float]], num_epochs: float,
                  key: str = "eval/top1/backbone") -> float | None:
  """How far test accuracy moves over the last LATE_FRACTION of epochs: max - min of `key`
  over the evaluations at epoch >= (1 - LATE_FRACTION) * num_epochs, in points; None when
  fewer than 2 evaluations fall there."""
  start = (1.0 - LATE_FRACTION) * num_epochs
  late = [e[key] for e in eval_history if e["epoch"] >= start - 1e-9]
  if len(late) < 2:
    return None
  return float(max(late) - min(late))


def final_train_accuracy(train_history: Sequence[Mapping[str, float]], after_step: float,
                         key: str = "train/accuracy/backbone") -> float | None:
  """Mean training-batch accuracy (clean rows, as the step logs it, before each step's
  update) of the logged windows that end after `after_step` (e.g. the last epoch's), in %;
  None without such a record."""
  values = [t[key] for t in train_history if key in t and t["step"] > after_step]
  return 100.0 * float(np.mean(values)) if values else None


def teacher_lead(eval_history: Sequence[Mapping[str, float]]) -> list[tuple[float, float]]:
  """(epoch, self-teacher top-1 - backbone top-1) at every evaluation of a MixSKD run, in
  points: positive where the teacher leads the head it distils into."""
  return [(e["epoch"], e["eval/top1/self_teacher"] - e["eval/top1/backbone"])
          for e in eval_history if "eval/top1/self_teacher" in e]


def first_lead_epoch(lead: Sequence[tuple[float, float]]) -> float | None:
  """The first evaluated epoch from which the teacher leads at every later evaluation."""
  epoch = None
  for e, gap in lead:
    if gap > 0:
      epoch = e if epoch is None else epoch
    else:
      epoch = None
  return epoch


def gate_history(train_history: Sequence[Mapping[str, float]],
                 steps_per_epoch: float) -> list[tuple[float, float, float]]:
  """(epoch, share of steps with the self-teacher's KL on, self-teacher - backbone accuracy)
  per logged window of a run with `objective.kl_gate` on, both in %/points; the accuracies
  are the ones the gate compares (lam-weighted, on the rows the KL pairs, training mode).
  Each record is the mean over its window's steps, so the share is exact per window. Empty
  for a run without the gate."""
  return [(t["step"] / steps_per_epoch, 100.0 * t["train/kl_gate_open"],
           100.0 * (t["train/kl_gate/teacher_accuracy"] - t["train/kl_gate/backbone_accuracy"]))
          for t in train_history if "train/kl_gate_open" in t]
