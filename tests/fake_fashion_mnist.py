"""Tiny Fashion-MNIST IDX files for tests: the four gzipped files the Debian package installs,
with `n` random images per split, so that preparing them takes seconds."""

import gzip
import os

import numpy as np


def write_idx(folder, n, seed=0):
  """Four tiny gzipped Fashion-MNIST IDX files (n train and n test images) in `folder`."""
  rng = np.random.default_rng(seed)
  header = lambda *ints: np.asarray(ints, ">u4").tobytes()
  for prefix in ("train", "t10k"):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
      f.write(header(2051, n, 28, 28) + images.tobytes())
    with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
      f.write(header(2049, n) + labels.tobytes())
