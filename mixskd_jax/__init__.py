"""MixSKD (Yang et al., ECCV 2022) in JAX/Flax: the method in one import, optax-style.

    import mixskd_jax as mixskd

    mix = mixskd.sample_mix(key, batch, alpha=0.4)                # lam ~ Beta, a permutation
    x = mixskd.stack_views(images, mixskd.mix(images, mix))       # [clean; mixed]
    loss, terms = mixskd.mixskd_loss(outputs, labels, mix, self_teacher=..., discriminators=...,
                                     config=mixskd.ObjectiveConfig.for_variant("full"))

The network with branches built for any staged Linen backbone: `mixskd_network`; its
training-only heads: `SelfTeacher`, `FeatureDiscriminators`; its plain backbone's variables:
`backbone_variables`. What a variant trains: `parameter_partition` / `trainable_mask`; the loss
sends no gradient into the heads a variant freezes, and `optimizer(tx, params, config)` keeps
any optax optimizer (weight decay included) off them. NNX models: `mixskd_jax.nnx`. The
trainer, data pipelines and configs live in `mixskd_jax.train`, `mixskd_jax.data` and
`mixskd_jax.configs`. Importing this package only imports JAX, Flax and optax: no side effects.
"""

from mixskd_jax.mixing import (MixParams, masked_permutation, mix, permute, sample_mix,
                               split_views, stack_views)
from mixskd_jax.models import (FeatureDiscriminators, MixSKDNetwork, ModelOutputs, SelfTeacher,
                               StagedClassifier, backbone_variables, build_model, mixskd_network,
                               staged_classifier)
from mixskd_jax.objective import (FROZEN, TERMS, TRAINABLE, VARIANTS, ObjectiveConfig,
                                  apply_mixskd, mixskd_loss, mixskd_per_example_terms,
                                  parameter_partition, trainable_mask)
from mixskd_jax.pooling import POOLINGS, pool
from mixskd_jax.train.optimizer import reference_sgd
from mixskd_jax.trainable import partitioned, variant_optimizer as optimizer

__version__ = "0.1.0"

__all__ = [
    "FROZEN", "FeatureDiscriminators", "MixParams", "MixSKDNetwork", "ModelOutputs",
    "ObjectiveConfig", "POOLINGS", "SelfTeacher", "StagedClassifier", "TERMS", "TRAINABLE",
    "VARIANTS", "apply_mixskd", "backbone_variables", "build_model", "masked_permutation", "mix",
    "mixskd_loss", "mixskd_network", "mixskd_per_example_terms", "optimizer",
    "parameter_partition", "partitioned", "permute", "pool", "reference_sgd", "sample_mix",
    "split_views", "stack_views", "staged_classifier", "trainable_mask",
]
