"""Backbones, the MixSKD network and its training-only heads."""

from mixskd_jax.models.heads import FeatureDiscriminators, MLPDiscriminator, SelfTeacher
from mixskd_jax.models.mixskd import AuxiliaryBranch, MixSKDResNet
from mixskd_jax.models.outputs import ModelOutputs
from mixskd_jax.models.registry import SPECS, build_model, build_model_from_config
from mixskd_jax.models.resnet import ResNet, ResNetSpec
from mixskd_jax.models.xla_options import compiler_options

__all__ = [
    "AuxiliaryBranch", "FeatureDiscriminators", "MLPDiscriminator", "MixSKDResNet",
    "ModelOutputs", "ResNet", "ResNetSpec", "SPECS", "SelfTeacher", "build_model",
    "build_model_from_config", "compiler_options",
]
