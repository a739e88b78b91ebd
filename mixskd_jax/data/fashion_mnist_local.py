"""Fashion-MNIST without a download: a tfds builder that reads the four IDX files from disk.

tfds's own `manual_dir` route fails here (it still verifies the download checksums), so
`LocalFashionMNIST` subclasses tfds's `FashionMNIST` and only replaces where the files come
from. It keeps the name `fashion_mnist` and the version of the stock builder, so it prepares
into the ordinary `data_dir/fashion_mnist/<version>/` folder, with the same records in the
same order as a tfds download would give; later runs (and other hosts) just load it with
`tfds.builder("fashion_mnist")`.

`fashion_mnist_builder(data_dir, idx_dir)` decides where the data comes from:
prepared tfds data > local IDX files > tfds download > a clear error.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
  "train_images": "train-images-idx3-ubyte.gz",
  "train_labels": "train-labels-idx1-ubyte.gz",
  "test_images": "t10k-images-idx3-ubyte.gz",
  "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049


class FashionMNISTMissingError(FileNotFoundError):
  """Fashion-MNIST is neither prepared, nor on disk as IDX files, nor downloadable."""


def read_idx_images(path: str) -> np.ndarray:
  """Reads a gzipped IDX3 image file. Returns (N, 28, 28, 1) uint8."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic, n, rows, cols = np.frombuffer(data, ">u4", count=4, offset=0)
  if magic != _IMAGE_MAGIC:
    raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected {_IMAGE_MAGIC}).")
  images = np.frombuffer(data, np.uint8, offset=16)
  if images.size != n * rows * cols:
    raise ValueError(f"{path} is truncated: {images.size} bytes for {n}x{rows}x{cols} images.")
  return images.reshape(int(n), int(rows), int(cols), 1)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads a gzipped IDX1 label file. Returns (N,) int64."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic, n = np.frombuffer(data, ">u4", count=2, offset=0)
  if magic != _LABEL_MAGIC:
    raise ValueError(f"{path} is not an IDX label file (magic {magic}, expected {_LABEL_MAGIC}).")
  labels = np.frombuffer(data, np.uint8, offset=8)
  if labels.size != n:
    raise ValueError(f"{path} is truncated: {labels.size} of {n} labels.")
  return labels.astype(np.int64)


def has_idx_files(idx_dir: Optional[str]) -> bool:
  """Whether `idx_dir` holds all four Fashion-MNIST IDX .gz files."""
  return bool(idx_dir) and all(
    os.path.isfile(os.path.join(idx_dir, f)) for f in IDX_FILES.values())


class LocalFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
  """tfds `fashion_mnist`, generated from local IDX files instead of a download."""

  name = "fashion_mnist"

  def __init__(self, *, idx_dir: str = DEFAULT_IDX_DIR, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    path = {k: os.path.join(self._idx_dir, f) for k, f in IDX_FILES.items()}
    return [
      tfds.core.SplitGenerator(
        name=split,
        gen_kwargs=dict(images_path=path[f"{split}_images"], labels_path=path[f"{split}_labels"]))
      for split in ("train", "test")
    ]

  def _generate_examples(self, images_path, labels_path):
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(images) != len(labels):
      raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                       f"{len(labels)} labels.")
    # Keys are file indices, as in tfds's MNIST builder, so the stored order is the same.
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image, "label": label}


def _download_and_prepare(builder) -> None:
  """The tfds download path (a seam for tests that must run offline)."""
  builder.download_and_prepare()


def fashion_mnist_builder(data_dir: Optional[str] = None,
                          idx_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """A prepared tfds builder for `fashion_mnist`.

  Args:
    data_dir: tfds data_dir (None: tfds's default, usually ~/tensorflow_datasets).
    idx_dir: folder with the four IDX .gz files; None means `DEFAULT_IDX_DIR` (the Debian
      package dataset-fashion-mnist).

  Returns:
    A builder whose `as_dataset` works: already prepared, else prepared from the IDX files,
    else downloaded by tfds.

  Raises:
    FashionMNISTMissingError: none of the three sources works.
  """
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  if builder.is_prepared():
    return builder
  idx_dir = idx_dir or DEFAULT_IDX_DIR
  if has_idx_files(idx_dir):
    local = LocalFashionMNIST(idx_dir=idx_dir, data_dir=data_dir)
    local.download_and_prepare()
    return local
  try:
    _download_and_prepare(builder)
  except Exception as e:  # pylint: disable=broad-except  (any failure means: offline)
    missing = ", ".join(IDX_FILES.values())
    raise FashionMNISTMissingError(
      f"Fashion-MNIST is not prepared in tfds data_dir {builder.data_dir_root!r}, the IDX files "
      f"({missing}) are not all in {idx_dir!r}, and the tfds download failed ({e!r}). Fix one "
      "of: `apt-get install dataset-fashion-mnist` (installs the IDX files in "
      f"{DEFAULT_IDX_DIR}); or set config.data.idx_dir to a folder with the 4 IDX files; or "
      "allow tfds to download (network access), or set config.data.data_dir to a tfds "
      "data_dir where fashion_mnist is already prepared.") from e
  return builder
