"""Checks that fail a run in seconds, before any data is loaded or anything is compiled.

`check_run(config, workdir)`, cheapest first:

* the config, through its one door (`mixskd_jax.config.validate`): every field is one the
  trainer knows, holds a value of its type and range, and agrees with the others;
* the workdir can be created and written (`check_workdir`): not under a file, not read-only;
* the rules that need the device count (`check_layout`: JAX is imported here, TensorFlow not
  yet);
* the dataset is prepared, or can be prepared here (`dataset_check.check_dataset`).

Each failure is a `PreflightError` with a one-line message (`mixskd_jax.main` prints it without
a traceback and exits with status 2).
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Callable

import ml_collections

from mixskd_jax import config as config_lib
from mixskd_jax.config.errors import PreflightError
from mixskd_jax.run import dataset_check
from mixskd_jax.store import workdir as workdir_lib
from mixskd_jax.store.workdir import remove_if_empty

WRITTEN_SUBDIRS = ("checkpoints",)  # besides the workdir itself


class WorkdirError(PreflightError, OSError):
  """The workdir cannot be created or written."""


def check_workdir(workdir: str) -> list[str]:
  """Creates the (local) workdir and writes and removes a file in it.

  Returns:
    The directories this call created, outermost first (for `remove_if_empty`).

  Raises:
    WorkdirError: under a file, read-only, or any other OSError, in one line with the fix.
    ValueError: an unsupported URI scheme (from `workdir.resolve`).
  """
  path = workdir_lib.resolve(workdir)
  if not workdir_lib.is_local(path):
    return []  # gs://: the bucket's permissions show at the first write; no cheap probe
  path = os.fspath(path)
  missing, parent = [], path
  while not os.path.exists(parent):
    missing.append(parent)
    up = os.path.dirname(parent)
    if up == parent:
      break
    parent = up
  if os.path.exists(parent) and not os.path.isdir(parent):
    if parent == path:
      raise WorkdirError(f"--workdir={workdir} is a file, not a directory: choose another "
                         "--workdir.")
    raise WorkdirError(f"--workdir={workdir} is under a file: {parent} is a file, not a "
                       "directory; choose another --workdir, or move that file away.")
  created, writing = [], parent
  try:
    for directory in reversed(missing):
      os.mkdir(directory)
      created.append(directory)
      writing = directory
    # The workdir, and the folders a resumed run writes into (an immutable or read-only
    # checkpoints folder would otherwise fail only at the first save).
    for writing in [path] + [os.path.join(path, sub) for sub in WRITTEN_SUBDIRS
                             if os.path.isdir(os.path.join(path, sub))]:
      with tempfile.NamedTemporaryFile(dir=writing, prefix=".mixskd_write_check_"):
        pass
  except OSError as e:
    remove_if_empty(created)
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
      fix = f"choose a --workdir you can write to, or make {writing} writable"
    else:
      fix = "choose another --workdir"
    raise WorkdirError(f"--workdir={workdir} cannot be created or written ({e.strerror or e} "
                       f"in {writing}): {fix}.") from e
  return created


def check_layout(config: ml_collections.ConfigDict) -> None:
  """The config's rules that need the device count (`train/layout.py`: batch, mix and
  BatchNorm groups), for the devices this run has: a `ConfigValueError` before any data is
  read. Starts the multi-host runtime first when the config asks for it (`run/distributed.py`),
  since JAX counts every process's devices only then."""
  # pylint: disable=import-outside-toplevel  (the checks above need no JAX)
  from mixskd_jax import backends
  from mixskd_jax.run import distributed
  from mixskd_jax.train import layout
  distributed.maybe_initialize(config.distributed)
  # The first use of a device in a run: JAX's backends start here, without libtpu's lines.
  layout.resolve(config, len(backends.start()), log_costs=False)  # the trainer says them


def check_run(config: ml_collections.ConfigDict, workdir: str, *,
              before_dataset: Callable[[], None] | None = None) -> list[str]:
  """Every check, cheapest first: the config (fields, values, rules between fields), the
  workdir, the dataset. A workdir this call created is removed again when a later check fails.
  `before_dataset` runs before the dataset check, the first to import TensorFlow (the command
  quiets TensorFlow's start-up there).

  Returns:
    The directories this call created (for `remove_if_empty` when the run fails later).
  """
  config_lib.validate(config)
  created = check_workdir(workdir)
  try:
    check_layout(config)
    if before_dataset is not None:
      before_dataset()
    dataset_check.check_dataset(config.data)
  except PreflightError:
    remove_if_empty(created)
    raise
  return created
