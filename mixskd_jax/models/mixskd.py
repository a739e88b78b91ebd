"""The MixSKD network: a ResNet backbone with auxiliary branches, self-teacher, discriminators.

Branch k (k = 1 .. S-1) reads the output of backbone stage k and is a fresh copy of stages
k+1 .. S with its own classifier, so every head ends in a feature map shaped like the
backbone's last stage. Parameters are grouped at the top level as `backbone`,
`branches_{k-1}`, `self_teacher` and `discriminators`; the optimizer partition in
`mixskd_jax.objective` and the checkpoint importer rely on those names.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models import layers
from mixskd_jax.models.heads import FeatureDiscriminators, SelfTeacher
from mixskd_jax.models.outputs import ModelOutputs
from mixskd_jax.models.resnet import ResNet, ResNetSpec, ResNetStage

Dtype = Any


class AuxiliaryBranch(nn.Module):
  """Copies of backbone stages `first_stage ..` (named stage0, stage1, ...) and a head `fc`."""
  spec: ResNetSpec
  first_stage: int
  num_classes: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: (N, h, w, c) stage output -> (logits (N, C), feature map like the last stage's)."""
    for j, s in enumerate(range(self.first_stage, self.spec.num_stages)):
      x = ResNetStage(self.spec, s, self.dtype, name=f"stage{j}")(x, train)
    logits = layers.linear(self.num_classes, x.shape[-1], dtype=self.dtype, name="fc")(
        layers.global_avg_pool(x))
    return logits, x


class MixSKDResNet(nn.Module):
  """Backbone + S-1 auxiliary branches (the network), plus the training-only heads.

  `__call__` runs the network and returns S heads in the order branch 1, ..., branch S-1,
  backbone. `teach` runs the self-teacher and `discriminate` the discriminators; both are
  created by `init` so one variables tree holds everything.

  Attributes:
    spec: the backbone architecture.
    num_classes: classes of every head.
    discriminator_hidden: hidden units of each discriminator MLP (128 in the reference).
    dtype: compute dtype.
    remat_branches: rematerialize the auxiliary branches (`nn.remat`): their activations are
      recomputed in the backward pass instead of stored, which lowers peak memory for about
      one more forward pass of the branches. Parameters and values are the same either way.
  """
  spec: ResNetSpec
  num_classes: int
  discriminator_hidden: int = 128
  dtype: Dtype = jnp.float32
  remat_branches: bool = False

  def setup(self):
    self.backbone = ResNet(self.spec, self.num_classes, self.dtype)
    # `train` (argument 2, counting self) is a Python bool that selects code paths.
    branch = (nn.remat(AuxiliaryBranch, static_argnums=(2,)) if self.remat_branches
              else AuxiliaryBranch)
    self.branches = [branch(self.spec, k + 1, self.num_classes, self.dtype)
                     for k in range(self.spec.num_stages - 1)]
    self.self_teacher = SelfTeacher(self.num_classes, dtype=self.dtype)
    self.discriminators = FeatureDiscriminators(self.discriminator_hidden, self.dtype)

  @property
  def num_heads(self) -> int:
    return self.spec.num_stages

  def __call__(self, x: jax.Array, train: bool = False) -> ModelOutputs:
    """x: (N, H, W, C) normalized images -> ModelOutputs with S heads."""
    out = self.backbone(x, train)
    heads = [branch(stage, train)
             for branch, stage in zip(self.branches, out.stage_features[:-1])]
    logits = tuple(z for z, _ in heads) + out.logits
    features = tuple(g for _, g in heads) + out.features
    if self.is_initializing():
      self.teach(features)
      self.discriminate([layers.global_avg_pool(g) for g in features])
    return ModelOutputs(logits=logits, features=features, stage_features=out.stage_features)

  def teach(self, features: Sequence[jax.Array]) -> jax.Array:
    """Self-teacher logits (N, C) from the S head feature maps of one view."""
    return self.self_teacher(features)

  def discriminate(self, pooled: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Discriminator logits, S arrays (M, 2), from S pooled feature arrays (M, c)."""
    return self.discriminators(pooled)
