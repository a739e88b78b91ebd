"""Backbones, the MixSKD network and its training-only heads."""

from mixskd_jax.models.heads import FeatureDiscriminators, MLPDiscriminator, SelfTeacher
from mixskd_jax.models.mixskd import AuxiliaryBranch, MixSKDResNet
from mixskd_jax.models.outputs import ModelOutputs
from mixskd_jax.models.registry import SPECS, build_model
from mixskd_jax.models.resnet import ResNet, ResNetSpec

__all__ = [
    "AuxiliaryBranch", "FeatureDiscriminators", "MLPDiscriminator", "MixSKDResNet",
    "ModelOutputs", "ResNet", "ResNetSpec", "SPECS", "SelfTeacher", "build_model",
]
