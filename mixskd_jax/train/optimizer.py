"""The run's optimizer from `config.optimizer`: the reference SGD (`method.optimizer`) on the
reference schedule, applied only to the parameters the objective's variant trains."""

from __future__ import annotations

from typing import Any

import ml_collections
import optax

from mixskd_jax.method.optimizer import reference_sgd
from mixskd_jax.method.schedule import reference_schedule
from mixskd_jax.method.trainable import partitioned


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
