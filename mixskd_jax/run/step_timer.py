"""The wall time of a run's training steps alone (`StepTimer`), for results.json's
`train_step_time_s`."""

from __future__ import annotations

import contextlib
import time

import jax


class StepTimer:
  """Wall time of the training steps alone: starts once the first step is done and leaves out
  the `excluded` blocks (evaluation, checkpointing). Blocks on the state at each boundary so
  asynchronously dispatched steps are counted where they run."""

  def __init__(self):
    self._t0, self._excluded = None, 0.0

  def start(self, state) -> None:
    jax.block_until_ready(state)
    self._t0 = time.perf_counter()

  @contextlib.contextmanager
  def excluded(self, state):
    if self._t0 is None:
      yield
      return
    jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - t

  def stop(self, state, steps: int) -> float | None:
    if self._t0 is None or steps < 1:
      return None
    jax.block_until_ready(state)
    return (time.perf_counter() - self._t0 - self._excluded) / steps
