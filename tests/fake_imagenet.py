"""A tiny real imagenet2012 for tests: fake ILSVRC tars, built by tfds's own imagenet2012
builder into real TFRecord shards (unlike `tfds.testing.mock_data`, splits, shards and
file shuffling behave as on the real dataset)."""

import io
import os
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NUM_TRAIN = 60  # 3 classes x 20
NUM_SHARDS = 4


def _jpeg(rng: np.random.Generator) -> bytes:
  h, w = rng.integers(16, 40, size=2)
  return tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_tars(manual_dir: str, classes: int = 3, per_class: int = NUM_TRAIN // 3,
               num_val: int = 10, seed: int = 0) -> None:
  """ILSVRC2012_img_train.tar (one inner tar per synset) and ILSVRC2012_img_val.tar."""
  rng = np.random.default_rng(seed)
  with open(tfds.core.tfds_path("datasets/imagenet2012/labels.txt")) as f:
    synsets = f.read().split()[:classes]
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for i in range(per_class):
          _add(t, f"{synset}_{i}.JPEG", _jpeg(rng))
      _add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(num_val):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng))


def prepare(root: str) -> str:
  """Writes the tars under root/manual and builds them into root/tfds; returns that data_dir."""
  manual, data_dir = os.path.join(root, "manual"), os.path.join(root, "tfds")
  os.makedirs(manual, exist_ok=True)
  write_tars(manual)
  tfds.builder("imagenet2012", data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual, num_shards=NUM_SHARDS))
  return data_dir
