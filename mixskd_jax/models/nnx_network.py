"""The MixSKD network and its training heads as native `flax.nnx` modules.

`MixSKDNetwork` wraps a user's staged NNX backbone with freshly initialized auxiliary branches,
a `SelfTeacher` and per-head `FeatureDiscriminators`. Each module mirrors its Linen twin in
`mixskd_jax.models` (same initializers, same parameter names: `self_teacher/conv/kernel`,
`discriminators/disc0/fc1/kernel`, ...). The loss, optimizer and backbone copy that use these
modules live in `mixskd_jax.nnx`, the public door, which re-exports every name here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mixskd_jax.models import layers
from mixskd_jax.models import pooling as pooling_lib
from mixskd_jax.models.outputs import ModelOutputs

Dtype = Any
StageFactory = Callable[..., nnx.Module]   # factory(rngs=...) -> module
HeadFactory = Callable[..., nnx.Module]    # head(in_features, num_classes, rngs=...)


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32) -> nnx.Linear:
  """nnx.Linear initialized as PyTorch's default Linear (weight and bias), like `layers.linear`."""
  return nnx.Linear(in_features, out_features, kernel_init=layers.torch_default_kernel_init,
                    bias_init=layers.torch_default_bias_init(in_features), dtype=dtype,
                    rngs=rngs)


class SelfTeacher(nnx.Module):
  """The heads' final features -> soft labels: concat -> bias-free 1x1 conv -> pool -> fc.

  The NNX twin of `mixskd_jax.models.SelfTeacher`. The 1x1 convolution acts per position
  (per pixel of (N, H, W, C) maps, per token of (N, L, D) sequences); its kernel is
  `(1,) * spatial_dims + (in_features, width)` as in Linen.

  Args:
    in_features: channels of the concatenated input, the sum of the heads' channels.
    num_classes: outputs.
    width: channels after the 1x1 conv. When None, `in_features // num_heads` (the channels of
      one head when all heads have as many, which is the Linen default and the official
      model's 4 * 512 -> 512); then `num_heads` is required, since unlike Linen nothing here
      sees the inputs before they exist.
    num_heads: only used to default `width`.
    pooling: the features' layout and how they are pooled (`mixskd_jax.models.pooling.POOLINGS`).
  """

  def __init__(self, in_features: int, num_classes: int, *, width: int | None = None,
               num_heads: int | None = None, pooling: str = "spatial_mean",
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.pooling = pooling_lib.check_pooling(pooling)
    if width is None:
      if not num_heads or in_features % num_heads:
        raise ValueError(f"SelfTeacher(in_features={in_features}) needs width=..., or "
                         "num_heads=... dividing in_features to default width to one head's "
                         f"channels; got num_heads={num_heads}.")
      width = in_features // num_heads
    self.in_features, self.dtype = in_features, dtype
    spatial_dims = pooling_lib.POOLINGS[pooling][0] - 2
    self.conv = nnx.Conv(in_features, width, (1,) * spatial_dims, use_bias=False,
                         kernel_init=layers.torch_default_kernel_init, dtype=dtype, rngs=rngs)
    self.fc = torch_linear(width, num_classes, rngs=rngs, dtype=dtype)

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: H arrays (N, h, w, c_k) or (N, L, c_k), alike but for c_k -> (N, C) logits."""
    pooling_lib.check_head_features(features, self.pooling)
    x = jnp.concatenate([f.astype(self.dtype) for f in features], axis=-1)
    if x.shape[-1] != self.in_features:
      raise ValueError(f"The self-teacher was built for in_features={self.in_features} "
                       f"channels in all, got {x.shape[-1]} ({[f.shape[-1] for f in features]}).")
    return self.fc(pooling_lib.pool(self.conv(x), self.pooling))


class MLPDiscriminator(nnx.Module):
  """Linear(c -> hidden) -> ReLU -> Linear(hidden -> 2), PyTorch-default init."""

  def __init__(self, in_features: int, hidden: int = 128, *, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.in_features = in_features
    self.fc1 = torch_linear(in_features, hidden, rngs=rngs, dtype=dtype)
    self.fc2 = torch_linear(hidden, 2, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (N, c) pooled features -> (N, 2) logits."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f"A discriminator built for in_features={self.in_features} got pooled "
                       f"features of {x.shape[-1]} channels (shape {x.shape}): build "
                       f"FeatureDiscriminators with in_features equal to each head's channels.")
    return self.fc2(jax.nn.relu(self.fc1(x)))


class FeatureDiscriminators(nnx.Module):
  """One MLP discriminator per head, attributes disc0, disc1, ... in head order (as in Linen).

  Args:
    in_features: channels c_k of every head's pooled features.
    hidden: hidden units of each MLP (128 in the reference).
  """

  def __init__(self, in_features: Sequence[int], *, hidden: int = 128,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.num_heads = len(in_features)
    for k, c in enumerate(in_features):  # named attributes: the Linen parameter paths
      setattr(self, f"disc{k}", MLPDiscriminator(c, hidden, dtype=dtype, rngs=rngs))

  def __call__(self, pooled: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """pooled: H arrays (M, c_k) -> H arrays (M, 2)."""
    if len(pooled) != self.num_heads:
      raise ValueError(f"{self.num_heads} discriminators got {len(pooled)} feature arrays.")
    return tuple(getattr(self, f"disc{k}")(p) for k, p in enumerate(pooled))


class Tower(nnx.Module):
  """[stem ->] stages -> pool -> head: the backbone, or (no stem) one auxiliary branch."""

  def __init__(self, stem: nnx.Module | None, stages: Sequence[nnx.Module], head: nnx.Module,
               pooling: str, features: int | None = None):
    self.stem, self.stages, self.head, self.pooling = stem, nnx.List(stages), head, pooling
    self.features = features

  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """x: (N, ...) -> (logits (N, C), every stage's output, the last one the head's features)."""
    x = self.stem(x) if self.stem is not None else x
    outs = []
    for stage in self.stages:
      x = stage(x)
      outs.append(x)
    if self.features is not None and x.shape[-1] != self.features:
      raise ValueError(f"MixSKDNetwork was built with features={self.features}, but the last "
                       f"stage gives {x.shape[-1]} channels (output {x.shape}): pass "
                       f"features={x.shape[-1]}.")
    return self.head(pooling_lib.pool(x, self.pooling)), tuple(outs)


class MixSKDNetwork(nnx.Module):
  """A user's staged NNX backbone with MixSKD's S-1 auxiliary branches and training heads.

  Branch k (k = 1 .. S-1) reads the output of backbone stage k and is *freshly initialized*
  copies of stages k+1 .. S plus its own head, as in the Linen network and the official code
  (not weight copies); that is why stages are factories. Each factory must build a new module
  from the `rngs` it gets.

  Parameters live under `backbone` (stem, stages, head), `branches` (k-1 -> stages, head),
  `self_teacher` and `discriminators`; `trainable_filter` relies on the last two names.
  Train/eval mode is NNX's `model.train()` / `model.eval()` (BatchNorm, Dropout in stages).

  Args:
    stages: S >= 2 factories called as `factory(rngs=rngs)` (a lambda, a `functools.partial`
      of an NNX module class), stage s mapping (N, ...) to (N, ...); the last one gives
      (N, h, w, features) maps or (N, L, features) tokens.
    num_classes: classes of every head.
    features: channels of the last stage's output.
    stem: factory of the module before stage 1 (only in the backbone); None: identity.
    head: factory called as `head(in_features, num_classes, rngs=rngs)`, NNX's argument
      order (so `nnx.Linear` itself is one; the Linen network's head factory takes
      `(num_classes, in_features, name=...)` like `nn.Dense`), pooled (N, features) ->
      logits (N, num_classes); default a PyTorch-default-init Linear.
    pooling: how final features are pooled (`mixskd_jax.models.pooling.POOLINGS`).
    discriminator_hidden: hidden units of each discriminator MLP.
    self_teacher_width: channels after the self-teacher's 1x1 conv; None: `features`.
  """

  def __init__(self, *, stages: Sequence[StageFactory], num_classes: int, features: int,
               stem: StageFactory | None = None, head: HeadFactory | None = None,
               pooling: str = "spatial_mean", discriminator_hidden: int = 128,
               self_teacher_width: int | None = None, rngs: nnx.Rngs):
    if len(stages) < 2:
      raise ValueError(f"MixSKDNetwork needs at least 2 stages (got {len(stages)}): the "
                       "auxiliary branches start after stages 1 .. S-1, so one stage has none.")
    self.pooling = pooling_lib.check_pooling(pooling)
    self.num_classes = num_classes
    head = head or torch_linear
    built = []

    def build(factory, *args):
      module = factory(*args, rngs=rngs)
      # A factory returning one shared module would tie branch and backbone weights.
      if any(module is m for m in built):
        raise ValueError("A stage/head factory returned a module it had already returned; "
                         "every call must build a new, freshly initialized module.")
      built.append(module)
      return module

    self.backbone = Tower(build(stem) if stem else None, [build(f) for f in stages],
                          build(head, features, num_classes), pooling, features)
    self.branches = nnx.List([
        Tower(None, [build(f) for f in stages[k:]], build(head, features, num_classes), pooling,
              features)
        for k in range(1, len(stages))])
    self.self_teacher = SelfTeacher(len(stages) * features, num_classes,
                                    width=self_teacher_width or features, pooling=pooling,
                                    rngs=rngs)
    self.discriminators = FeatureDiscriminators([features] * len(stages),
                                                hidden=discriminator_hidden, rngs=rngs)

  @property
  def num_heads(self) -> int:
    return len(self.backbone.stages)

  def __call__(self, x: jax.Array) -> ModelOutputs:
    """x: (N, ...) inputs -> S heads, branch 1 .. S-1 then backbone: logits (N, C) and final
    features; `stage_features` are the backbone's S stage outputs."""
    logits, stage_outs = self.backbone(x)
    if logits.shape[-1] != self.num_classes:
      raise ValueError(f"The head factory gave {logits.shape[-1]} outputs for num_classes="
                       f"{self.num_classes}: it is called as head(in_features, num_classes, "
                       "rngs=...) and must return a module with num_classes outputs.")
    heads = [branch(s) for branch, s in zip(self.branches, stage_outs[:-1])]
    return ModelOutputs(logits=tuple(z for z, _ in heads) + (logits,),
                        features=tuple(o[-1] for _, o in heads) + (stage_outs[-1],),
                        stage_features=stage_outs)

  def teach(self, features: Sequence[jax.Array]) -> jax.Array:
    """Self-teacher logits (N, C) from the S final features of one view."""
    return self.self_teacher(features)

  def discriminate(self, pooled: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Discriminator logits, S arrays (M, 2), from S pooled feature arrays (M, c)."""
    return self.discriminators(pooled)
