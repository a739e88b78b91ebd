"""How a head's final features become one vector per example: an explicit, checked choice.

MixSKD pools every head's final features for its classifier, its self-teacher and its
discriminators. Convolutional networks give feature maps (N, H, W, C); transformers give token
sequences (N, L, D). Averaging a token sequence over "the spatial axes" (1, 2) would mix tokens
and channels into nonsense, so the layout is declared, and a shape that does not fit it is an
error at the first call, not a wrong number later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# name -> (rank of the features it expects, layout in words)
POOLINGS = {
    "spatial_mean": (4, "feature maps (N, H, W, C), averaged over H and W"),
    "token_mean": (3, "token sequences (N, L, D), averaged over the L tokens"),
    "first_token": (3, "token sequences (N, L, D), reading token 0 (a class token)"),
}


def check_pooling(pooling: str) -> str:
  """Returns `pooling` if it is one of POOLINGS, else raises naming the choices."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} is unknown; use one of {sorted(POOLINGS)}: "
                     + "; ".join(f"{k} for {v[1]}" for k, v in POOLINGS.items()) + ".")
  return pooling


def check_features(x: jax.Array, pooling: str, what: str = "features") -> None:
  """Raises a ValueError naming the fix when `x` does not have the layout `pooling` reads."""
  rank, layout = POOLINGS[check_pooling(pooling)]
  if x.ndim != rank:
    others = [k for k, (r, _) in POOLINGS.items() if r == x.ndim]
    hint = (f"for this shape use pooling={others[0]!r}" + (f" or {others[1]!r}" if
            len(others) > 1 else "") if others else
            "reshape them to (N, H, W, C) feature maps or (N, L, D) token sequences")
    raise ValueError(f"pooling={pooling!r} expects {layout}, but {what} have shape "
                     f"{tuple(x.shape)}: {hint}.")


def check_head_features(features, pooling: str) -> None:
  """The self-teacher's input: every head's features in the layout of `pooling`, alike in
  every axis but the channels (it concatenates them along channels)."""
  for k, f in enumerate(features):
    check_features(f, pooling, f"the self-teacher's input {k}")
    if f.shape[:-1] != features[0].shape[:-1]:
      raise ValueError("The self-teacher concatenates the heads' features along channels, so "
                       "they must agree in every other axis; got shapes "
                       f"{[tuple(g.shape) for g in features]}.")


def pool(x: jax.Array, pooling: str) -> jax.Array:
  """Final features of one head -> one vector per example.

  Args:
    x: (N, H, W, C) for "spatial_mean"; (N, L, D) for "token_mean" and "first_token".
    pooling: one of POOLINGS.

  Returns:
    (N, C) or (N, D).
  """
  check_features(x, pooling)
  if pooling == "first_token":
    return x[:, 0]
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
