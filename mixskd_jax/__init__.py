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
any optax optimizer (weight decay included) off them. NNX models: `mixskd_jax.nnx`. A run:
`mixskd_jax.run.train_and_evaluate`; configs: `mixskd_jax.config` (the schema and its checks) and
`mixskd_jax.configs` (the experiments); the layers and what may import what: ARCHITECTURE.md.

Importing this package imports nothing else: each name loads its module (JAX, Flax and optax)
on first use, so `import mixskd_jax.config` checks a config without loading JAX.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> (module, name in that module).
_EXPORTS = {
    **{n: ("mixskd_jax.method.mixing", n) for n in (
        "MixParams", "masked_permutation", "mix", "permute", "sample_mix", "split_views",
        "stack_views")},
    **{n: ("mixskd_jax.models", n) for n in (
        "FeatureDiscriminators", "MixSKDNetwork", "ModelOutputs", "SelfTeacher",
        "StagedClassifier", "backbone_variables", "build_model", "mixskd_network",
        "staged_classifier")},
    **{n: ("mixskd_jax.method.objective", n) for n in (
        "FROZEN", "TERMS", "TRAINABLE", "VARIANTS", "ObjectiveConfig", "apply_mixskd",
        "mixskd_loss", "mixskd_per_example_terms", "parameter_partition", "trainable_mask")},
    **{n: ("mixskd_jax.models.pooling", n) for n in ("POOLINGS", "pool")},
    "reference_sgd": ("mixskd_jax.method.optimizer", "reference_sgd"),
    "partitioned": ("mixskd_jax.method.trainable", "partitioned"),
    "optimizer": ("mixskd_jax.method.trainable", "variant_optimizer"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'mixskd_jax' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
