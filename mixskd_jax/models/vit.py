"""A small Vision Transformer (Dosovitskiy et al., 2021) whose blocks are grouped into stages.

An example of MixSKD on tokens: every stage maps (N, L, D) -> (N, L, D), so branch k is a
fresh copy of the remaining blocks and every head's final features are a token sequence,
pooled with "token_mean" (or "first_token" with a class token). The self-teacher's 1x1
convolution becomes a per-token linear map over the heads' concatenated tokens.
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
class ViTSpec:
  """Architecture of a ViT whose encoder blocks are split into stages.

  Attributes:
    patch: side of the square, non-overlapping patches.
    dim: token width D.
    stage_depths: encoder blocks per stage; MixSKD gets one head per stage.
    num_heads: attention heads.
    mlp_ratio: hidden width of each block's MLP, in multiples of D.
    class_token: prepend a learned class token (pool it with "first_token").
    epsilon: LayerNorm epsilon.
  """
  patch: int
  dim: int
  stage_depths: tuple[int, ...]
  num_heads: int = 4
  mlp_ratio: int = 2
  class_token: bool = False
  epsilon: float = 1e-6

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f"ViTSpec.dim={self.dim} must be a multiple of num_heads="
                       f"{self.num_heads}.")

  @property
  def num_stages(self) -> int:
    return len(self.stage_depths)

  def parts(self, dtype: Dtype = jnp.float32) -> dict[str, Any]:
    """The staged-backbone arguments (`models.staged`): stem, stages, head, pooling."""
    return dict(stem=functools.partial(PatchEmbedding, self, dtype),
                stages=tuple(functools.partial(ViTStage, self, s, dtype)
                             for s in range(self.num_stages)),
                head=dense_head,
                pooling="first_token" if self.class_token else "token_mean", dtype=dtype)


class PatchEmbedding(nn.Module):
  """(N, H, W, C) images -> (N, L, D) tokens: patches, a linear map, learned positions."""
  spec: ViTSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.spec.patch
    x = nn.Conv(self.spec.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="patches")(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.spec.class_token:
      cls = self.param("class_token", nn.initializers.zeros, (1, 1, self.spec.dim), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])).astype(x.dtype),
                           x], axis=1)
    positions = self.param("positions", nn.initializers.normal(0.02), x.shape[1:], jnp.float32)
    return x + positions.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attention(LN(x)), then + MLP(LN(x))."""
  spec: ViTSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    y = nn.LayerNorm(epsilon=s.epsilon, dtype=self.dtype, name="norm1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=s.num_heads, dtype=self.dtype,
                                            name="attention")(y, y)
    y = nn.LayerNorm(epsilon=s.epsilon, dtype=self.dtype, name="norm2")(x)
    y = nn.gelu(nn.Dense(s.mlp_ratio * s.dim, dtype=self.dtype, name="mlp1")(y))
    return x + nn.Dense(s.dim, dtype=self.dtype, name="mlp2")(y)


class ViTStage(nn.Module):
  """Stage `index`: `stage_depths[index]` encoder blocks, (N, L, D) -> (N, L, D).

  The last stage ends with the encoder's LayerNorm, so every head's final tokens (what the
  self-teacher, the feature MSE and the discriminators read) are normalized; MixSKD's linear
  self-teacher diverges on the raw residual stream under SGD at the reference's rates.
  """
  spec: ViTSpec
  index: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for b in range(self.spec.stage_depths[self.index]):
      x = EncoderBlock(self.spec, self.dtype, name=f"block{b}")(x)
    if self.index == self.spec.num_stages - 1:
      x = nn.LayerNorm(epsilon=self.spec.epsilon, dtype=self.dtype, name="final_norm")(x)
    return x
