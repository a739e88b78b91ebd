"""Normalization, on device: uint8 batches leave the host and become float32 in the step."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(images / 255 - mean) / std, per channel; meant to run inside the jitted step.

  Args:
    images: (..., C) uint8 (or any real dtype in [0, 255]).
    mean, std: length-C per-channel constants in [0, 1] units (`DatasetInfo.mean/std`).

  Returns:
    (..., C) float32.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
