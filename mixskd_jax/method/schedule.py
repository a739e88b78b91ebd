"""The reference learning-rate schedules as optax schedules of the global step.

Warm-up is linear per step: lr = base * (step + 1) / (warmup_epochs * steps_per_epoch), as the
official scripts set it every iteration. After warm-up the rate changes once per epoch:
multistep (x decay_factor at each milestone, counted in epochs after warm-up), cosine
(base * (1 + cos(pi * (epoch - warmup) / (epochs - warmup))) / 2), or constant.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax

from mixskd_jax.config.choices import SCHEDULES


def reference_schedule(*, base_lr: float, steps_per_epoch: int, num_epochs: int,
                       warmup_epochs: int, schedule: str, milestones: Sequence[int] = (),
                       decay_factor: float = 0.1) -> optax.Schedule:
  """Step -> learning rate.

  Args:
    base_lr: the peak rate (0.1 in both official scripts).
    steps_per_epoch: optimizer steps per epoch.
    num_epochs: total epochs (cosine decays to 0 at this epoch).
    warmup_epochs: epochs of per-step linear warm-up (5 in the reference).
    schedule: one of SCHEDULES.
    milestones: multistep: epochs after warm-up at which the rate is multiplied by
      decay_factor (the CIFAR script's [100, 150] with 5 warm-up epochs decays at 105 and 155).
    decay_factor: multistep factor.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={schedule!r} must be one of {SCHEDULES}.")
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1.")
  warmup_steps = warmup_epochs * steps_per_epoch
  if schedule == "multistep":
    per_epoch = optax.piecewise_constant_schedule(
        base_lr, {int(m): decay_factor for m in milestones})
  elif schedule == "cosine":
    per_epoch = optax.cosine_decay_schedule(base_lr, max(num_epochs - warmup_epochs, 1))
  else:
    per_epoch = optax.constant_schedule(base_lr)
  after_warmup = lambda step: per_epoch(step // steps_per_epoch)
  if warmup_steps == 0:
    return after_warmup
  # The formula itself rather than optax.linear_schedule, whose init + (end - init) * t form
  # is ~1e-4 off the reference's first rates in float32.
  warmup = lambda step: base_lr * (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])
