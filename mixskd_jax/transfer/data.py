"""The downstream data of a transfer evaluation: training, validation and test examples.

The training examples are the first `train_examples_per_class` of every downstream class in
the training split (as the trainer's `data.train_examples_per_class` keeps them). The
validation examples, used only to choose the learning rate and the BatchNorm mode, are the
next `validation_examples_per_class` of every class in the same split: never trained on, and
disjoint from the test split, which is read once, at the chosen setting.

Why not hold out part of the 50 labelled images per class: 10 per class (50 images) made a
validation accuracy whose noise (one image is 2 points) decided the choice; on the label
smoothing backbone it picked the lowest probe rate, 8 points below the others on test.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from mixskd_jax.data import datasets, sources


@dataclasses.dataclass(frozen=True)
class Split:
  """images: (N, H, W, C) uint8; labels: (N,) int32."""
  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Downstream:
  """train, validation, test; the dataset's normalization and class count."""
  train: Split
  validation: Split
  test: Split
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]



def validation_indices(labels: np.ndarray, num_classes: int, *, after: int,
                       per_class: int) -> np.ndarray:
  """Indices into the split: for every class, its examples number `after` to
  `after + per_class - 1` in stored order (the ones after the training examples); increasing.

  Raises:
    ValueError: a class with too few examples, naming the field and the count.
  """
  chosen = []
  for c in range(num_classes):
    of_c = np.flatnonzero(labels == c)
    if len(of_c) < after + per_class:
      raise ValueError(f"data.validation_examples_per_class={per_class}: class {c} has "
                       f"{len(of_c)} training-split examples, fewer than the "
                       f"{after} trained on plus {per_class}; lower it.")
    chosen.append(of_c[after:after + per_class])
  return np.sort(np.concatenate(chosen))


def load(data_config: ml_collections.ConfigDict) -> Downstream:
  """`config.data` of a transfer config -> its `Downstream` data (in-memory datasets)."""
  if data_config.train_examples_per_class is None:
    raise ValueError("data.train_examples_per_class must be set: the validation examples "
                     "are the ones after them in every class.")
  images, labels, keep = sources.train_examples(data_config)
  num_classes = datasets.num_classes(data_config)
  validation = validation_indices(labels, num_classes,
                                  after=data_config.train_examples_per_class,
                                  per_class=data_config.validation_examples_per_class)
  test_images, test_labels = sources.test_arrays(data_config)
  spec = datasets.get_spec(data_config.name)
  return Downstream(train=Split(images[keep], labels[keep]),
                    validation=Split(images[validation], labels[validation]),
                    test=Split(np.asarray(test_images), np.asarray(test_labels)),
                    num_classes=num_classes,
                    mean=tuple(spec.mean), std=tuple(spec.std))
