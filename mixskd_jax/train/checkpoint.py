"""Orbax checkpoints in `<workdir>/checkpoints` (local or `gs://`): periodic, final, on
preemption; resume from the latest onto whatever devices the current run has."""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mixskd_jax.train import workdir as workdir_lib


class Checkpoints:
  """A thin owner of an `ocp.CheckpointManager` for one train state pytree."""

  def __init__(self, workdir: epath.PathLike, *, keep: int):
    # An epath.Path, not a string through os.path: that would mangle gs://.
    self.directory = workdir_lib.resolve(workdir) / "checkpoints"
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

  def save(self, step: int, state: Any) -> bool:
    """Saves (atomically; the previous checkpoints stay until this one is complete).

    Returns:
      Whether a checkpoint of `step` is kept: False with `keep_checkpoints=0`, where Orbax
      saves and deletes at once.
    """
    if step not in (self.manager.all_steps() or []):
      self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    return step in (self.manager.all_steps() or [])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
