"""Pipelines for datasets too big for memory (ImageNet), streamed from tfds records.

Train: the stream is a sequence of explicit epochs of `steps_per_epoch` = N // batch_size
steps (N training examples; the same as (N // P) // L, so each process's share holds them
and stream epoch e is training epoch e). Epoch e of process p reads p's share of the
training split (`tfds.split_for_jax_process`, remainder dropped) with its files shuffled by
`tfds.ReadConfig(shuffle_seed=...)` and its records shuffled in a `config.data.shuffle_buffer`
buffer, both seeded by `epoch_seeds(config.seed, e)` and read once (nothing reshuffles
behind our back), and keeps the first K = steps_per_epoch * L records. Its j-th record gets
a random-resized crop + flip with the stateless seed `example_seed(seed, e, p * K + j)`:
the order and the augmentation of every example are pure functions of (seed, process,
epoch, position in epoch).

Resuming at step s builds epoch s // steps_per_epoch directly and skips (reads without
decoding) only its first (s % steps_per_epoch) * L records: a resume reads at most one
epoch of this process's records, however late the step. While an epoch is consumed, the
next one's first batch is made in a background thread (its shuffle buffer filled:
min(shuffle_buffer, N // P) records), so its start is ready at the boundary when that fill
takes less than an epoch; two shuffle buffers are held meanwhile.

Eval: process p reads its contiguous share of the (capped) validation split
(`tfds.even_splits`, sizes differ by at most one), resize + center crop, and pads with
masked zero examples to the same number of batches on every process.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import threading
from typing import Callable, Dict, Iterator, Tuple

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from clu import deterministic_data

from mixskd_jax.data import augment
from mixskd_jax.data import batching
from mixskd_jax.data import datasets
from mixskd_jax.data import sources

Batch = Dict[str, np.ndarray]


def epoch_seeds(seed: int, epoch: int) -> Tuple[int, int]:
  """(file-order seed, shuffle-buffer seed) of one stream epoch: a pure function of both."""
  files, records = np.random.SeedSequence([seed, epoch]).generate_state(2)
  return int(files), int(records)


def epoch_records(builder: tfds.core.DatasetBuilder, split, epoch: int, *, seed: int,
                  shuffle_buffer: int, keep: int) -> tf.data.Dataset:
  """The first `keep` records of one epoch's shuffled share, images still JPEG bytes.

  Args:
    split: this process's share of the training split (a tfds split).
    keep: records kept (steps_per_epoch * local batch); the rest of the share is dropped.

  Returns:
    Elements {'image': () string, 'label': () int64, ...}, a deterministic order.
  """
  file_seed, record_seed = epoch_seeds(seed, epoch)
  ds = builder.as_dataset(
    split=split, shuffle_files=True, decoders={"image": tfds.decode.SkipDecoding()},
    # Each epoch's dataset is read once: tfds's auto-cache of small splits would only cost memory.
    read_config=tfds.ReadConfig(shuffle_seed=file_seed, shuffle_reshuffle_each_iteration=False,
                                try_autocache=False))
  return ds.shuffle(shuffle_buffer, seed=record_seed, reshuffle_each_iteration=False).take(keep)


def _first_in_background(ds: tf.data.Dataset) -> concurrent.futures.Future:
  """(first batch, iterator over the rest) of `ds`, made in another thread.

  Not a daemon thread: at exit Python waits for it (one shuffle-buffer fill at most), because
  a daemon thread frozen inside tf.data (in a Python generator's py_function, as under
  tfds.testing.mock_data) can leave the iterator's destructor waiting forever.
  """
  future: concurrent.futures.Future = concurrent.futures.Future()

  def run():
    try:
      iterator = ds.as_numpy_iterator()
      future.set_result((next(iterator), iterator))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      future.set_exception(e)
  threading.Thread(target=run, name="mixskd-next-epoch").start()
  return future


def _started_ahead(start: Callable[[int], tf.data.Dataset], first: int) -> Iterator[Batch]:
  """The batches of the datasets `start(first)`, `start(first + 1)`, ..., lazily.

  Epoch e + 1's iterator is made and its first batch fetched (its shuffle buffer filled) in
  the background while epoch e is consumed. `start` itself runs in the caller's thread:
  tfds builds its datasets there, as it would without us (tfds.testing.mock_data patches
  tfds for the whole process while its `with` block runs). Errors surface here, when their
  epoch is reached.
  """
  upcoming = _first_in_background(start(first))
  for e in itertools.count(first + 1):
    first_batch, rest = upcoming.result()
    upcoming = _first_in_background(start(e))
    yield first_batch
    yield from rest


def _decode_fn(config: ml_collections.ConfigDict, offset: int):
  """(epoch, position in the process's epoch, record) -> {'image': (H, W, 3) uint8,
  'label': () int32}, the example seed `example_seed(seed, epoch, offset + position)`.

  A `tf.function` with tensor arguments, so that every epoch's `map` reuses one trace.
  """
  spec = datasets.get_spec(config.data.name)
  height, seed = spec.image_shape[0], config.seed

  @tf.function
  def decode(epoch, position, ex):
    if config.data.augment:
      image = augment.decode_random_resized_crop_flip(
        ex["image"], augment.example_seed(seed, epoch, offset + position), size=height)
    else:
      image = augment.resize_center_crop(tf.io.decode_jpeg(ex["image"], channels=3),
                                         spec.eval_resize, height)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}
  return decode


def _check_train_fields(config: ml_collections.ConfigDict) -> None:
  name = config.data.name
  for field in ("class_pairs", "example_ids"):
    if config.data.get(field, False):
      raise ValueError(f"config.data.{field}=True needs an in-memory dataset (fashion_mnist, "
                       f"cifar10, cifar100), not the streamed {name!r}: the methods that "
                       "use it (cs_kd, ps_kd) index the whole training set.")
  if config.data.shuffle_buffer < 1:
    raise ValueError(f"config.data.shuffle_buffer={config.data.shuffle_buffer} must be >= 1 "
                     "(examples in each epoch's shuffle buffer; 10_000 for ImageNet).")
  if config.seed < 0:
    raise ValueError(f"config.seed={config.seed} must be >= 0 (it seeds the epochs' order).")


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[Batch]:
  """See `pipeline.train_iterator`."""
  _check_train_fields(config)
  local = batching.local_batch_size(config.batch_size, process_count, "batch_size")
  batching.check_process(process_index, process_count)
  builder = sources.get_builder(config.data)
  split = tfds.split_for_jax_process(
    sources.streamed_split(config.data, train=True), process_index=process_index,
    process_count=process_count, drop_remainder=True)
  # The trainer's steps per epoch: N // (P * L) full local batches fit in each share of N // P.
  steps = batching.train_steps_per_epoch(sources.num_train_examples(config.data), config)
  keep = steps * local

  decode = _decode_fn(config, process_index * keep)

  def start(epoch: int) -> tf.data.Dataset:
    skip = max(start_step - epoch * steps, 0) * local  # > 0 in the resumed epoch only
    ds = epoch_records(builder, split, epoch, seed=config.seed,
                       shuffle_buffer=config.data.shuffle_buffer, keep=keep)
    ds = ds.skip(skip).enumerate(start=skip)
    ds = ds.map(functools.partial(decode, tf.constant(epoch, tf.int64)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(local, drop_remainder=True).prefetch(config.data.prefetch)

  return _started_ahead(start, start_step // steps)


def eval_iterator(config: ml_collections.ConfigDict, *, process_index: int,
                  process_count: int) -> Iterator[Batch]:
  """See `pipeline.eval_iterator`."""
  spec = datasets.get_spec(config.data.name)
  local = batching.local_batch_size(config.eval_batch_size, process_count, "eval_batch_size")
  batching.check_process(process_index, process_count)
  builder = sources.get_builder(config.data)
  n = sources.num_test_examples(config.data)
  steps = batching.eval_steps(n, local, process_count, contiguous=True)
  split = tfds.even_splits(sources.streamed_split(config.data, train=False), n=process_count)
  ds = builder.as_dataset(split=split[process_index], shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()}).take(n)
  count = int(ds.cardinality())
  if count < 0:  # tfds.testing.mock_data gives no cardinality: count the (undecoded) records
    count = int(ds.reduce(0, lambda c, _: c + 1))

  def decode(ex):
    image = augment.resize_center_crop(tf.io.decode_jpeg(ex["image"], channels=3),
                                       spec.eval_resize, spec.image_shape[0])
    image.set_shape(spec.image_shape)  # the padding's zero images take this shape
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Zero examples with mask False, up to the same number of batches on every process.
  ds = deterministic_data.pad_dataset(ds, batch_dims=[local], pad_up_to_batches=steps,
                                      cardinality=count)
  ds = ds.batch(local, drop_remainder=True).prefetch(config.data.prefetch)
  return iter(ds.as_numpy_iterator())
