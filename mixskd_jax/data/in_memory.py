"""Exact, resumable pipelines for datasets held in memory (Fashion-MNIST, CIFAR).

Training order is a pure function of (config.seed, epoch): epoch e visits the kept examples
in the order `np.random.default_rng([seed, e]).permutation(N)`; global batch i is positions
[i*G, (i+1)*G) of it (the remainder is dropped) and process p takes rows [p*L, (p+1)*L) of
that, L = G / P. Example j of the epoch is augmented with the stateless seed
`example_seed(seed, e, j)`. So every host computes the same global batches, the process
slices concatenate to the one-process batch, and `start_step` jumps straight to its batch.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from mixskd_jax.data import augment
from mixskd_jax.data import batching
from mixskd_jax.data import datasets
from mixskd_jax.data import prefetch
from mixskd_jax.data import sources

Batch = Dict[str, np.ndarray]


def _index_batches(keep: np.ndarray, *, seed: int, start_step: int, global_batch: int,
                   local_batch: int, process_index: int,
                   labels: np.ndarray | None = None) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite: per step this process's (L,) split indices, epoch and in-epoch positions,
  and with `labels` a same-class partner's split index per example (`partner`)."""
  n = len(keep)
  steps = n // global_batch
  epoch, first = divmod(start_step, steps)
  offset = process_index * local_batch + np.arange(local_batch)
  while True:
    order = keep[np.random.default_rng([seed, epoch]).permutation(n)]
    if labels is not None:
      # Its own stream, so turning pairs on does not change the training order.
      partners = class_partners(order, labels, np.random.default_rng([seed, epoch, 1]))
    for i in range(first, steps):
      position = i * global_batch + offset
      b = {"index": order[position], "epoch": np.full(local_batch, epoch, np.int64),
           "position": position.astype(np.int64)}
      if labels is not None:
        b["partner"] = partners[position]
      yield b
    epoch, first = epoch + 1, 0


def class_partners(order: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For every example in `order`, one uniformly drawn *other* example of the same class.

  Args:
    order: (M,) split indices of the kept examples (one epoch's order).
    labels: (N,) labels of the whole split.
    rng: the epoch's generator.

  Returns:
    (M,) split indices; an example alone in its class is its own partner.
  """
  partners = np.empty_like(order)
  classes = labels[order]
  for c in np.unique(classes):
    where = np.flatnonzero(classes == c)
    members = order[where]
    n = len(members)
    if n == 1:
      partners[where] = members
      continue
    # A shift of 1..n-1 around the class's members never lands on the example itself.
    shift = rng.integers(1, n, size=n)
    partners[where] = members[(np.arange(n) + shift) % n]
  return partners


def _augment_fn(spec: datasets.DatasetSpec, seed: int):
  """(H, W, C) uint8 image, epoch, in-epoch position -> augmented (H, W, C) uint8."""
  if spec.augmentation != "pad_crop_flip":
    raise ValueError(f"No in-memory augmentation {spec.augmentation!r} for {spec.name!r}.")

  def fn(image, epoch, position):
    return augment.pad_crop_flip(image, augment.example_seed(seed, epoch, position),
                                 spec.crop_padding)
  return fn


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[Batch]:
  """See `pipeline.train_iterator`."""
  spec = datasets.get_spec(config.data.name)
  local = batching.local_batch_size(config.batch_size, process_count, "batch_size")
  batching.check_process(process_index, process_count)
  if config.seed < 0:
    raise ValueError(f"config.seed={config.seed} must be >= 0 (it seeds numpy's permutation).")
  images, labels, keep = sources.train_examples(config.data)
  batching.train_steps_per_epoch(len(keep), config)  # Raises on an empty epoch.
  pairs = bool(config.data.get("class_pairs", False))
  example_ids = bool(config.data.get("example_ids", False))
  indices = functools.partial(
    _index_batches, keep, seed=config.seed, start_step=start_step, global_batch=config.batch_size,
    local_batch=local, process_index=process_index, labels=labels if pairs else None)

  augment_batch = _augment_batch_fn(spec, config.seed) if config.data.augment else None

  def load(index, epoch, position):
    image = images[index]
    if augment_batch is not None:
      image = augment_batch(image, epoch, position).numpy()
    return image

  def batches():
    for b in indices():
      batch = {"image": load(b["index"], b["epoch"], b["position"]),
               "label": labels[b["index"]]}
      if example_ids:
        # Dense ids 0..M-1 over the kept examples (`keep` is increasing), so per-example
        # state needs M rows, not one per example of the whole split.
        batch["example_id"] = np.searchsorted(keep, b["index"]).astype(np.int32)
      if pairs:
        # The partner gets its own augmentation: positions n.. are never used by examples.
        batch["pair_image"] = load(b["partner"], b["epoch"], b["position"] + len(keep))
        batch["pair_label"] = labels[b["partner"]]
      yield batch

  # Batches are made in a Python thread calling one tf.function per batch, not through
  # tf.data.Dataset.from_generator: while a from_generator iterator merely exists, XLA's CPU
  # train step runs ~40% slower on a 2-core machine (measured; the cause is inside TF).
  return prefetch.prefetch_in_thread(batches(), config.data.prefetch)


def _augment_batch_fn(spec: datasets.DatasetSpec, seed: int):
  """(L, H, W, C) uint8, (L,) epochs, (L,) positions -> augmented (L, H, W, C) uint8."""
  fn = _augment_fn(spec, seed)
  signature = [tf.TensorSpec((None, None, None, None), tf.uint8),
               tf.TensorSpec((None,), tf.int64), tf.TensorSpec((None,), tf.int64)]

  @tf.function(input_signature=signature)
  def augment_batch(image, epoch, position):
    return tf.map_fn(lambda ex: fn(*ex), (image, epoch, position),
                     fn_output_signature=tf.uint8)
  return augment_batch


def eval_iterator(config: ml_collections.ConfigDict, *, process_index: int,
                  process_count: int) -> Iterator[Batch]:
  """See `pipeline.eval_iterator`: global eval batch i is test examples [i*G, (i+1)*G),
  zero-padded past the end; process p takes rows [p*L, (p+1)*L) of it."""
  local = batching.local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  batching.check_process(process_index, process_count)
  images, labels = sources.test_arrays(config.data)
  steps = batching.eval_steps(len(labels), local, process_count, contiguous=False)
  return _eval_batches(images, labels, steps=steps, global_batch=config.eval_batch_size,
                       local_batch=local, process_index=process_index)


def train_eval_iterator(config: ml_collections.ConfigDict, *, process_index: int,
                        process_count: int) -> Iterator[Batch]:
  """See `pipeline.train_eval_iterator`: `eval_iterator`'s batches over the kept training
  examples (per class, classes, cap), unaugmented, in stored order."""
  local = batching.local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  batching.check_process(process_index, process_count)
  images, labels, keep = sources.train_examples(config.data)
  steps = batching.eval_steps(len(keep), local, process_count, contiguous=False)
  return _eval_batches(images, labels, steps=steps, global_batch=config.eval_batch_size,
                       local_batch=local, process_index=process_index, index=keep)


def _eval_batches(images: np.ndarray, labels: np.ndarray, *, steps: int, global_batch: int,
                  local_batch: int, process_index: int,
                  index: np.ndarray | None = None) -> Iterator[Batch]:
  """Global batch i: examples [i*G, (i+1)*G) of `index` (the rows of `images` / `labels`
  evaluated; None: all of them), zero-padded and masked past the end."""
  n = len(labels) if index is None else len(index)
  offset = process_index * local_batch + np.arange(local_batch)
  for i in range(steps):
    position = i * global_batch + offset
    mask = position < n
    valid = position[mask] if index is None else index[position[mask]]
    image = np.zeros((local_batch,) + images.shape[1:], np.uint8)
    label = np.zeros((local_batch,), np.int32)
    image[mask] = images[valid]
    label[mask] = labels[valid]
    yield {"image": image, "label": label, "mask": mask}
