"""Prepares the run's dataset before any process reads it: process 0 first, then the others.

tfds's `download_and_prepare` is not safe to run from many processes at once on one data_dir
(each would download and build the same files). So process 0 prepares (downloads, or builds
ImageNet from its tars) while the others wait at a barrier, then they open what it built.
The data package stays free of JAX; the barrier lives here.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import ml_collections
from jax.experimental import multihost_utils

from mixskd_jax.data import sources


def prepare_data(data_config: ml_collections.ConfigDict, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 barrier: Optional[Callable[[str], None]] = None) -> None:
  """Makes `config.data`'s tfds dataset prepared on every process, process 0 first.

  Process 0 prepares; every process then meets at `barrier`; then the others open the
  dataset, which on a shared data_dir is already prepared. (On host-local data_dirs each
  host prepares its own copy after process 0; prepare it in advance with `tfds build`.)
  If process 0 fails, it still reaches the barrier before raising, so no process hangs (the
  others then try to prepare it themselves, and normally fail with the same clear error).

  Args:
    data_config: `config.data` (name, data_dir, manual_dir, idx_dir).
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    barrier: called with a name by every process; default
      `multihost_utils.sync_global_devices` (unused with one process).

  Raises:
    DatasetUnavailableError / FashionMNISTMissingError: the dataset cannot be prepared.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count == 1:
    sources.get_builder(data_config)
    return
  failure = None
  if index == 0:
    try:
      sources.get_builder(data_config)
    except Exception as e:  # pylint: disable=broad-except  (re-raised after the barrier)
      failure = e
  (barrier or multihost_utils.sync_global_devices)(
    f"mixskd_jax.prepare_data:{data_config.name}")
  if failure is not None:
    raise failure
  if index != 0:
    sources.get_builder(data_config)
