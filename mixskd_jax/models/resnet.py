"""ResNet backbones (CIFAR- and ImageNet-style) built from a declarative `ResNetSpec`.

Module and parameter names mirror the official PyTorch code (`conv1`, `bn1`, `layer{s}`,
`block{b}`, `downsample_conv`/`downsample_bn`, `fc`) so that checkpoints map one to one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models import layers
from mixskd_jax.models.staged import MixSKDNetwork, StagedClassifier

Dtype = Any
BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Everything that defines a ResNet's architecture and its PyTorch-equivalent numerics.

  Attributes:
    block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3 with the stride, 1x1 x4).
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    stage_widths: base channels per stage (a bottleneck stage outputs 4x this).
    stage_strides: stride of the first block of each stage.
    stem: "cifar" (3x3 s1 conv + BN) or "imagenet" (7x7 s2 conv + BN + ReLU + 3x3 s2 max-pool).
    stem_width: channels of the stem convolution.
    stem_relu: ReLU after the stem BN. The official CIFAR MixSKD backbone has none.
    init_scheme: "torch_default" (CIFAR models) or "kaiming_fan_out" (torchvision ImageNet).
    bn_momentum: weight of the old running statistics (0.9 == PyTorch's 0.1).
    bn_epsilon: BatchNorm epsilon (PyTorch default 1e-5).
    bn_groups: contiguous row groups that BatchNorm normalizes separately in train mode
      (`layers.BatchNorm`): 1 for statistics over the whole batch, one per device for a
      DDP run without SyncBN. A training choice, not part of the architecture.
    bn_running_stats: how the groups update the running statistics ("mean_of_groups" or
      "first_group", `layers.BatchNorm`).
    conv_input_barrier: an optimization barrier on every convolution's input (see
      `layers.conv`): a compilation choice, not part of the architecture; the values
      computed are the same either way.
  """
  block: str
  stage_sizes: tuple[int, ...]
  stage_widths: tuple[int, ...]
  stage_strides: tuple[int, ...]
  stem: str = "cifar"
  stem_width: int = 64
  stem_relu: bool = False
  init_scheme: str = "torch_default"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_groups: int = 1
  bn_running_stats: str = "mean_of_groups"
  conv_input_barrier: bool = False

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ValueError(f"ResNetSpec.block={self.block!r} must be one of {BLOCKS}.")
    if self.stem not in STEMS:
      raise ValueError(f"ResNetSpec.stem={self.stem!r} must be one of {STEMS}.")
    if not len(self.stage_sizes) == len(self.stage_widths) == len(self.stage_strides):
      raise ValueError("ResNetSpec.stage_sizes, stage_widths and stage_strides need one entry "
                       f"per stage; got {self.stage_sizes}, {self.stage_widths}, "
                       f"{self.stage_strides}.")
    layers.conv_kernel_init(self.init_scheme)  # validates the name
    if self.bn_running_stats not in layers.RUNNING_STATS:
      raise ValueError(f"ResNetSpec.bn_running_stats={self.bn_running_stats!r} must be one of "
                       f"{layers.RUNNING_STATS}.")
    if self.bn_groups < 1:
      raise ValueError(f"ResNetSpec.bn_groups={self.bn_groups} must be >= 1.")

  def norm(self, dtype: Dtype):
    """This spec's BatchNorm factory: `spec.norm(dtype)(name=...)(x, train)`."""
    return layers.batch_norm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=dtype,
                             groups=self.bn_groups, running_stats=self.bn_running_stats)

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def num_stages(self) -> int:
    return len(self.stage_sizes)

  @property
  def feature_channels(self) -> int:
    """Channels of the last stage's output (and of every head's feature map)."""
    return self.stage_widths[-1] * self.expansion


class ResidualBlock(nn.Module):
  """Post-activation BasicBlock or Bottleneck (V1.5: the stride sits on the 3x3 conv)."""
  spec: ResNetSpec
  width: int
  strides: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spec = self.spec
    conv = lambda f, k, s, name: layers.conv(f, k, s, init_scheme=spec.init_scheme,
                                             dtype=self.dtype, name=name,
                                             input_barrier=spec.conv_input_barrier)
    norm = spec.norm(self.dtype)
    out_channels = self.width * spec.expansion
    if spec.block == "basic":
      y = nn.relu(norm(name="bn1")(conv(self.width, 3, self.strides, "conv1")(x), train))
      y = norm(name="bn2")(conv(self.width, 3, 1, "conv2")(y), train)
    else:
      y = nn.relu(norm(name="bn1")(conv(self.width, 1, 1, "conv1")(x), train))
      y = nn.relu(norm(name="bn2")(conv(self.width, 3, self.strides, "conv2")(y), train))
      y = norm(name="bn3")(conv(out_channels, 1, 1, "conv3")(y), train)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_channels:
      shortcut = norm(name="downsample_bn")(
          conv(out_channels, 1, self.strides, "downsample_conv")(x), train)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """Stage `index` of `spec`: `stage_sizes[index]` blocks named block0, block1, ..."""
  spec: ResNetSpec
  index: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for b in range(self.spec.stage_sizes[self.index]):
      strides = self.spec.stage_strides[self.index] if b == 0 else 1
      x = ResidualBlock(self.spec, self.spec.stage_widths[self.index], strides, self.dtype,
                        name=f"block{b}")(x, train)
    return x


class Stem(nn.Module):
  spec: ResNetSpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spec = self.spec
    kernel, strides = (3, 1) if spec.stem == "cifar" else (7, 2)
    x = layers.conv(spec.stem_width, kernel, strides, init_scheme=spec.init_scheme,
                    dtype=self.dtype, name="conv1", input_barrier=spec.conv_input_barrier)(x)
    x = spec.norm(self.dtype)(name="bn1")(x, train)
    if spec.stem_relu:
      x = nn.relu(x)
    if spec.stem == "imagenet":
      x = layers.max_pool_3x3_s2(x)
    return x


def resnet_parts(spec: ResNetSpec, dtype: Dtype = jnp.float32) -> dict[str, Any]:
  """The staged-backbone arguments of a ResNet: stem, stages `layer1..layerS`, the `fc` head."""
  return dict(stages=tuple(functools.partial(ResNetStage, spec, s, dtype)
                           for s in range(spec.num_stages)),
              stem=functools.partial(Stem, spec, dtype),
              head=functools.partial(layers.linear, dtype=dtype),
              pooling="spatial_mean", dtype=dtype)


def resnet(spec: ResNetSpec, num_classes: int, dtype: Dtype = jnp.float32) -> StagedClassifier:
  """A plain ResNet classifier: stem, stages `layer1..layerS`, global pool, `fc`.

  This is also the backbone inside the MixSKD model and the network used at inference.
  Parameters and BatchNorm statistics stay float32 whatever the compute `dtype`.
  """
  return StagedClassifier(num_classes=num_classes, **resnet_parts(spec, dtype))


def mixskd_resnet(spec: ResNetSpec, num_classes: int, discriminator_hidden: int = 128,
                  dtype: Dtype = jnp.float32, remat_branches: bool = False) -> MixSKDNetwork:
  """The official MixSKD network: a ResNet with S - 1 auxiliary branches, each a fresh copy of
  the remaining stages (spec A.2), the self-teacher and the discriminators."""
  return MixSKDNetwork(num_classes=num_classes, discriminator_hidden=discriminator_hidden,
                       remat_branches=remat_branches, **resnet_parts(spec, dtype))
