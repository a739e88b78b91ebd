"""The datasets mixskd-jax trains on: one `DatasetSpec` each, and what `config.data` keeps.

A spec holds what never changes for a dataset (tfds name, classes, image shape as the model
sees it, splits, normalization constants, augmentation); `kept_classes`, `num_classes` and
`capped` read a config's class subset and caps. This table imports neither TensorFlow nor any
other mixskd_jax module; `mixskd_jax.data.info.DatasetInfo` adds the sizes that need the data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import ml_collections

CIFAR_PAD = 4          # RandomCrop(32, padding=4), the reference's CIFAR augmentation
FASHION_MNIST_PAD = 2  # the same crop, scaled to 28x28 images


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Fixed facts about one dataset.

  Attributes:
    name: our name, the value of `config.data.name`.
    tfds_name: the tfds builder name.
    num_classes: number of labels, which lie in [0, num_classes).
    image_shape: (H, W, C) of the images the model sees (after cropping).
    train_split, test_split: tfds split names.
    mean, std: per-channel normalization constants, in [0, 1] units, length C.
    augmentation: "pad_crop_flip" (zero pad `crop_padding`, random crop back, random
      horizontal flip) or "inception_crop" (random-resized-crop + flip; eval resize +
      center crop).
    crop_padding: the pad of "pad_crop_flip", in pixels.
    in_memory: whether the whole split is loaded as numpy (small datasets) or streamed.
    eval_resize: shorter side before the eval center crop ("inception_crop" only).
  """
  name: str
  tfds_name: str
  num_classes: int
  image_shape: Tuple[int, int, int]
  train_split: str
  test_split: str
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  augmentation: str
  crop_padding: int = 0
  in_memory: bool = True
  eval_resize: int = 0


_CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # the reference's constants, spec §4 C.1
_CIFAR100_STD = (0.2675, 0.2565, 0.2761)

SPECS = {
  s.name: s for s in [
    DatasetSpec(
      name="fashion_mnist", tfds_name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
      train_split="train", test_split="test",
      # Computed once over the 60,000 training images of the IDX file (pixels / 255, float64):
      # mean 0.28604060, std 0.35302424 (population std over all pixels).
      mean=(0.2860406,), std=(0.3530242,),
      augmentation="pad_crop_flip", crop_padding=FASHION_MNIST_PAD),
    # The reference trains CIFAR-100 only; CIFAR-10 gets its own widely used train-set
    # statistics, with the same augmentation.
    DatasetSpec(
      name="cifar10", tfds_name="cifar10", num_classes=10, image_shape=(32, 32, 3),
      train_split="train", test_split="test",
      mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
      augmentation="pad_crop_flip", crop_padding=CIFAR_PAD),
    DatasetSpec(
      name="cifar100", tfds_name="cifar100", num_classes=100, image_shape=(32, 32, 3),
      train_split="train", test_split="test", mean=_CIFAR100_MEAN, std=_CIFAR100_STD,
      augmentation="pad_crop_flip", crop_padding=CIFAR_PAD),
    DatasetSpec(
      name="imagenet2012", tfds_name="imagenet2012", num_classes=1000, image_shape=(224, 224, 3),
      train_split="train", test_split="validation",
      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
      augmentation="inception_crop", in_memory=False, eval_resize=256),
  ]
}


def get_spec(name: str) -> DatasetSpec:
  """The spec of `config.data.name`; ValueError naming the known datasets if unknown."""
  if name not in SPECS:
    raise ValueError(f"Unknown dataset config.data.name={name!r}; known datasets: "
                     f"{', '.join(sorted(SPECS))}.")
  return SPECS[name]


def kept_classes(data_config: ml_collections.ConfigDict) -> Optional[Tuple[int, ...]]:
  """`config.data.classes` as a tuple of ints (None: every class), checked against the dataset.

  Raises:
    ValueError: a class outside [0, num_classes), a repeated one, or an empty tuple.
  """
  classes = data_config.get("classes")
  if classes is None:
    return None
  spec = get_spec(data_config.name)
  classes = tuple(int(c) for c in classes)
  if not classes or len(set(classes)) != len(classes) or not all(
      0 <= c < spec.num_classes for c in classes):
    raise ValueError(f"config.data.classes={classes!r} must be distinct labels of "
                     f"{spec.name!r}, each in [0, {spec.num_classes}).")
  return classes


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Classes the model sees: len(config.data.classes), else the dataset's."""
  classes = kept_classes(data_config)
  return get_spec(data_config.name).num_classes if classes is None else len(classes)


def capped(n: int, cap: Optional[int]) -> int:
  """min(n, cap), where cap None means no cap."""
  return n if cap is None else min(n, int(cap))
