"""The gradient-reversal layer: identity on the way forward, a negated (scaled) gradient on the
way back.

The `adversarial` MixSKD variant puts it between the pooled features and the discriminators,
so that one backward pass trains the discriminators to separate interpolated from mixup
features while the network behind it receives the opposite gradient and learns to fool them.
"""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gradient_reversal(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; multiplies the incoming gradient by -scale on the way back."""
  return x


def _reversal_fwd(x, scale):
  return x, None


def _reversal_bwd(scale, _, g):
  return (jax.tree_util.tree_map(lambda t: -scale * t, g),)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)
