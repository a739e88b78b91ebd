"""Pipelines for datasets too big for memory (ImageNet), streamed from tfds records.

Train: each process reads its own share of the training split
(`tfds.split_for_jax_process`, remainder dropped), files shuffled with
`tfds.ReadConfig(shuffle_seed=config.seed)`, repeated, shuffled in a buffer with the same
seed, decoded with a random-resized crop + flip whose stateless seed is
`example_seed(seed, process_index, n)` for the n-th example of the process's stream.
The stream is deterministic, so resuming at `start_step` is exact, but it *replays*: it
reads (without decoding) and skips the first start_step * L records of the stream, which
for a late step costs a pass over the records read so far. Epochs are not aligned to
steps: the stream is one long repetition of the shuffled split.

Eval: process p reads its contiguous share of the (capped) validation split
(`tfds.even_splits`, sizes differ by at most one), resize + center crop, and pads with
masked zero examples to the same number of batches on every process.
"""

from __future__ import annotations

from typing import Dict, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixskd_jax.data import augment
from mixskd_jax.data import batching
from mixskd_jax.data import datasets
from mixskd_jax.data import sources

Batch = Dict[str, np.ndarray]
DEFAULT_SHUFFLE_BUFFER = 10_000  # examples; config.data.shuffle_buffer overrides it


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int, process_index: int,
                   process_count: int) -> Iterator[Batch]:
  """See `pipeline.train_iterator`."""
  spec = datasets.get_spec(config.data.name)
  for field in ("class_pairs", "example_ids"):
    if config.data.get(field, False):
      raise ValueError(f"config.data.{field}=True needs an in-memory dataset (fashion_mnist, "
                       f"cifar10, cifar100), not the streamed {spec.name!r}: the methods that "
                       "use it (cs_kd, ps_kd) index the whole training set.")
  local = batching.local_batch_size(config.batch_size, process_count, "batch_size")
  batching.check_process(process_index, process_count)
  builder = sources.get_builder(config.data)
  split = tfds.split_for_jax_process(
    sources.streamed_split(config.data, train=True), process_index=process_index,
    process_count=process_count, drop_remainder=True)
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(shuffle_seed=config.seed))
  ds = ds.repeat().shuffle(config.data.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER),
                           seed=config.seed)
  ds = ds.enumerate().skip(start_step * local)
  height = spec.image_shape[0]
  seed = config.seed

  def decode(n, ex):
    image = ex["image"]
    if config.data.augment:
      image = augment.decode_random_resized_crop_flip(
        image, augment.example_seed(seed, process_index, n), size=height)
    else:
      image = augment.resize_center_crop(tf.io.decode_jpeg(image, channels=3),
                                         spec.eval_resize, height)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(config.data.prefetch)
  return iter(ds.as_numpy_iterator())


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
                          decoders={"image": tfds.decode.SkipDecoding()})

  def decode(ex):
    image = augment.resize_center_crop(tf.io.decode_jpeg(ex["image"], channels=3),
                                       spec.eval_resize, spec.image_shape[0])
    return {"image": image, "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True)}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
    "image": tf.zeros(spec.image_shape, tf.uint8), "label": tf.constant(0, tf.int32),
    "mask": tf.constant(False)}).repeat()
  ds = ds.take(n).concatenate(padding).take(steps * local)
  ds = ds.batch(local, drop_remainder=True).prefetch(config.data.prefetch)
  return iter(ds.as_numpy_iterator())
