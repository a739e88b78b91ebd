"""MixSKD's network for any staged Linen backbone: stem, stages, a pooled head.

A backbone is a stem and S stages (any Linen modules) followed by pooling and a classifier
head. MixSKD's network adds S - 1 auxiliary branches: branch k (k = 1 .. S-1) reads the output
of backbone stage k and is a fresh copy of stages k+1 .. S with its own head, so every head
ends in features shaped like the backbone's last stage. It also carries the training-only
self-teacher and discriminators. Our ResNets are one instance (`models.resnet`); ConvNeXt and
ViT are others (`models.convnext`, `models.vit`).

Modules are given as factories (a module class, a `functools.partial`, or a template module
whose fields are reused): a branch's stages must be new modules with their own parameters,
and Linen would otherwise adopt a module stored in a field as a child of its own.

Parameter tree: `backbone/{stem, layer1 .. layerS, fc}`, `branches_{k-1}/{stage0 .., fc}`,
`self_teacher`, `discriminators`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models import pooling as pooling_lib
from mixskd_jax.models.heads import FeatureDiscriminators, SelfTeacher
from mixskd_jax.models.outputs import ModelOutputs

Dtype = Any
# factory(name=...) -> a module called as module(x) or module(x, train=...).
ModuleFactory = Callable[..., nn.Module]
# head(num_classes, in_features, name=...) -> a module mapping (N, in_features) to (N, C).
HeadFactory = Callable[..., nn.Module]
HEAD = "fc"  # every classifier head's name: `<network or branch>/fc`
BACKBONE = "backbone"  # the plain backbone's sub-tree in a MixSKDNetwork's variables


def dense_head(num_classes: int, in_features: int, *, name: str) -> nn.Module:
  """The default head: one `nn.Dense` on the pooled features."""
  del in_features
  return nn.Dense(num_classes, name=name)


def as_factory(module: nn.Module | ModuleFactory) -> ModuleFactory:
  """A factory for `module`: itself when it is one, else one that rebuilds the template.

  The template's fields are reused; the copy is created where the factory is called, so it
  gets its own parent, name and parameters.
  """
  if not isinstance(module, nn.Module):
    if not callable(module):
      raise TypeError(f"Expected a Linen module or a factory of one, got {module!r}.")
    return module
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}
  return lambda **kwargs: type(module)(**fields, **kwargs)


def _takes_train(module: nn.Module) -> bool:
  return "train" in inspect.signature(type(module).__call__).parameters


def call_stage(module: nn.Module, x: jax.Array, train: bool) -> jax.Array:
  """`module(x, train=train)` if its `__call__` has a `train` argument, else `module(x)`."""
  return module(x, train=train) if _takes_train(module) else module(x)


def classify(head: HeadFactory, num_classes: int, pooling: str, x: jax.Array) -> jax.Array:
  """Inside a compact method: the head `fc` on the pooled final features -> (N, num_classes)."""
  logits = head(num_classes, x.shape[-1], name=HEAD)(pooling_lib.pool(x, pooling))
  if logits.shape[-1] != num_classes:
    raise ValueError(f"The head factory gave {logits.shape[-1]} outputs for num_classes="
                     f"{num_classes}: it is called as head(num_classes, in_features, name=...) "
                     "and must return a module with num_classes outputs.")
  return logits


class StagedClassifier(nn.Module):
  """stem -> stages -> pool -> head: the plain network (inference, baselines, transfer).

  Attributes:
    stages: S stage factories, called in order.
    num_classes: outputs of the head.
    stem: factory of the module before the first stage, or None.
    head: head factory (`dense_head` by default).
    pooling: the last stage's layout and its pooling (`mixskd_jax.models.pooling.POOLINGS`).
    dtype: the input is cast to it; the modules choose their own compute dtypes.
    frozen_backbone: the stem and stages run in inference mode whatever `train` says:
      BatchNorm normalizes with its running statistics and leaves them unchanged (the
      linear-probe protocol, `config.init_from.freeze_backbone`). Same parameters either way.
  """
  stages: Sequence[ModuleFactory]
  num_classes: int
  stem: ModuleFactory | None = None
  head: HeadFactory = dense_head
  pooling: str = "spatial_mean"
  dtype: Dtype = jnp.float32
  frozen_backbone: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> ModelOutputs:
    """x: (N, ...) inputs -> ModelOutputs with one head and every stage's output."""
    x = x.astype(self.dtype)
    features_train = train and not self.frozen_backbone
    if self.stem is not None:
      x = call_stage(self.stem(name="stem"), x, features_train)
    stage_outputs = []
    for s, stage in enumerate(self.stages):
      x = call_stage(stage(name=f"layer{s + 1}"), x, features_train)
      stage_outputs.append(x)
    logits = classify(self.head, self.num_classes, self.pooling, x)
    return ModelOutputs(logits=(logits,), features=(x,), stage_features=tuple(stage_outputs))


class AuxiliaryBranch(nn.Module):
  """Fresh copies of stages `first_stage ..` (named stage0, stage1, ...) and a head `fc`."""
  stages: Sequence[ModuleFactory]
  first_stage: int
  num_classes: int
  head: HeadFactory = dense_head
  pooling: str = "spatial_mean"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """x: (N, ...) output of backbone stage `first_stage` - 1 -> (logits (N, C), features)."""
    for j, stage in enumerate(self.stages[self.first_stage:]):
      x = call_stage(stage(name=f"stage{j}"), x, train)
    return classify(self.head, self.num_classes, self.pooling, x), x


class MixSKDNetwork(nn.Module):
  """Backbone + S-1 auxiliary branches (the network), plus the training-only heads.

  `__call__` runs the network and returns S heads in the order branch 1, ..., branch S-1,
  backbone. `teach` runs the self-teacher and `discriminate` the discriminators; both are
  created by `init` so one variables tree holds everything. Build it with `mixskd_network`,
  which also accepts template modules.

  Attributes:
    stages, num_classes, stem, head, pooling, dtype: the backbone (`StagedClassifier`).
    discriminator_hidden: hidden units of each discriminator MLP (128 in the reference).
    self_teacher_width: channels after the self-teacher's 1x1 conv; None: those of one head.
    remat_branches: rematerialize the auxiliary branches (`nn.remat`): their activations are
      recomputed in the backward pass instead of stored, which lowers peak memory for about
      one more forward pass of the branches. Parameters and values are the same either way.
  """
  stages: Sequence[ModuleFactory]
  num_classes: int
  stem: ModuleFactory | None = None
  head: HeadFactory = dense_head
  pooling: str = "spatial_mean"
  dtype: Dtype = jnp.float32
  discriminator_hidden: int = 128
  self_teacher_width: int | None = None
  remat_branches: bool = False

  def setup(self):
    if len(self.stages) < 2:
      raise ValueError(f"MixSKD needs a backbone with at least 2 stages (branches read the "
                       f"output of every stage but the last); got {len(self.stages)}.")
    pooling_lib.check_pooling(self.pooling)
    self.backbone = StagedClassifier(self.stages, self.num_classes, self.stem, self.head,
                                     self.pooling, self.dtype)
    # `train` (argument 2, counting self) is a Python bool that selects code paths.
    branch = (nn.remat(AuxiliaryBranch, static_argnums=(2,)) if self.remat_branches
              else AuxiliaryBranch)
    self.branches = [branch(self.stages, k + 1, self.num_classes, self.head, self.pooling)
                     for k in range(self.num_heads - 1)]
    self.self_teacher = SelfTeacher(self.num_classes, self.self_teacher_width, self.dtype,
                                    self.pooling)
    self.discriminators = FeatureDiscriminators(self.discriminator_hidden, self.dtype)

  @property
  def num_heads(self) -> int:
    return len(self.stages)

  def __call__(self, x: jax.Array, train: bool = False) -> ModelOutputs:
    """x: (N, ...) inputs -> ModelOutputs with S heads (features shaped like the last stage's)."""
    out = self.backbone(x, train)
    heads = [branch(stage, train)
             for branch, stage in zip(self.branches, out.stage_features[:-1])]
    logits = tuple(z for z, _ in heads) + out.logits
    features = tuple(g for _, g in heads) + out.features
    if self.is_initializing():
      self.teach(features)
      self.discriminate([pooling_lib.pool(g, self.pooling) for g in features])
    return ModelOutputs(logits=logits, features=features, stage_features=out.stage_features)

  def teach(self, features: Sequence[jax.Array]) -> jax.Array:
    """Self-teacher logits (N, C) from the S heads' final features of one view."""
    return self.self_teacher(features)

  def discriminate(self, pooled: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Discriminator logits, S arrays (M, 2), from S pooled feature arrays (M, c)."""
    return self.discriminators(pooled)


def _factories(stages, stem) -> tuple[tuple[ModuleFactory, ...], ModuleFactory | None]:
  """(stage factories, stem factory or None) from modules or factories."""
  return tuple(as_factory(s) for s in stages), None if stem is None else as_factory(stem)


def mixskd_network(stages: Sequence[nn.Module | ModuleFactory], num_classes: int, *,
                   stem: nn.Module | ModuleFactory | None = None, head: HeadFactory = dense_head,
                   pooling: str = "spatial_mean", **kwargs: Any) -> MixSKDNetwork:
  """MixSKD's network around a staged backbone; stages and stem may be template modules.

  Args:
    stages: S >= 2 stage modules or factories; each maps the previous stage's output to its
      own, e.g. (N, H, W, C) -> (N, H', W', C') or (N, L, D) -> (N, L, D).
    num_classes: classes of every head.
    stem: what runs before the first stage, or None.
    head: head factory, `head(num_classes, in_features, name=...)`.
    pooling: "spatial_mean" for feature maps, "token_mean" or "first_token" for tokens.
    **kwargs: other `MixSKDNetwork` fields (dtype, discriminator_hidden, ...).

  Example:
    net = mixskd_network([Stage(32), Stage(64, stride=2), Stage(128, stride=2)], 10,
                         stem=Stem(32))
    variables = net.init(key, images)          # images (N, H, W, C)
    outputs = net.apply(variables, images)     # 3 heads: branch1, branch2, backbone
  """
  stages, stem = _factories(stages, stem)
  return MixSKDNetwork(stages=stages, num_classes=num_classes, stem=stem, head=head,
                       pooling=pooling_lib.check_pooling(pooling), **kwargs)


def staged_classifier(stages: Sequence[nn.Module | ModuleFactory], num_classes: int, *,
                      stem: nn.Module | ModuleFactory | None = None,
                      head: HeadFactory = dense_head, pooling: str = "spatial_mean",
                      dtype: Dtype = jnp.float32) -> StagedClassifier:
  """The plain network of `mixskd_network`'s arguments: the same backbone, no branches."""
  stages, stem = _factories(stages, stem)
  return StagedClassifier(stages=stages, num_classes=num_classes, stem=stem, head=head,
                          pooling=pooling_lib.check_pooling(pooling), dtype=dtype)


def backbone_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """A `MixSKDNetwork`'s variables -> the plain backbone's, for `staged_classifier(...)`.

  Every collection's `backbone` sub-tree: `params`, and `batch_stats` when the stages have
  BatchNorm (a plain network in eval mode reads its running statistics; without them Flax
  raises ScopeCollectionNotFound).

  Args:
    variables: {'params': {'backbone': ..., 'branches_0': ..., ...}, 'batch_stats': ...}.
  """
  if BACKBONE not in variables.get("params", {}):
    raise ValueError(f"variables['params'] has no {BACKBONE!r} sub-tree (it has "
                     f"{sorted(variables.get('params', {}))}): pass a MixSKD network's "
                     "variables, as `mixskd_network(...).init` returns them.")
  return {c: tree[BACKBONE] for c, tree in variables.items() if BACKBONE in tree}
