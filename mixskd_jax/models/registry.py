"""Models by name: the architectures of the official code, CPU-sized ResNet, ConvNeXt and ViT."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.models.convnext import ConvNeXtSpec
from mixskd_jax.models.resnet import ResNetSpec, resnet_parts
from mixskd_jax.models.staged import MixSKDNetwork, StagedClassifier
from mixskd_jax.models.vit import ViTSpec

_CIFAR = dict(stage_widths=(64, 128, 256, 512), stage_strides=(1, 2, 2, 2), stem="cifar",
              stem_width=64, stem_relu=False, init_scheme="torch_default")

SPECS: dict[str, ResNetSpec | ConvNeXtSpec | ViTSpec] = {
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
    # Non-ResNet examples for 28x28 inputs (configs/fashion_mnist_{convnext,vit}.py).
    # ConvNeXt: 2x2 patches -> 14x14x32, 7x7x64, 4x4x128; LayerNorm only.
    "small_convnext": ConvNeXtSpec(dims=(32, 64, 128), depths=(1, 1, 1), stem_patch=2),
    # ViT: 4x4 patches -> 49 tokens of width 64; 3 stages of 2 blocks, mean-pooled tokens.
    "small_vit": ViTSpec(patch=4, dim=64, stage_depths=(2, 2, 2), num_heads=4, mlp_ratio=2),
}
# The official PyTorch key layouts exist for ResNets only (`mixskd_jax.interop`).
RESNETS = tuple(name for name, spec in SPECS.items() if isinstance(spec, ResNetSpec))


def build_model(name: str, num_classes: int, *, mixskd: bool = True, dtype: Any = jnp.float32,
                discriminator_hidden: int = 128, conv_input_barrier: bool = False,
                remat_branches: bool = False, batchnorm_groups: int = 1,
                batchnorm_running_stats: str = "mean_of_groups", frozen_backbone: bool = False,
                **spec_overrides: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `SPECS`.
    num_classes: classes of every head.
    mixskd: True for the MixSKD network (backbone + branches + self-teacher + discriminators),
      False for the plain backbone (baselines, inference).
    dtype: compute dtype; parameters stay float32.
    discriminator_hidden: hidden units of each discriminator (MixSKD only).
    conv_input_barrier: an optimization barrier on every convolution's input (faster
      training steps on CPU; same values, same parameters; `layers.conv`). ResNets only.
    remat_branches: recompute the auxiliary branches' activations in the backward pass
      (less memory, same values; MixSKD only).
    batchnorm_groups: contiguous row groups with their own BatchNorm statistics in train
      mode (`layers.BatchNorm`); 1: the whole batch. ResNets only (the others have none).
    batchnorm_running_stats: "mean_of_groups" or "first_group" (`layers.BatchNorm`).
    frozen_backbone: stem and stages always in inference mode (`StagedClassifier`); plain
      models only (a linear probe).
    **spec_overrides: fields of the model's spec to change, e.g. `stage_sizes=(2, 2, 2)`.

  Returns:
    A `MixSKDNetwork` or a `StagedClassifier`; `__call__(x, train)` returns `ModelOutputs`.
  """
  if name not in SPECS:
    raise ValueError(f"Unknown model {name!r}. Known models: {sorted(SPECS)}.")
  spec = SPECS[name]
  unknown = set(spec_overrides) - {f.name for f in dataclasses.fields(spec)}
  if unknown:
    raise ValueError(f"Unknown {type(spec).__name__} fields {sorted(unknown)} for model "
                     f"{name!r}.")
  if isinstance(spec, ResNetSpec):
    spec_overrides = {"conv_input_barrier": conv_input_barrier, "bn_groups": batchnorm_groups,
                      "bn_running_stats": batchnorm_running_stats, **spec_overrides}
  spec = dataclasses.replace(spec, **spec_overrides)
  parts = resnet_parts(spec, dtype) if isinstance(spec, ResNetSpec) else spec.parts(dtype)
  if mixskd:
    if frozen_backbone:
      raise ValueError(f"frozen_backbone=True needs the plain {name!r} (mixskd=False): MixSKD's "
                       "branches train on the backbone's stages.")
    if spec.num_stages < 2:
      raise ValueError(f"MixSKD needs a backbone with at least 2 stages; {name!r} has "
                       f"{spec.num_stages}.")
    return MixSKDNetwork(num_classes=num_classes, discriminator_hidden=discriminator_hidden,
                         remat_branches=remat_branches, **parts)
  return StagedClassifier(num_classes=num_classes, frozen_backbone=frozen_backbone, **parts)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model_from_config(model_config: Any, num_classes: int, *,
                            frozen_backbone: bool = False,
                            platform: str | None = None) -> nn.Module:
  """The model `config.model` describes (the trainer and the benchmark build it here).

  Args:
    model_config: `config.model`: name, mixskd, dtype ("float32" | "bfloat16"),
      discriminator_hidden, conv_input_barrier, remat_branches, batchnorm_groups (resolved
      for the devices: `train.layout.resolve`), batchnorm_running_stats.
    num_classes: classes of every head (the dataset's).
    frozen_backbone: `config.init_from.freeze_backbone` (`build_model`).
    platform: the platform the model is compiled for ("cpu", "gpu", "tpu"; None: the default
      backend's). A step compiled ahead of time for a TPU slice on a CPU host names "tpu".
  """
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r} must be one of "
                     f"{list(DTYPES)}.")
  groups = model_config.get("batchnorm_groups", 1)
  if groups < 1:
    raise ValueError(f"config.model.batchnorm_groups={groups} is not resolved for the devices "
                     "yet: build from `mixskd_jax.train.layout.resolve(config, num_devices)`.")
  return build_model(model_config.name, num_classes, mixskd=model_config.mixskd,
                     dtype=DTYPES[model_config.dtype],
                     discriminator_hidden=model_config.discriminator_hidden,
                     # Measured on CPU only (xla_options.py); GPU and TPU compilers keep
                     # their own fusion choices.
                     conv_input_barrier=(bool(model_config.conv_input_barrier)
                                         and (platform or jax.default_backend()) == "cpu"),
                     remat_branches=bool(model_config.remat_branches),
                     batchnorm_groups=groups,
                     batchnorm_running_stats=model_config.get("batchnorm_running_stats",
                                                              "mean_of_groups"),
                     frozen_backbone=frozen_backbone)
