"""The config file's argument: `--config=configs/NAME.py:TOKENS` (`finalize`)."""

from __future__ import annotations

import ml_collections

from mixskd_jax.config import recipes
from mixskd_jax.config.choices import METHODS, VARIANTS


def finalize(config: ml_collections.ConfigDict, arg: str = "") -> ml_collections.ConfigDict:
  """Applies the config-file argument: comma-separated tokens after the path's ':'.

  * an objective variant (`reference_cifar`, `full`, `adversarial`) selects it;
  * a training method (`cross_entropy`, `mixup`, `byot`, ... `choices.METHODS`)
    trains it on the same backbone and recipe (`recipes.with_method`);
  * `smoke` shrinks the run to a few tiny steps that exercise every code path (data, step,
    eval, checkpoint, results) in about a minute on a laptop.

  Example: --config=configs/cifar100_resnet18_mixskd.py:reference_cifar,smoke
           --config=configs/fashion_mnist_vit.py:cross_entropy
  """
  for token in filter(None, (t.strip() for t in arg.split(","))):
    if token in METHODS:
      config = recipes.with_method(config, token)
    elif token in VARIANTS:
      config.objective.variant = token
    elif token == "smoke":
      config.num_train_steps = 4
      if config.optimizer.lr_reference_batch is None and config.batch_size > 0:
        # The recipe's rate per example: its full rate on a batch of 8 and no warm-up
        # diverges (the CIFAR recipe's loss went 55 -> 47006 in 4 steps).
        config.optimizer.lr_reference_batch = config.batch_size
      config.batch_size = 8
      config.per_device_batch_size = None
      config.eval_batch_size = 16
      config.data.train_examples = 64
      config.data.test_examples = 40
      config.log_every_steps = 2
      config.checkpoint_every_steps = 2
      config.optimizer.warmup_epochs = 0
    else:
      raise ValueError(f"Unknown config argument {token!r}; use 'smoke', a method of "
                       f"{METHODS} and/or a variant of {VARIANTS}, comma-separated.")
  return config
