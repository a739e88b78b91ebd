"""The host input pipeline: per-process uint8 batches for training and masked eval batches.

Batches leave the host as uint8 images and int32 labels; `normalize` turns them into float32
on device. Fashion-MNIST and CIFAR are held in memory and indexed exactly (`in_memory.py`);
ImageNet is streamed from tfds records (`streaming.py`).

Multi-host: call with `process_index=jax.process_index(), process_count=jax.process_count()`;
`config.batch_size` and `config.eval_batch_size` are global and each process gets 1/P of
every batch.
"""

from __future__ import annotations

from typing import Dict, Iterator

import ml_collections
import numpy as np

from mixskd_jax.data import batching
from mixskd_jax.data import datasets
from mixskd_jax.data import in_memory
from mixskd_jax.data import sources
from mixskd_jax.data import streaming
from mixskd_jax.data.normalization import normalize  # noqa: F401  (re-exported)
from mixskd_jax.data.tf_setup import hide_accelerators_from_tf

Batch = Dict[str, np.ndarray]


def _module(config: ml_collections.ConfigDict):
  return in_memory if datasets.get_spec(config.data.name).in_memory else streaming


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0,
                   process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """This process's slice of every global training batch, forever, from `start_step` on.

  Args:
    config: reads `seed`, `batch_size` (global) and `data.*`.
    start_step: the global step of the first batch (resume): every dataset jumps straight to
      epoch start_step // steps_per_epoch, batch start_step % steps_per_epoch (streamed ones
      read and skip that epoch's earlier records).
    process_index, process_count: this process and how many there are.

  Yields:
    {'image': (L, H, W, C) uint8, 'label': (L,) int32}, L = config.batch_size // process_count;
    with `data.example_ids` also 'example_id' (L,) int32 (0..num_train-1 over the kept training
    examples, for per-example state such as PS-KD's predictions); with `data.class_pairs` also
    'pair_image' / 'pair_label': a random other training example of the same class, augmented
    on its own (CS-KD). The processes' slices of one step, concatenated in process order, are the global batch.

  Raises:
    ValueError: unknown dataset, batch not divisible by process_count, an epoch without a
      full batch, bad subset fields.
  """
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  hide_accelerators_from_tf()
  return _module(config).train_iterator(config, start_step=start_step,
                                        process_index=process_index, process_count=process_count)


def eval_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """This process's eval batches over the (capped) test split: `num_eval_steps` of them.

  Across all processes every test example appears exactly once with mask True; the rest
  are zero padding with mask False, so every process yields the same number of batches of
  the same shape (one compiled eval step, no collective mismatch).

  Yields:
    {'image': (L, H, W, C) uint8, 'label': (L,) int32, 'mask': (L,) bool},
    L = config.eval_batch_size // process_count.
  """
  hide_accelerators_from_tf()
  return _module(config).eval_iterator(config, process_index=process_index,
                                       process_count=process_count)


def train_eval_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                        process_count: int = 1) -> Iterator[Batch]:
  """`eval_iterator`'s masked batches over the training examples the run trains on (after
  `data.train_examples_per_class`, `data.classes` and `data.train_examples`), unaugmented,
  each exactly once (`config.eval_on_train_set`). In-memory datasets only."""
  if not datasets.get_spec(config.data.name).in_memory:
    raise ValueError("config.eval_on_train_set is only supported for the in-memory datasets, "
                     f"not {config.data.name!r}; set it to False.")
  hide_accelerators_from_tf()
  return in_memory.train_eval_iterator(config, process_index=process_index,
                                       process_count=process_count)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Global steps per epoch: training examples (after subset and cap) // config.batch_size.

  Streamed datasets use it as their epoch too: each process keeps steps x L records of its
  share of the split per epoch, so resuming skips at most one epoch.
  """
  return batching.train_steps_per_epoch(sources.num_train_examples(config.data), config)


def num_eval_steps(config: ml_collections.ConfigDict, *, process_count: int = 1) -> int:
  """How many batches `eval_iterator` yields on each process.

  In-memory datasets: ceil(num_test / config.eval_batch_size), whatever process_count is.
  Streamed datasets read contiguous per-process shares, so pass the same process_count as to
  `eval_iterator`.
  """
  local = batching.local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  spec = datasets.get_spec(config.data.name)
  return batching.eval_steps(sources.num_test_examples(config.data), local, process_count,
                             contiguous=not spec.in_memory)
