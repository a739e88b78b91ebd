"""The fair transfer protocol: choose on validation, measure once on test.

For one pre-trained backbone and one task:

1. For every BatchNorm mode of the task, K copies train on the training split at the K
   learning rates of the sweep (one compiled step: `sweep.train_sweep`) and are scored on the
   validation split (held-out examples of the same classes, `data`).
2. The (BatchNorm mode, learning rate) with the best validation metric is chosen (ties: the
   lower validation loss, then the earlier setting of the grid).
3. That copy, and only it, is scored on the test split.

Every backbone gets its own best setting, so no backbone is judged at a rate that suits
another's weight scale; the test set is read once per backbone and task.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mixskd_jax.transfer.tasks import Source


def choose(grid: Sequence[dict]) -> dict:
  """The grid row with the highest `val_metric`; ties: lower `val_loss`, then the first."""
  if not grid:
    raise ValueError("The transfer sweep has no setting: give at least one learning rate and "
                     "one BatchNorm mode.")
  best = min(range(len(grid)), key=lambda i: (-grid[i]["val_metric"], grid[i]["val_loss"], i))
  return grid[best]


def evaluate(task: Any, source: Source, *, bn_modes: Sequence[str],
             learning_rates: Sequence[float], log=print) -> dict:
  """Runs the protocol for `task` (`tasks.LinearProbe`, `FineTune` or `Segmentation`).

  Returns:
    {"metric": the task's metric name, "grid": one row per (bn, lr) with its validation
    metric and loss, "chosen": {"bn", "lr"}, "test_metric", "test_loss" and
    "train_metric" (on the training split) of the chosen copy}.
  """
  data, seed = source.data, source.seed
  train = task.prepare(data.train, "train", seed)
  validation = task.prepare(data.validation, "validation", seed)
  rates = np.asarray(learning_rates, np.float64)
  grid, scorers = [], {}
  for bn in bn_modes:
    scorers[bn] = task.fit(source, bn, train, rates)
    metric, loss = scorers[bn](validation)
    for lr, m, l in zip(rates, metric, loss):
      grid.append({"bn": bn, "lr": float(lr), "val_metric": float(m), "val_loss": float(l)})
    log(f"  {bn}: validation {task.metric} " +
        " ".join(f"{lr:g}:{m:.2f}" for lr, m in zip(rates, metric)))
  best = choose(grid)
  copy = int(np.flatnonzero(rates == best["lr"])[0])
  test_metric, test_loss = scorers[best["bn"]](task.prepare(data.test, "test", seed), copy)
  train_metric, _ = scorers[best["bn"]](train, copy)
  log(f"  chosen bn={best['bn']} lr={best['lr']:g}: test {task.metric} {test_metric[0]:.2f}")
  return {"metric": task.metric, "grid": grid, "chosen": {"bn": best["bn"], "lr": best["lr"]},
          "test_metric": float(test_metric[0]), "test_loss": float(test_loss[0]),
          "train_metric": float(train_metric[0])}
