"""What a run returns and writes to `<workdir>/results.json` (`results_record`)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

RESULTS_FILE = "results.json"


def results_record(*, history: list[dict], step: int, num_steps: int, start: int,
                   preempted: bool, wall_time: float, devices: int,
                   config: ml_collections.ConfigDict, method: str,
                   train_step_time_s: float | None, calibration: Any) -> dict[str, Any]:
  """The run's results: where it stopped, its evaluations and the best of them."""
  results = {"step": step, "num_steps": num_steps, "finished": step >= num_steps,
             "history": history,
             # Stopped by SIGTERM before the end, its step checkpointed: rerun to continue
             # (main.py exits with PREEMPTED_EXIT_CODE).
             "preempted": preempted,
             "wall_time_s": wall_time, "steps_this_run": step - start,
             "devices": devices, "processes": jax.process_count(),
             "dataset": config.data.name, "model": config.model.name,
             "method": method, "variant": config.objective.variant,
             # Wall time per training step after the first (compiling) one, evaluations and
             # checkpoints excluded, input pipeline included; None if too few steps ran.
             "train_step_time_s": train_step_time_s,
             "calibration": calibration}
  if history:
    final = history[-1]
    best = max(history, key=lambda h: h["eval/top1/backbone"])
    results.update(
        final=final, best_backbone_top1=best["eval/top1/backbone"], best_step=best["step"],
        best_max_over_heads_reference_protocol=max(
            h["eval/top1_max_over_heads_reference_protocol"] for h in history))
  return results
