"""Keeps the next global batches on their way to the devices while the current step runs."""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from mixskd_jax.train import sharding as sharding_lib


def prefetch_to_device(local_batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """`local_batches` as global arrays, with `size` batches converted ahead.

  `jax.make_array_from_process_local_data` starts the host-to-device copies and returns at
  once, so converting batch i + size before step i is consumed overlaps its transfer with
  the steps that run meanwhile (the copies are asynchronous; the step waits only for its own
  batch).

  Args:
    local_batches: this process's slices, {'image': (L, H, W, C) uint8, 'label': (L,) ...}.
    sharding: how the global batch is laid out, e.g. `sharding.data_sharding(mesh)`.
    size: batches converted ahead of the one yielded (config.data.device_prefetch);
      0 converts each batch when it is asked for.

  Returns:
    An iterator of {'image': (G, H, W, C), ...}: global `jax.Array`s sharded by `sharding`,
    G = L x processes, in the order of `local_batches`, which it advances at most `size`
    batches beyond the one it last yielded.

  Raises:
    ValueError: size < 0.
  """
  if size < 0:
    raise ValueError(f"config.data.device_prefetch={size} must be >= 0 (0: no prefetch).")
  return _ahead((sharding_lib.to_global(b, sharding) for b in local_batches), size)


def _ahead(items: Iterator, size: int) -> Iterator:
  """Yields `items`, pulling `size` of them ahead of the one yielded."""
  queue = collections.deque(itertools.islice(items, size))
  for item in items:
    queue.append(item)
    yield queue.popleft()
  yield from queue
