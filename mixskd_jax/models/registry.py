"""Models by name: the architectures of the official code and a CPU-sized one."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models.mixskd import MixSKDResNet
from mixskd_jax.models.resnet import ResNet, ResNetSpec

_CIFAR = dict(stage_widths=(64, 128, 256, 512), stage_strides=(1, 2, 2, 2), stem="cifar",
              stem_width=64, stem_relu=False, init_scheme="torch_default")

SPECS: dict[str, ResNetSpec] = {
    # The official CIFAR MixSKD backbones (spec A.1): post-activation, no stem ReLU.
    "cifar_resnet18": ResNetSpec(block="basic", stage_sizes=(2, 2, 2, 2), **_CIFAR),
    "cifar_resnet34": ResNetSpec(block="basic", stage_sizes=(3, 4, 6, 3), **_CIFAR),
    "cifar_resnet50": ResNetSpec(block="bottleneck", stage_sizes=(3, 4, 6, 3), **_CIFAR),
    # torchvision ResNet-50 V1.5 with kaiming fan-out init (spec A.7).
    "imagenet_resnet50": ResNetSpec(
        block="bottleneck", stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512),
        stage_strides=(1, 2, 2, 2), stem="imagenet", stem_width=64, stem_relu=True,
        init_scheme="kaiming_fan_out"),
    # A CPU-sized CIFAR-style ResNet for 28x28 or 32x32 inputs: 3 stages of one BasicBlock.
    "small_resnet": ResNetSpec(
        block="basic", stage_sizes=(1, 1, 1), stage_widths=(16, 32, 64), stage_strides=(1, 2, 2),
        stem="cifar", stem_width=16, stem_relu=False, init_scheme="torch_default"),
}


def build_model(name: str, num_classes: int, *, mixskd: bool = True, dtype: Any = jnp.float32,
                discriminator_hidden: int = 128, **spec_overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `SPECS`.
    num_classes: classes of every head.
    mixskd: True for the MixSKD network (backbone + branches + self-teacher + discriminators),
      False for the plain backbone (baselines, inference).
    dtype: compute dtype; parameters stay float32.
    discriminator_hidden: hidden units of each discriminator (MixSKD only).
    **spec_overrides: fields of `ResNetSpec` to change, e.g. `stage_sizes=(2, 2, 2)`.

  Returns:
    A Flax module whose `__call__(x, train)` returns `ModelOutputs`.
  """
  if name not in SPECS:
    raise ValueError(f"Unknown model {name!r}. Known models: {sorted(SPECS)}.")
  unknown = set(spec_overrides) - {f.name for f in dataclasses.fields(ResNetSpec)}
  if unknown:
    raise ValueError(f"Unknown ResNetSpec fields {sorted(unknown)} for model {name!r}.")
  spec = dataclasses.replace(SPECS[name], **spec_overrides)
  if mixskd:
    if spec.num_stages < 2:
      raise ValueError(f"MixSKD needs a backbone with at least 2 stages; {name!r} has "
                       f"{spec.num_stages}.")
    return MixSKDResNet(spec, num_classes, discriminator_hidden, dtype)
  return ResNet(spec, num_classes, dtype)
