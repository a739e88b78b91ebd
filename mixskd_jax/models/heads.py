"""MixSKD's training-only heads, usable with any model: self-teacher and discriminators.

The self-teacher takes the list of per-head final features (feature maps or token sequences,
`mixskd_jax.models.pooling`), the discriminators one pooled vector per head, so a user's own network
that returns one final feature tensor per head can be trained with the MixSKD objective.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models import layers
from mixskd_jax.models import pooling as pooling_lib

Dtype = Any


class SelfTeacher(nn.Module):
  """Aggregates the heads' final features into soft labels: concat -> 1x1 conv -> pool -> fc.

  The 1x1 convolution (per position: per pixel of a feature map, per token of a sequence) has
  no bias, BN or activation, so the self-teacher is linear in the pooled features.
  PyTorch-default init, as the official code leaves it.

  Attributes:
    num_classes: outputs.
    width: channels after the 1x1 conv; None uses the channels of one input feature map
      (the official model: 4 * 512 * expansion -> 512 * expansion).
    pooling: the features' layout and how they are pooled (`mixskd_jax.models.pooling.POOLINGS`).
  """
  num_classes: int
  width: int | None = None
  dtype: Dtype = jnp.float32
  pooling: str = "spatial_mean"

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: H arrays (N, h, w, c_k) or (N, L, c_k), alike but for c_k -> (N, C) logits."""
    pooling_lib.check_head_features(features, self.pooling)
    x = jnp.concatenate([f.astype(self.dtype) for f in features], axis=-1)
    built = _existing_shape(self, "conv", "kernel")
    if built is not None and built[-2] != x.shape[-1]:
      raise ValueError(f"The self-teacher was initialized for heads' features of "
                       f"{built[-2]} channels in all, got {x.shape[-1]} "
                       f"({[f.shape[-1] for f in features]}): initialize it with the final "
                       "features of the network it teaches.")
    width = self.width or features[0].shape[-1]
    x = nn.Conv(width, (1,) * (x.ndim - 2), use_bias=False,
                kernel_init=layers.torch_default_kernel_init, dtype=self.dtype, name="conv")(x)
    return layers.linear(self.num_classes, width, dtype=self.dtype, name="fc")(
        pooling_lib.pool(x, self.pooling))


class MLPDiscriminator(nn.Module):
  """Linear(c -> hidden) -> ReLU -> Linear(hidden -> 2), PyTorch-default init."""
  hidden: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, c) pooled features -> (N, 2) logits."""
    x = layers.linear(self.hidden, x.shape[-1], dtype=self.dtype, name="fc1")(x)
    return layers.linear(2, self.hidden, dtype=self.dtype, name="fc2")(nn.relu(x))


class FeatureDiscriminators(nn.Module):
  """One MLP discriminator per head, named disc0, disc1, ... in head order."""
  hidden: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """pooled: H arrays (M, c_k) -> H arrays (M, 2)."""
    if not self.is_initializing():
      built = [_existing_shape(self, f"disc{k}", "fc1", "kernel") for k in range(len(pooled))]
      count = len(self.variables.get("params", {}))
      widths = [p.shape[-1] for p in pooled]
      if count != len(pooled) or any(b is None or b[0] != w for b, w in zip(built, widths)):
        have = [_existing_shape(self, f"disc{k}", "fc1", "kernel") for k in range(count)]
        raise ValueError(f"The discriminators were initialized for {count} heads of "
                         f"{[b[0] for b in have if b is not None]} channels, got pooled features "
                         f"of {widths}: initialize them with the pooled final features of the "
                         "network.")
    return tuple(MLPDiscriminator(self.hidden, self.dtype, name=f"disc{k}")(p)
                 for k, p in enumerate(pooled))


def _existing_shape(module: nn.Module, *path: str) -> tuple[int, ...] | None:
  """Shape of an already-initialized parameter under `module` (None while initializing, or
  when it is absent), to name a shape mismatch before Flax reports it as an initializer's."""
  if module.is_initializing():
    return None
  node = module.variables.get("params", {})
  for key in path:
    if key not in node:
      return None
    node = node[key]
  return tuple(node.shape)
