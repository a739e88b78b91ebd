"""Backbones, the MixSKD network and its training-only heads."""

from mixskd_jax.models.heads import FeatureDiscriminators, MLPDiscriminator, SelfTeacher
from mixskd_jax.models.outputs import ModelOutputs
from mixskd_jax.models.registry import SPECS, build_model, build_model_from_config
from mixskd_jax.models.resnet import ResNetSpec, mixskd_resnet, resnet
from mixskd_jax.models.staged import (AuxiliaryBranch, MixSKDNetwork, StagedClassifier,
                                      backbone_variables, dense_head, mixskd_network,
                                      staged_classifier)
from mixskd_jax.models.xla_options import compiler_options

__all__ = [
    "AuxiliaryBranch", "FeatureDiscriminators", "MLPDiscriminator", "MixSKDNetwork",
    "ModelOutputs", "ResNetSpec", "SPECS", "SelfTeacher", "StagedClassifier", "backbone_variables",
    "build_model", "build_model_from_config", "compiler_options", "dense_head", "mixskd_network",
    "mixskd_resnet", "resnet", "staged_classifier",
]
