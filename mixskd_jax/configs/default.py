r"""The offline default: MixSKD (`full`) with a small CIFAR-style ResNet on Fashion-MNIST.

Runs on a 2-core laptop with no internet: Fashion-MNIST comes from tfds or, offline, from the
Debian package `dataset-fashion-mnist` (IDX files under /usr/share/datasets/fashion-mnist).

  python -m mixskd_jax.main --config=configs/default.py --workdir=/tmp/mixskd_default

Expected: 89.05 +/- 0.53% test top-1 (backbone head; 5 seeds, range
88.37-89.70%), 11-28 min on 2 CPU cores (jax 0.10.2, Python 3.11); measured, see
docs/training.md.
Shrink any config for a smoke run with the `:smoke` suffix:

  python -m mixskd_jax.main --config=configs/default.py:smoke --workdir=/tmp/smoke
"""

import ml_collections

from mixskd_jax import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.model.name = "small_resnet"
  config.data.name = "fashion_mnist"
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 4
  config.objective.variant = "full"
  config.objective.alpha = 0.4
  config.optimizer.schedule = "cosine"
  config.optimizer.learning_rate = 0.1
  config.optimizer.warmup_epochs = 1
  config.optimizer.weight_decay = 5e-4
  return config_lib.finalize(config, arg)
