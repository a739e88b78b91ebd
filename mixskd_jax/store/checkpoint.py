"""Orbax checkpoints in `<workdir>/checkpoints` (local or `gs://`): periodic, final, on
preemption; resume from the newest intact one onto whatever devices the current run has.

Three guarantees beyond Orbax's atomic commit:

- **verified**: each step gets a digest of its files once it is complete
  (`checkpoint_digest`); resuming checks it, then restores. A step that fails either check is
  moved, whole, to `<workdir>/checkpoints_damaged/` (never deleted), one line says why, and
  the next older step is tried.
- **written when saved**: a save returns once the step is on disk (or in the bucket). An
  asynchronous save would overlap the next steps, but its write error would surface only at
  the next save, a checkpoint interval of training later. A failed write is a one-line
  `CheckpointWriteError`; the previous checkpoints are untouched.
- **the same step everywhere**: with several processes, process 0 checks and chooses, and
  every process restores the step it chose.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import re
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mixskd_jax.store import checkpoint_digest
from mixskd_jax.store import workdir as workdir_lib

DAMAGED_DIR = "checkpoints_damaged"


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only or immutable directory, ...)."""


class CheckpointError(RuntimeError):
  """The workdir's checkpoints cannot be resumed; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """An intact checkpoint does not fit the current train state (another model or optimizer)."""


class NoUsableCheckpointError(CheckpointError):
  """Every checkpoint of the workdir was damaged (each was moved aside)."""


def _cause(error: BaseException) -> str:
  """The OS error behind an Orbax/TensorStore write failure, short ("No space left on device
  (errno 28) writing <file>"), else the error's first line."""
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code is None:
    return _first_line(error)
  path = re.search(r'(?:writing|Failed writing:|opening) (?:local file )?"([^"]+)"', text)
  where = f" writing {path.group(1)}" if path else ""
  return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)}){where}"


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


class _HeldRecords(py_logging.Filter):
  """Holds back ERROR records logged from Orbax's threads and asyncio during a save."""

  def __init__(self):
    super().__init__()
    self.held = []

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR and (
        "orbax" in record.pathname or record.name == "asyncio"):
      self.held.append(record)
      return False
    return True


def _late_orbax_callback(unraisable) -> bool:
  """An exception raised in a TensorStore completion callback after Orbax's event loop closed,
  or by one of Orbax's abandoned coroutines when it is garbage-collected (the leftovers of a
  save or restore that already failed): harmless, and printed once per pending read or write."""
  if "Event loop is closed" in str(unraisable.exc_value):
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


@contextlib.contextmanager
def _one_line_failure():
  """A failed save or restore reports its cause once (CheckpointWriteError, or the damage in
  one line) instead of Orbax's traceback per thread and per pending read or write (25-239 of
  them were seen on a full disk).

  Orbax's error logs are held back and re-logged if the save succeeds anyway. After a
  failure the filters stay installed: the save's remaining writes finish (and fail, and are
  garbage-collected unretrieved) after it returned, until the process exits.
  """
  held = _HeldRecords()
  loggers = [py_logging.getLogger(name) for name in ("absl", "asyncio")]
  for logger in loggers:
    logger.addFilter(held)
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not _late_orbax_callback(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
    raise
  sys.unraisablehook = previous_hook
  for logger in loggers:
    logger.removeFilter(held)
  for record in held.held:  # the save succeeded: nothing hides what Orbax said
    py_logging.getLogger(record.name).handle(record)


def _step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
  """Orbax's step directories (integer names) under `directory`."""
  if not directory.exists():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def has_checkpoints(workdir: epath.PathLike) -> bool:
  """Whether `<workdir>/checkpoints` holds any step directory (intact or not)."""
  return bool(_step_dirs(workdir_lib.resolve(workdir) / "checkpoints"))


class Checkpoints:
  """The owner of an `ocp.CheckpointManager` for one train state pytree."""

  def __init__(self, workdir: epath.PathLike, *, keep: int):
    # An epath.Path, not a string through os.path: that would mangle gs://.
    self.workdir = workdir_lib.resolve(workdir)
    self.directory = self.workdir / "checkpoints"
    self.is_chief = jax.process_index() == 0
    # cleanup_tmp_directories: a save cut short by SIGKILL or Ctrl-C leaves its
    # `<step>.orbax-checkpoint-tmp` folder; the next run removes it.
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True)
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(self.directory, options=self._options)
    except OSError as e:
      raise CheckpointWriteError(
          f"Cannot open the checkpoint directory {self.directory} ({_cause(e)}): make it "
          "writable or choose another --workdir.") from e

  def _reopen(self) -> None:
    """A fresh manager: a failed restore can leave the old one's handlers set for the
    damaged step's layout, and its step list includes the steps moved aside."""
    self.manager.close()
    self.manager = self._open()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # --------------------------------------------------------------------------------------
  # Restore.

  def _choose_step(self, target: Any) -> tuple[int | None, Any]:
    """The newest step that verifies and restores (and its state, or None when it was not
    restored here), moving every newer damaged step aside."""
    for step in sorted(_step_dirs(self.directory), reverse=True):
      step_dir = self.directory / str(step)
      damage = checkpoint_digest.problem(step_dir)
      if damage is None and target is not None:
        try:
          with _one_line_failure():
            return step, self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # pylint: disable=broad-except  (TensorStore, pytree, OS errors)
          if checkpoint_digest.read(step_dir) is not None:
            # Its files are exactly what was written: the model, not the step, differs.
            raise CheckpointMismatchError(
                f"Checkpoint {step} in {self.directory} is intact but does not fit this "
                f"config's train state ({_first_line(e)}); resume it with the config that "
                "wrote it (its workdir's config.json), or start in a new --workdir.") from e
          damage = f"it cannot be restored ({_first_line(e)})"
      if damage is None:
        return step, None
      self._move_aside(step, step_dir, damage)
      self._reopen()
    return None, None

  def _move_aside(self, step: int, step_dir: epath.Path, damage: str) -> None:
    """Moves a damaged step out of Orbax's sight, keeping it for inspection."""
    aside = self.workdir / DAMAGED_DIR
    aside.mkdir(parents=True, exist_ok=True)
    dest = aside / str(step)
    n = 1
    while dest.exists():
      dest, n = aside / f"{step}.{n}", n + 1
    workdir_lib.move_tree(step_dir, dest)
    workdir_lib.write_text_atomically(dest / "DAMAGE.txt", damage + "\n")
    logging.warning("Checkpoint %s is damaged (%s): moved to %s; trying the next older one.",
                    step, damage, dest)

  def restore_or_keep(self, state: Any) -> Any:
    """The newest intact saved state, laid out like `state` (its shardings: the current
    mesh), or `state` itself when nothing was saved yet.

    Raises:
      NoUsableCheckpointError: checkpoints existed, and every one was damaged.
    """
    if not _step_dirs(self.directory):
      return state
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    if jax.process_count() == 1:
      step, restored = self._choose_step(target)
    else:
      # Process 0 checks (and moves damaged steps aside); every process restores its choice.
      step = self._choose_step(None)[0] if self.is_chief else None
      step = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
      step = None if step < 0 else step
      restored = None
    if jax.process_count() > 1:
      self._reopen()  # forget the steps process 0 moved aside
    if step is None:
      raise NoUsableCheckpointError(
          f"Every checkpoint in {self.directory} was damaged and moved to "
          f"{self.workdir / DAMAGED_DIR}; nothing to resume from. Start afresh in a new "
          "--workdir (or delete the checkpoints directory).")
    if restored is None:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    logging.info("Restored checkpoint %s.", step)
    return restored

  # --------------------------------------------------------------------------------------
  # Save.

  def save(self, step: int, state: Any, **record: Any) -> None:
    """Writes `state` as checkpoint `step` and its digest (with `record`), and returns once
    both are written; the previous checkpoints stay until this one is complete.

    Raises:
      CheckpointWriteError: in one line, naming the step, the directory and the cause.
    """
    if step in (self.manager.all_steps() or []):
      return
    t = time.perf_counter()
    try:
      with _one_line_failure():
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()
      if self.is_chief:
        checkpoint_digest.write(self.directory / str(step), step=step, **record)
    except Exception as e:  # pylint: disable=broad-except  (Orbax wraps OS errors variously)
      kept = [s for s in (self.manager.all_steps() or []) if s != step]
      previous = (f"checkpoint {max(kept)} is intact and the same command resumes from it"
                  if kept else "no earlier checkpoint exists")
      raise CheckpointWriteError(
          f"Could not write checkpoint {step} to {self.directory}: {_cause(e)}; "
          f"{previous}. Free space or fix the directory's permissions, then rerun.") from e
    logging.info("Saved checkpoint %s in %.1f s.", step, time.perf_counter() - t)

  def close(self) -> None:
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
