"""Orbax checkpoints in `<workdir>/checkpoints`: periodic, final, on preemption; resume from the
latest onto whatever devices the current run has."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """A thin owner of an `ocp.CheckpointManager` for one train state pytree."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_or_keep(self, state: Any) -> Any:
    """The latest saved state, laid out like `state` (its shardings: the current mesh), or
    `state` itself when nothing was saved yet."""
    step = self.manager.latest_step()
    if step is None:
      return state
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, step: int, state: Any) -> None:
    """Saves (atomically; the previous checkpoints stay until this one is complete)."""
    if step in (self.manager.all_steps() or []):
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
