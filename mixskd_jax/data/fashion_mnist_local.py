"""Fashion-MNIST without a download: a tfds builder that reads the four IDX files from disk.

tfds's own `manual_dir` route fails here (it still verifies the download checksums), so
`LocalFashionMNIST` subclasses tfds's `FashionMNIST` and only replaces where the files come
from. It keeps the name `fashion_mnist` and the version of the stock builder, so it prepares
into the ordinary `data_dir/fashion_mnist/<version>/` folder, with the same records in the
same order as a tfds download would give; later runs (and other hosts) just load it with
`tfds.builder("fashion_mnist")`.

`fashion_mnist_builder(data_dir, idx_dir)` decides where the data comes from:
prepared tfds data > local IDX files > tfds download > a clear error. It prepares under a
per-dataset lock (`integrity.preparing`), reads the IDX files through before writing anything
(`check_idx_files`: a damaged one is a one-line `DataFaultError`), and records what it wrote
(`integrity.write_manifest`).
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from mixskd_jax.config.errors import DataFaultError
from mixskd_jax.data import integrity

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


REINSTALL = "apt-get install --reinstall dataset-fashion-mnist"


def _fix(path: str) -> str:
  """What to do about a damaged IDX file: the package's files are reinstalled, others replaced."""
  if os.path.dirname(os.path.abspath(path)) == DEFAULT_IDX_DIR:
    return (f"reinstall the package ({REINSTALL}), or set --config.data.idx_dir to a folder "
            "with intact files")
  return ("replace it with an intact copy, or unset --config.data.idx_dir to use "
          f"{DEFAULT_IDX_DIR} (apt-get install dataset-fashion-mnist)")


def _read_idx(path: str, magic: int, dims: int, what: str) -> tuple[np.ndarray, np.ndarray]:
  """(the header's sizes, the payload bytes) of a gzipped IDX file, or DataFaultError naming the
  file, what is wrong with it and the fix."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, unreadable
    raise DataFaultError(f"{path} cannot be read as a gzipped IDX {what} file "
                         f"({type(e).__name__}: {e}): {_fix(path)}.") from None
  header_bytes = 4 * (1 + dims)
  if len(data) < header_bytes:
    raise DataFaultError(f"{path} is not an IDX {what} file ({len(data)} bytes, shorter than "
                         f"its {header_bytes}-byte header): {_fix(path)}.")
  header = np.frombuffer(data, ">u4", count=1 + dims)
  if header[0] != magic:
    raise DataFaultError(f"{path} is not an IDX {what} file (magic number {header[0]}, "
                         f"expected {magic}): {_fix(path)}.")
  return header[1:], np.frombuffer(data, np.uint8, offset=header_bytes)


def read_idx_images(path: str) -> np.ndarray:
  """Reads a gzipped IDX3 image file. Returns (N, 28, 28, 1) uint8.

  Raises:
    DataFaultError: the file is not gzip, not IDX images, or cut short (one line with the fix).
  """
  (n, rows, cols), images = _read_idx(path, _IMAGE_MAGIC, 3, "image")
  if images.size != int(n) * int(rows) * int(cols):
    raise DataFaultError(f"{path} is truncated: {images.size} bytes for {n}x{rows}x{cols} "
                         f"images: {_fix(path)}.")
  return images.reshape(int(n), int(rows), int(cols), 1)


def read_idx_labels(path: str) -> np.ndarray:
  """Reads a gzipped IDX1 label file. Returns (N,) int64.

  Raises:
    DataFaultError: the file is not gzip, not IDX labels, or cut short (one line with the fix).
  """
  (n,), labels = _read_idx(path, _LABEL_MAGIC, 1, "label")
  if labels.size != int(n):
    raise DataFaultError(f"{path} is truncated: {labels.size} of {n} labels: {_fix(path)}.")
  return labels.astype(np.int64)


def check_idx_files(idx_dir: str) -> None:
  """Reads all four IDX files of `idx_dir` through (about a second): images and labels whole
  and as many as each other, before anything is prepared from them.

  Raises:
    DataFaultError: the first damaged file, in one line with the fix.
  """
  path = {k: os.path.join(idx_dir, f) for k, f in IDX_FILES.items()}
  for split in ("train", "test"):
    images = read_idx_images(path[f"{split}_images"])
    labels = read_idx_labels(path[f"{split}_labels"])
    if len(images) != len(labels):
      raise DataFaultError(f"{path[f'{split}_images']} has {len(images)} images but "
                           f"{path[f'{split}_labels']} has {len(labels)} labels: "
                           f"{_fix(path[f'{split}_images'])}.")


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
      raise DataFaultError(f"{images_path} has {len(images)} images but {labels_path} has "
                           f"{len(labels)} labels: {_fix(images_path)}.")
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
  # One process prepares; others started with it wait here and then find it prepared.
  with integrity.preparing(builder):
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared():
      return builder
    if has_idx_files(idx_dir):
      check_idx_files(idx_dir)  # a damaged file answers before anything is written
      local = LocalFashionMNIST(idx_dir=idx_dir, data_dir=data_dir)
      local.download_and_prepare()
      integrity.write_manifest(local, checksums=True)
      return local
    try:
      _download_and_prepare(builder)
    except Exception as e:  # pylint: disable=broad-except  (any failure means: offline)
      missing = ", ".join(IDX_FILES.values())
      raise FashionMNISTMissingError(
        f"Fashion-MNIST is not prepared in tfds data_dir {builder.data_dir_root!r}, the IDX "
        f"files ({missing}) are not all in {idx_dir!r}, and the tfds download failed ({e!r}). "
        "Fix one of: `apt-get install dataset-fashion-mnist` (installs the IDX files in "
        f"{DEFAULT_IDX_DIR}); or set config.data.idx_dir to a folder with the 4 IDX files; or "
        "allow tfds to download (network access), or set config.data.data_dir to a tfds "
        "data_dir where fashion_mnist is already prepared.") from e
    integrity.write_manifest(builder, checksums=True)
  return builder
