"""The reference optimizer: PyTorch's SGD with coupled L2 weight decay, as optax."""

from __future__ import annotations

import optax


def reference_sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float, nesterov: bool,
                  weight_decay: float) -> optax.GradientTransformation:
  """PyTorch `SGD(lr, momentum, nesterov, weight_decay)`: decay is added to the gradient
  before the momentum trace (coupled L2), and optax's trace matches PyTorch's (dampening 0)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
