"""Data for mixskd-jax: tfds datasets (with an offline Fashion-MNIST builder), deterministic
tf.data augmentation on the host, exact per-process batches, and normalization on device.

The names below load on first use, so that importing this package, or its TensorFlow-free
spec table `mixskd_jax.data.datasets`, does not import TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from mixskd_jax.data.datasets import DatasetSpec
  from mixskd_jax.data.datasets import SPECS
  from mixskd_jax.data.fashion_mnist_local import FashionMNISTMissingError
  from mixskd_jax.data.info import DatasetInfo
  from mixskd_jax.data.info import get_dataset_info
  from mixskd_jax.data.normalization import normalize
  from mixskd_jax.data.pipeline import eval_iterator
  from mixskd_jax.data.pipeline import num_eval_steps
  from mixskd_jax.data.pipeline import steps_per_epoch
  from mixskd_jax.data.pipeline import train_eval_iterator
  from mixskd_jax.data.pipeline import train_iterator
  from mixskd_jax.data.sources import clear_cache
  from mixskd_jax.data.sources import DatasetUnavailableError

_HOMES = {  # public name -> the submodule that defines it
  "DatasetInfo": "info", "DatasetSpec": "datasets", "DatasetUnavailableError": "sources",
  "FashionMNISTMissingError": "fashion_mnist_local", "SPECS": "datasets",
  "clear_cache": "sources", "eval_iterator": "pipeline", "get_dataset_info": "info",
  "normalize": "normalization", "num_eval_steps": "pipeline", "steps_per_epoch": "pipeline",
  "train_eval_iterator": "pipeline", "train_iterator": "pipeline",
}
_SUBMODULES = ("augment", "batching", "datasets", "fashion_mnist_local", "in_memory", "info",
               "integrity", "normalization", "pipeline", "prefetch", "sources", "streaming",
               "tf_setup")

__all__ = [
  "DatasetInfo", "DatasetSpec", "DatasetUnavailableError", "FashionMNISTMissingError", "SPECS",
  "clear_cache", "eval_iterator", "get_dataset_info", "normalize", "num_eval_steps",
  "steps_per_epoch", "train_eval_iterator", "train_iterator",
]


def __getattr__(name: str) -> Any:
  """Imports a public name's submodule (or a submodule itself) on first access."""
  if name in _HOMES:
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_HOMES) | set(_SUBMODULES))
