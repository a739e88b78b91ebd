"""A ConvNeXt-style backbone (Liu et al., 2022): depthwise convolutions, LayerNorm, no BatchNorm.

An example of MixSKD on a backbone that is not a ResNet: the stages below go through
`models.staged` unchanged, and nothing in the objective knows it is a ConvNeXt. Feature maps
are NHWC, pooled with "spatial_mean".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models.staged import dense_head

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ConvNeXtSpec:
  """Architecture of a ConvNeXt-style network.

  Attributes:
    dims: channels per stage.
    depths: blocks per stage.
    stem_patch: the stem's non-overlapping patch size (and stride).
    kernel_size: the depthwise convolution's kernel (7 in ConvNeXt).
    mlp_ratio: hidden width of each block's pointwise MLP, in multiples of the stage's dims.
    layer_scale_init: initial per-channel scale of each block's residual branch.
    epsilon: LayerNorm epsilon.
  """
  dims: tuple[int, ...]
  depths: tuple[int, ...]
  stem_patch: int = 4
  kernel_size: int = 7
  mlp_ratio: int = 4
  layer_scale_init: float = 1e-6
  epsilon: float = 1e-6

  def __post_init__(self):
    if len(self.dims) != len(self.depths) or not self.dims:
      raise ValueError(f"ConvNeXtSpec needs one dim and one depth per stage; got dims="
                       f"{self.dims}, depths={self.depths}.")

  @property
  def num_stages(self) -> int:
    return len(self.dims)

  def parts(self, dtype: Dtype = jnp.float32) -> dict[str, Any]:
    """The staged-backbone arguments (`models.staged`): stem, stages, head, pooling."""
    return dict(stem=functools.partial(ConvNeXtStem, self, dtype),
                stages=tuple(functools.partial(ConvNeXtStage, self, s, dtype)
                             for s in range(self.num_stages)),
                head=dense_head,
                pooling="spatial_mean", dtype=dtype)


class ConvNeXtBlock(nn.Module):
  """x + gamma * MLP(LayerNorm(depthwise conv(x))), (N, H, W, C) -> the same shape."""
  spec: ConvNeXtSpec
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.spec.kernel_size
    y = nn.Conv(self.dim, (k, k), padding="SAME", feature_group_count=self.dim,
                dtype=self.dtype, name="dwconv")(x)
    y = nn.LayerNorm(epsilon=self.spec.epsilon, dtype=self.dtype, name="norm")(y)
    y = nn.gelu(nn.Dense(self.spec.mlp_ratio * self.dim, dtype=self.dtype, name="pwconv1")(y))
    y = nn.Dense(self.dim, dtype=self.dtype, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(self.spec.layer_scale_init),
                       (self.dim,), jnp.float32)
    return x + (gamma * y).astype(x.dtype)


class ConvNeXtStem(nn.Module):
  """Patchify: a stem_patch x stem_patch convolution with that stride, then LayerNorm."""
  spec: ConvNeXtSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.spec.stem_patch
    x = nn.Conv(self.spec.dims[0], (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="conv")(x)
    return nn.LayerNorm(epsilon=self.spec.epsilon, dtype=self.dtype, name="norm")(x)


class ConvNeXtStage(nn.Module):
  """Stage `index`: (after the first stage) LayerNorm + 2x2 stride-2 conv, then its blocks.

  The last stage ends with a LayerNorm (ConvNeXt's final norm, applied per position instead
  of after pooling), so every head's final feature map is normalized: MixSKD's linear
  self-teacher and feature MSE read it, and on the raw residual stream they diverge under
  SGD at the reference's rates.
  """
  spec: ConvNeXtSpec
  index: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, H, W, C_prev) -> (N, ceil(H / 2), ceil(W / 2), C) (no downsampling in stage 0)."""
    dim = self.spec.dims[self.index]
    if self.index > 0:
      x = nn.LayerNorm(epsilon=self.spec.epsilon, dtype=self.dtype, name="downsample_norm")(x)
      x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="SAME", dtype=self.dtype,
                  name="downsample_conv")(x)
    for b in range(self.spec.depths[self.index]):
      x = ConvNeXtBlock(self.spec, dim, self.dtype, name=f"block{b}")(x)
    if self.index == self.spec.num_stages - 1:
      x = nn.LayerNorm(epsilon=self.spec.epsilon, dtype=self.dtype, name="final_norm")(x)
    return x
