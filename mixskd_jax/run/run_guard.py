"""One owner per workdir, and no silent change of what a resumed run trains.

- `WorkdirLock`: an exclusive `flock` on `<workdir>/.mixskd.lock`, checked before any data is
  loaded (`check`) and held while the run trains (from restoring its checkpoint to writing its
  results). Held by `run()`, not by the `Trainer` object: a notebook that builds a second
  Trainer on the same workdir while the first one is still referenced is not refused. The kernel drops it when its process dies, SIGKILL
  included, so a killed run never leaves a stale lock behind. The file records who holds it,
  for the message a second trainer gets. Object stores have no locks: a `gs://` workdir is
  not locked (one line says so); multi-process runs lock from process 0.
- `check_resume`: a workdir that holds checkpoints resumes only under the config that wrote
  them (its `config.json`), up to the fields in `FREE_TO_CHANGE`, unless
  `config.resume_policy="allow_changes"`; the refusal names every differing field.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

import ml_collections
from absl import logging

from mixskd_jax import config as config_lib
from mixskd_jax.config.errors import PreflightError
from mixskd_jax.store import workdir as workdir_lib

LOCK_FILE = ".mixskd.lock"
CONFIG_FILE = "config.json"

# Fields a resumed run may change freely: they decide how often it logs, evaluates and saves,
# how long it runs, where it reads data from and how fast it computes, not what it trains.
# (num_train_steps ends the run elsewhere; the schedule spans config.num_epochs. The stored
# config is the resolved one, so per_device_batch_size follows the device count while the
# global batch_size, which is compared, stays.)
FREE_TO_CHANGE = (
    "per_device_batch_size", "log_every_steps", "eval_every_epochs", "eval_batch_size",
    "eval_calibration_bins", "eval_on_train_set",
    "checkpoint_every_steps", "keep_checkpoints", "resume_policy", "max_param_norm_ratio",
    "num_train_steps", "data.data_dir", "data.manual_dir", "data.idx_dir", "data.prefetch",
    "data.device_prefetch", "data.test_examples", "model.conv_input_barrier",
    "model.cpu_convolutions", "model.remat_branches", "distributed.")


class WorkdirBusyError(PreflightError):
  """Another trainer holds the workdir."""


class ConfigChangedError(PreflightError):
  """The workdir's checkpoints were trained under another config."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for this process (see the module doc)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    path = workdir_lib.resolve(workdir)
    self.path = os.fspath(path / LOCK_FILE) if workdir_lib.is_local(path) else None
    self.enabled = enabled
    self._file = None

  def check(self) -> None:
    """Raises WorkdirBusyError when another trainer holds the lock now; takes nothing."""
    self.acquire(record=False)
    self.release()

  def acquire(self, record: bool = True) -> None:
    """Takes the lock (writing who holds it when `record`), or raises WorkdirBusyError naming
    its holder."""
    if not self.enabled:
      return
    if self.path is None:
      if record:
        logging.info("%s is on an object store, which has no locks: make sure no other "
                     "trainer uses it.", self.workdir)
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      f.seek(0)
      holder = f.read().strip()
      f.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusyError(
          f"--workdir={self.workdir} is in use by another trainer ({_describe(holder)}; lock "
          f"{self.path}): wait for it to end or stop it, or choose another --workdir.") from None
    self._file = f
    if not record:
      return
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="seconds"),
                        "command": " ".join(sys.argv)[:500]}) + "\n")
    f.flush()

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _describe(holder: str) -> str:
  try:
    info = json.loads(holder)
    return f"pid {info['pid']} on {info['host']} since {info['since']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(node, dict):
    out = {}
    for key, value in node.items():
      out.update(_leaves(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: node}


def _is_free(field: str) -> bool:
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE_TO_CHANGE)


def config_changes(stored: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(field, stored value, current value) for every field that differs and changes what is
  trained, in field order. Values are compared as JSON stores them (tuples as lists)."""
  old = _leaves(stored)
  new = _leaves(json.loads(json.dumps(current)))
  missing = object()
  # A field the stored config lacks because it was added to the library after the run was
  # saved: at its default it trains what the run trained, so it is no change.
  defaults = _leaves(json.loads(json.dumps(config_lib.base_config().to_dict())))
  for field in set(new) - set(old):
    if field in defaults and new[field] == defaults[field]:
      old[field] = new[field]
  return [(field, old.get(field, missing), new.get(field, missing))
          for field in sorted(set(old) | set(new))
          if not _is_free(field) and old.get(field, missing) != new.get(field, missing)]


def _show(value: Any) -> str:
  return "(absent)" if not isinstance(value, (type(None), bool, int, float, str, list, dict)) \
      else json.dumps(value)


def check_resume(workdir: str, config: ml_collections.ConfigDict, *,
                 has_checkpoints: bool) -> None:
  """Refuses (ConfigChangedError) to resume checkpoints trained under another config, unless
  `config.resume_policy == "allow_changes"`, which logs the changes and goes on.

  `config` is the resolved config (`layout.resolve`), as `config.json` stores it.
  """
  path = workdir_lib.resolve(workdir) / CONFIG_FILE
  if not has_checkpoints or not path.exists():
    return  # nothing to resume, or nothing to compare with
  try:
    stored = json.loads(path.read_text())
  except ValueError:
    logging.warning("%s is not valid JSON; resuming without comparing configs.", path)
    return
  changes = config_changes(stored, config.to_dict())
  if not changes:
    return
  listed = ", ".join(f"{f} {_show(a)} -> {_show(b)}" for f, a, b in changes[:8])
  if len(changes) > 8:
    listed += f" and {len(changes) - 8} more"
  if config.resume_policy == "allow_changes":
    logging.warning("Resuming %s with a changed config (resume_policy=allow_changes): %s.",
                    workdir, listed)
    return
  raise ConfigChangedError(
      f"--workdir={workdir} holds checkpoints of a run with another config ({listed}). To "
      "continue that run with these changes, add --config.resume_policy=allow_changes; to "
      "start a new run, choose another --workdir.")


def write_config(workdir: str, config: ml_collections.ConfigDict, start: int) -> None:
  """Writes `<workdir>/config.json`, the config of the run resumed at step `start`, keeping a
  changed previous one as config.until_step_<start>.json."""
  path = workdir_lib.resolve(workdir)
  config_file = path / CONFIG_FILE
  current = config.to_dict()
  if start > 0 and config_file.exists():
    old = config_file.read_text()
    if json.loads(old) != json.loads(json.dumps(current)):
      workdir_lib.write_text_atomically(path / f"config.until_step_{start}.json", old)
  workdir_lib.write_json(config_file, current)
