"""Training methods: what one step computes from a clean batch, for the trainer to differentiate.

A method turns (model, variables, normalized images, labels, step key) into
`(loss, (terms, outputs, new_batch_stats))` and says which parameters it trains. MixSKD draws
its mixup on device from the step key; the plain cross-entropy method is the baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from mixskd_jax import losses, mixing, objective
from mixskd_jax.objective import ObjectiveConfig

LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any, Any]]]


@dataclasses.dataclass(frozen=True)
class Method:
  """name, loss(model, variables, images, labels, key) and partition(params)."""
  name: str
  loss: LossFn
  partition: Callable[[Mapping[str, Any]], Any]


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
  """`config.objective` -> ObjectiveConfig; a weight left None takes the variant's default."""
  weights = {k: v for k, v in config.objective.weights.to_dict().items() if v is not None}
  return ObjectiveConfig.for_variant(
      config.objective.variant, temperature=config.objective.temperature, weights=weights,
      gradient_reversal_scale=config.objective.gradient_reversal_scale)


def mixskd_method(config: ml_collections.ConfigDict, *, num_shards: int) -> Method:
  """MixSKD: lam and a permutation (within each of `num_shards` data shards) from the key."""
  obj = objective_config(config)
  alpha = float(config.objective.alpha)

  def loss(model: nn.Module, variables, images, labels, key):
    mix = mixing.sample_mix(key, images.shape[0], alpha, num_shards)
    return objective.apply_mixskd(model, variables, images, labels, mix, obj)

  return Method("mixskd", loss, lambda params: objective.parameter_partition(params, obj))


def cross_entropy_method() -> Method:
  """The plain baseline: cross-entropy of the single head on the clean batch."""
  def loss(model: nn.Module, variables, images, labels, key):
    del key
    outputs, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
    value = jnp.mean(losses.cross_entropy(outputs.logits[-1], labels))
    return value, ({"cross_entropy": jax.lax.stop_gradient(value),
                    "loss": jax.lax.stop_gradient(value)}, outputs, state["batch_stats"])
  return Method("cross_entropy", loss,
                lambda params: jax.tree_util.tree_map(lambda _: objective.TRAINABLE, params))


def build_method(config: ml_collections.ConfigDict, *, num_shards: int) -> Method:
  if config.model.mixskd:
    return mixskd_method(config, num_shards=num_shards)
  return cross_entropy_method()
