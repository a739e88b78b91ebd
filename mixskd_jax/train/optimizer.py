"""The reference optimizer: coupled L2 weight decay, then (Nesterov) SGD with momentum,
applied only to the parameters the objective's variant trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optax

from mixskd_jax.trainable import partitioned
from mixskd_jax.train.schedule import reference_schedule

if TYPE_CHECKING:  # `import mixskd_jax` needs only JAX, Flax and optax (a bare Colab has them)
  import ml_collections


def reference_sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float, nesterov: bool,
                  weight_decay: float) -> optax.GradientTransformation:
  """PyTorch `SGD(lr, momentum, nesterov, weight_decay)`: decay is added to the gradient
  before the momentum trace (coupled L2), and optax's trace matches PyTorch's (dampening 0)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def build_optimizer(config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int,
                    partition: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`config.optimizer` -> (partitioned reference SGD, its learning-rate schedule)."""
  opt = config.optimizer
  schedule = reference_schedule(
      base_lr=opt.learning_rate, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs,
      warmup_epochs=opt.warmup_epochs, schedule=opt.schedule, milestones=tuple(opt.milestones),
      decay_factor=opt.decay_factor)
  tx = reference_sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov,
                     weight_decay=opt.weight_decay)
  return partitioned(tx, partition), schedule
