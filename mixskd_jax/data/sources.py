"""Where examples come from: prepared tfds builders, and whole splits as numpy arrays.

Small datasets (Fashion-MNIST, CIFAR) are loaded once per process as numpy arrays, in the
stored tfds order, so that every host holds the same arrays and the pipeline can index them
exactly. With `config.data.classes` a split is the examples of those classes alone, in stored
order, relabeled 0..k-1 (`select_classes`); everything downstream sees only that. Loaded
splits are cached in memory (a few, keyed by dataset, split, folders, kept classes and the
identity of tfds's reading functions, so data from `tfds.testing.mock_data` never leaks into
real runs or into another mock).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mixskd_jax.data import datasets
from mixskd_jax.data import fashion_mnist_local
from mixskd_jax.data import integrity
from mixskd_jax.data.tf_setup import hide_accelerators_from_tf

_LOAD_CHUNK = 10_000  # examples per numpy chunk while loading a split


class DatasetUnavailableError(FileNotFoundError):
  """A dataset is not prepared and cannot be prepared here."""


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """A prepared tfds builder for `config.data` (prepares it first if it can).

  Fashion-MNIST: prepared tfds data, else the local IDX files, else a tfds download.
  ImageNet: prepared tfds data, else built from the tars in `config.data.manual_dir`.
  CIFAR: prepared tfds data, else a tfds download.
  """
  hide_accelerators_from_tf()
  spec = datasets.get_spec(data_config.name)
  if spec.name == "fashion_mnist":
    return fashion_mnist_local.fashion_mnist_builder(data_config.data_dir, data_config.idx_dir)
  builder = tfds.builder(spec.tfds_name, data_dir=data_config.data_dir)
  if builder.is_prepared():
    return builder
  # One process prepares; others started with it wait here and then find it prepared.
  with integrity.preparing(builder):
    builder = tfds.builder(spec.tfds_name, data_dir=data_config.data_dir)
    if not builder.is_prepared():
      _prepare(builder, spec, data_config)
      # Sizes always; checksums only for the small in-memory datasets (ImageNet is 150 GB).
      integrity.write_manifest(builder, checksums=spec.in_memory)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, spec: datasets.DatasetSpec,
             data_config: ml_collections.ConfigDict) -> None:
  if spec.name == "imagenet2012":
    download_config = tfds.download.DownloadConfig(manual_dir=data_config.manual_dir)
    hint = ("Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a folder and set "
            "config.data.manual_dir to it (tfds builds the dataset from them once), or set "
            "config.data.data_dir to a tfds data_dir where imagenet2012 is prepared.")
  else:
    download_config = None
    hint = ("Allow tfds to download it (network access), or set config.data.data_dir to a "
            f"tfds data_dir where {spec.tfds_name} is already prepared.")
  try:
    builder.download_and_prepare(download_config=download_config)
  except Exception as e:  # pylint: disable=broad-except  (any failure: tell the user the fix)
    raise DatasetUnavailableError(
      f"Dataset config.data.name={spec.name!r} is not prepared in tfds data_dir "
      f"{builder.data_dir_root!r} and preparing it failed ({e!r}). {hint}") from e


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples of a tfds split string such as 'train' or 'validation[:100]'."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError):  # No split metadata (tfds.testing.mock_data): count.
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    n = int(ds.cardinality())
    return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1))


def _tfds_reader_token():
  """Identifies tfds's current reading functions; `tfds.testing.mock_data` replaces them."""
  core = tfds.core.dataset_builder
  # pylint: disable-next=protected-access
  return core.DatasetBuilder.as_dataset, core.FileReaderBuilder._as_dataset


@functools.lru_cache(maxsize=4)
def _load_split_cached(name, split, data_dir, idx_dir, reader_token):
  del reader_token  # Only part of the cache key.
  data_config = ml_collections.ConfigDict(
    dict(name=name, data_dir=data_dir, idx_dir=idx_dir, manual_dir=None))
  builder = get_builder(data_config)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(interleave_cycle_length=1))
  images, labels = [], []
  # Not as_dataset(batch_size=-1): that batches by the split size tfds recorded, and under
  # tfds.testing.mock_data (how users and our tests mock a dataset) none is recorded, so tfds
  # batches by sys.maxsize and the process aborts (std::length_error).
  try:
    for chunk in tfds.as_numpy(ds.batch(_LOAD_CHUNK)):
      images.append(chunk["image"])
      labels.append(chunk["label"].astype(np.int32))
  except Exception as e:  # pylint: disable=broad-except  (only TensorFlow's read errors: below)
    fault = integrity.read_fault(e, str(builder.data_dir), what=f" ({split} split)")
    if fault is None:
      raise
    raise fault from None
  spec = datasets.get_spec(name)
  images = np.concatenate(images) if images else np.zeros((0,) + spec.image_shape, np.uint8)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def select_classes(labels: np.ndarray, classes: Tuple[int, ...],
                   num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
  """The examples whose label is one of `classes`, relabeled by position in `classes`.

  Args:
    labels: (N,) int labels in [0, num_classes).
    classes: k distinct labels to keep; classes[i] becomes label i.
    num_classes: the dataset's number of labels.

  Returns:
    indices: (M,) int64 increasing indices of the kept examples.
    relabeled: (M,) int32 their new labels, in [0, k).
  """
  lookup = np.full(num_classes, -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
  new = lookup[labels]
  indices = np.flatnonzero(new >= 0)
  return indices, new[indices]


@functools.lru_cache(maxsize=4)
def _class_subset_cached(name, split, data_dir, idx_dir, classes, reader_token):
  images, labels = _load_split_cached(name, split, data_dir, idx_dir, reader_token)
  indices, relabeled = select_classes(labels, classes, datasets.get_spec(name).num_classes)
  images = images[indices]
  images.flags.writeable = False
  relabeled.flags.writeable = False
  return images, relabeled


def load_split(data_config: ml_collections.ConfigDict,
               split: str) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split of an in-memory dataset, in stored order (read-only, cached); with
  `config.data.classes`, only those classes' examples, relabeled 0..k-1.

  Returns:
    images: (N, H, W, C) uint8.
    labels: (N,) int32.
  """
  spec = datasets.get_spec(data_config.name)
  if not spec.in_memory:
    raise ValueError(f"config.data.name={spec.name!r} is streamed, not loaded into memory.")
  key = (spec.name, split, data_config.data_dir, data_config.idx_dir)
  classes = datasets.kept_classes(data_config)
  if classes is None:
    return _load_split_cached(*key, _tfds_reader_token())
  return _class_subset_cached(*key, classes, _tfds_reader_token())


def clear_cache() -> None:
  """Forgets the loaded splits."""
  _load_split_cached.cache_clear()
  _class_subset_cached.cache_clear()


def _check_cap(value: Optional[int], field: str) -> None:
  if value is not None and value <= 0:
    raise ValueError(f"config.data.{field}={value} must be positive (or None for all).")


def train_subset(labels: np.ndarray, num_classes: int, per_class: Optional[int],
                 cap: Optional[int]) -> np.ndarray:
  """Indices of the training examples used, in stored order.

  Args:
    labels: (N,) int labels of the full split.
    num_classes: number of classes.
    per_class: keep the first `per_class` examples of every class (None: all).
    cap: then keep the first `cap` of those (None: all).

  Returns:
    (M,) int64 increasing indices into the split.
  """
  _check_cap(per_class, "train_examples_per_class")
  _check_cap(cap, "train_examples")
  indices = np.arange(len(labels))
  if per_class is not None:
    chosen = []
    for c in range(num_classes):
      of_c = np.flatnonzero(labels == c)
      if len(of_c) < per_class:
        raise ValueError(f"config.data.train_examples_per_class={per_class}, but class {c} has "
                         f"only {len(of_c)} training examples.")
      chosen.append(of_c[:per_class])
    indices = np.sort(np.concatenate(chosen))
  return indices[:datasets.capped(len(indices), cap)]


def train_examples(
    data_config: ml_collections.ConfigDict) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The training split of an in-memory dataset and the examples the config keeps.

  Returns:
    images: (N, H, W, C) uint8, the whole split (of the kept classes, `load_split`).
    labels: (N,) int32, the whole split (relabeled 0..k-1 with config.data.classes).
    keep: (M,) int64 increasing indices of the examples used (per class, then cap).
  """
  spec = datasets.get_spec(data_config.name)
  images, labels = load_split(data_config, spec.train_split)
  keep = train_subset(labels, datasets.num_classes(data_config),
                      data_config.train_examples_per_class,
                      data_config.train_examples)
  return images, labels, keep


def test_arrays(data_config: ml_collections.ConfigDict) -> Tuple[np.ndarray, np.ndarray]:
  """The test examples of an in-memory dataset, the first `config.data.test_examples`.

  Returns:
    images: (N, H, W, C) uint8.
    labels: (N,) int32.
  """
  spec = datasets.get_spec(data_config.name)
  _check_cap(data_config.test_examples, "test_examples")
  images, labels = load_split(data_config, spec.test_split)
  n = datasets.capped(len(labels), data_config.test_examples)
  return images[:n], labels[:n]


def streamed_split(data_config: ml_collections.ConfigDict, train: bool) -> str:
  """The tfds split string of a streamed dataset, with the configured cap: 'train[:100]'."""
  spec = datasets.get_spec(data_config.name)
  if train and data_config.train_examples_per_class is not None:
    raise ValueError("config.data.train_examples_per_class is only supported for the in-memory "
                     f"datasets, not {spec.name!r}; use config.data.train_examples.")
  if data_config.get("classes") is not None:
    raise ValueError("config.data.classes is only supported for the in-memory datasets, not "
                     f"{spec.name!r}; set it to None.")
  field = "train_examples" if train else "test_examples"
  cap = data_config.get(field)
  _check_cap(cap, field)
  split = spec.train_split if train else spec.test_split
  return split if cap is None else f"{split}[:{int(cap)}]"


def num_train_examples(data_config: ml_collections.ConfigDict) -> int:
  """Training examples after subset and cap."""
  if datasets.get_spec(data_config.name).in_memory:
    return len(train_examples(data_config)[2])
  n = split_size(get_builder(data_config), streamed_split(data_config, train=True))
  # Under tfds.testing.mock_data split slicing is ignored; the cap still holds.
  return datasets.capped(n, data_config.train_examples)


def num_test_examples(data_config: ml_collections.ConfigDict) -> int:
  """Test examples after the cap."""
  if datasets.get_spec(data_config.name).in_memory:
    return len(test_arrays(data_config)[1])
  builder = get_builder(data_config)
  n = split_size(builder, streamed_split(data_config, train=False))
  # Under tfds.testing.mock_data split slicing is ignored; the cap still holds.
  return datasets.capped(n, data_config.test_examples)
