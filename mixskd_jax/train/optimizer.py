"""The reference optimizer: coupled L2 weight decay, then (Nesterov) SGD with momentum,
applied only to the parameters the objective's variant trains."""

from __future__ import annotations

from typing import Any

import optax

from mixskd_jax.objective import FROZEN, TRAINABLE


def reference_sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float, nesterov: bool,
                  weight_decay: float) -> optax.GradientTransformation:
  """PyTorch `SGD(lr, momentum, nesterov, weight_decay)`: decay is added to the gradient
  before the momentum trace (coupled L2), and optax's trace matches PyTorch's (dampening 0)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def partitioned(tx: optax.GradientTransformation, partition: Any) -> optax.GradientTransformation:
  """Applies `tx` to TRAINABLE leaves and a zero update (no decay, no momentum) to FROZEN ones.

  Args:
    tx: the optimizer of the trained parameters.
    partition: pytree of TRAINABLE / FROZEN labels, e.g. `objective.parameter_partition`.
  """
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, partition)
