"""`DatasetInfo` of `config.data`: a dataset's fixed facts (`datasets`) plus the sizes that its
subsetting and caps leave, which need the labels or the tfds metadata (`sources`)."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import ml_collections

from mixskd_jax.data import datasets
from mixskd_jax.data import sources


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about the configured data.

  Attributes:
    name: `config.data.name`.
    num_classes: number of labels (after `config.data.classes`).
    image_shape: (H, W, C) of a batch's images.
    num_train: training examples after the balanced subset and the cap.
    num_test: test examples after the cap.
    mean, std: per-channel normalization constants in [0, 1] units, length C.
  """
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]
  num_train: int
  num_test: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]


def get_dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes and constants of `config.data`. Loads the labels (or reads tfds metadata) once."""
  spec = datasets.get_spec(data_config.name)
  return DatasetInfo(
    name=spec.name, num_classes=datasets.num_classes(data_config), image_shape=spec.image_shape,
    num_train=sources.num_train_examples(data_config),
    num_test=sources.num_test_examples(data_config),
    mean=spec.mean, std=spec.std)
