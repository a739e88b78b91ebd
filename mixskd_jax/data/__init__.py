"""Data for mixskd-jax: tfds datasets (with an offline Fashion-MNIST builder), deterministic
tf.data augmentation on the host, exact per-process batches, and normalization on device."""

from mixskd_jax.data.datasets import DatasetInfo
from mixskd_jax.data.datasets import DatasetSpec
from mixskd_jax.data.datasets import get_dataset_info
from mixskd_jax.data.datasets import SPECS
from mixskd_jax.data.fashion_mnist_local import FashionMNISTMissingError
from mixskd_jax.data.normalization import normalize
from mixskd_jax.data.pipeline import eval_iterator
from mixskd_jax.data.pipeline import num_eval_steps
from mixskd_jax.data.pipeline import steps_per_epoch
from mixskd_jax.data.pipeline import train_eval_iterator
from mixskd_jax.data.pipeline import train_iterator
from mixskd_jax.data.sources import clear_cache
from mixskd_jax.data.sources import DatasetUnavailableError

__all__ = [
  "DatasetInfo", "DatasetSpec", "DatasetUnavailableError", "FashionMNISTMissingError", "SPECS",
  "clear_cache", "eval_iterator", "get_dataset_info", "normalize", "num_eval_steps",
  "steps_per_epoch", "train_eval_iterator", "train_iterator",
]
