"""The MixSKD recipe: model outputs on [clean; mixed] -> (loss, named terms).

This module and the ones it builds on (`objective_config`, `head_terms`, `gradient_reversal`)
are the only ones that know which terms exist, how they are weighted in each variant, and
which parameters each variant trains (spec §B.3-B.4):

* `reference_cifar`: the official CIFAR script. No mixup CE; the self-teacher is never
  updated (frozen, no weight decay either); discriminators frozen at their random init.
* `full`: the official ImageNet script. Adds mixup CE on every head and on both
  self-teacher outputs, so the self-teacher learns. Discriminators frozen.
* `adversarial`: `full` with trained discriminators. A gradient-reversal layer sits
  between the pooled features and the discriminators: one backward pass trains the
  discriminators to separate interpolated from mixup features (they descend the BCE)
  while the network receives the negated gradient and learns to fool them.

Two research options, off by default (off, every variant computes exactly the reference's
operations): a linear warm-up of the distillation KL terms' weights (`kl_schedule.kl_warmup_scale`, applied
through `mixskd_loss(..., term_scales=...)` by the trainer), and `ObjectiveConfig.kl_gate`,
which keeps `kl_self_teacher` only on steps where the self-teacher out-predicts the backbone.

Here: the per-head terms (`head_terms`) reduced to the step's loss, per batch or per example,
the whole step on a Linen network (`apply_mixskd`), and the variant's trainable parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

# The names (variants, terms, KL gates, discriminator inputs) live with the config's choices;
# like `ObjectiveConfig` and `gradient_reversal`, they are part of this module's API
# (re-exported: `__all__`).
from mixskd_jax.config.choices import DISCRIMINATOR_INPUTS, KL_GATES, KL_TERMS, TERMS, VARIANTS
from mixskd_jax.method import kl_schedule, mixing, trainable
from mixskd_jax.method.gradient_reversal import gradient_reversal
from mixskd_jax.method.head_terms import per_head_terms
from mixskd_jax.method.mixing import MixParams
from mixskd_jax.method.objective_config import ObjectiveConfig
from mixskd_jax.models.outputs import ModelOutputs

TRAINABLE, FROZEN = trainable.TRAINABLE, trainable.FROZEN

__all__ = ["DISCRIMINATOR_INPUTS", "FROZEN", "KL_GATES", "KL_TERMS", "TERMS", "TRAINABLE",
           "VARIANTS", "ObjectiveConfig", "apply_mixskd", "gradient_reversal",
           "mixskd_loss", "mixskd_per_example_terms", "parameter_partition", "trainable_mask"]


def _scaled_weights(config: ObjectiveConfig, term_scales: Mapping[str, Any] | None,
                    gate: jax.Array | None) -> dict[str, Any]:
  """Each term's weight: the config's, times its `term_scales` entry, times the KL gate for
  kl_self_teacher when the config applies it. A term with no factor keeps the config's plain
  float, so with no options the loss is the reference's exact sequence of operations."""
  scales = dict(term_scales or {})
  unknown = set(scales) - set(TERMS)
  if unknown:
    raise ValueError(f"term_scales names unknown term(s) {sorted(unknown)}; terms are {TERMS}.")
  if gate is not None and config.kl_gate == "teacher_leads":
    scale = scales.get("kl_self_teacher")
    scales["kl_self_teacher"] = gate if scale is None else scale * gate
  return {t: config.weight(t) * scales[t] if t in scales else config.weight(t) for t in TERMS}


def _batch_mean(values: jax.Array, where: jax.Array | None, axis_name: Any) -> jax.Array:
  """Mean over the real rows of the batch, across devices when `axis_name` is given."""
  if where is None and axis_name is None:
    return jnp.mean(values)
  weight = (jnp.ones(values.shape, jnp.float32) if where is None
            else jnp.asarray(where, jnp.float32))
  total, count = jnp.sum(values * weight), jnp.sum(weight)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  # No real row at all (a fully padded batch): every term is 0, not NaN.
  return total / jnp.maximum(count, 1.0)


def _summed_batch_means(per_head: Mapping[str, list], where: jax.Array | None,
                        axis_name: Any) -> dict[str, jax.Array]:
  """Each term: the sum over heads of that head's batch mean; the two directions of a mutual
  KL (a tuple) are averaged separately and added, in the reference's order."""
  mean = lambda v: (sum(_batch_mean(u, where, axis_name) for u in v) if isinstance(v, tuple)
                    else _batch_mean(v, where, axis_name))
  return {name: sum((mean(v) for v in values), jnp.zeros((), jnp.float32))
          for name, values in per_head.items()}


def _weighted_loss(terms: Mapping[str, jax.Array], weights: Mapping[str, Any],
                   config: ObjectiveConfig) -> jax.Array:
  """The weighted sum, in the terms' order, of the terms whose config weight is not 0."""
  loss = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    # A left-out term (weight 0) is logged but never enters the loss, so it sends exactly
    # no gradient (the reference's unused L_mixcls, its never-updated self-teacher).
    if config.weight(name):
      loss = loss + weights[name] * value
  return loss


def mixskd_loss(
    outputs: ModelOutputs,
    labels: jax.Array,
    mix: MixParams,
    *,
    self_teacher: Callable[[Sequence[jax.Array]], jax.Array],
    discriminators: Callable[[Sequence[jax.Array]], Sequence[jax.Array]],
    config: ObjectiveConfig,
    pooling: str = "spatial_mean",
    where: jax.Array | None = None,
    axis_name: Any = None,
    term_scales: Mapping[str, jax.Array | float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MixSKD objective of one step.

  Args:
    outputs: the model's outputs on the 2B images `mixing.stack_views(clean, mixed,
      mix.num_groups)` (with one mix group: `[clean; mixed]`): H heads of logits (2B, C) and
      final features (2B, h, w, c) or (2B, L, d), ordered branch 1 .. branch H-1, main.
    labels: (B,) integer labels of the clean images.
    mix: the `lam` and permutation that made the mixed half from the clean half; with G mix
      groups every group's rows stay together, so nothing crosses devices when the groups
      lie on them.
    self_teacher: maps the H final features of one view to logits (B, C).
    discriminators: maps H pooled feature arrays (2B, c) to H logit arrays (2B, 2).
    config: variant, temperature and weights.
    pooling: the features' layout and pooling (`mixskd_jax.models.pooling.POOLINGS`).
    where: optional (B,) bool, True for real examples: padded rows do not count in any mean
      (draw the mix with `sample_mix(..., where=where)` so real rows pair among themselves).
    axis_name: inside `shard_map` (or another mapped context), the mesh axis the batch is
      split over: every mean is then over the whole global batch (psum of sums and counts),
      and the loss is the same on every device.
    term_scales: optional term name -> scalar factor (a traced value is fine) on that term's
      weight for this step, e.g. `kl_schedule.kl_warmup_scale` on the KL_TERMS. A term whose config weight
      is 0 stays out of the loss whatever its factor.

  Returns:
    (loss, terms): the weighted scalar loss and every term by name (unweighted, float32),
    plus `loss` itself. Each term is the sum over heads of that head's batch mean. With
    `config.kl_gate` set, also `kl_gate_open` (1.0 or 0.0) and the accuracies it compared,
    `kl_gate/teacher_accuracy` and `kl_gate/backbone_accuracy` (over the real rows).
  """
  per_head, accuracies = per_head_terms(
      outputs, labels, mix, self_teacher=self_teacher, discriminators=discriminators,
      config=config, pooling=pooling)
  terms = _summed_batch_means(per_head, where, axis_name)
  gate, gate_logs = None, {}
  if accuracies is not None:
    gate, gate_logs = kl_schedule.gate_logs(_batch_mean(accuracies["teacher"], where, axis_name),
                                 _batch_mean(accuracies["backbone"], where, axis_name))
  loss = _weighted_loss(terms, _scaled_weights(config, term_scales, gate), config)
  terms = {name: jax.lax.stop_gradient(v) for name, v in {**terms, **gate_logs}.items()}
  terms["loss"] = jax.lax.stop_gradient(loss)
  return loss, terms


def mixskd_per_example_terms(
    outputs: ModelOutputs,
    labels: jax.Array,
    mix: MixParams,
    *,
    self_teacher: Callable[[Sequence[jax.Array]], jax.Array],
    discriminators: Callable[[Sequence[jax.Array]], Sequence[jax.Array]],
    config: ObjectiveConfig,
    pooling: str = "spatial_mean",
    term_scales: Mapping[str, jax.Array | float] | None = None,
) -> dict[str, jax.Array]:
  """Every MixSKD term per clean example (summed over heads) and their weighted sum `loss`.

  Same arguments as `mixskd_loss`. The batch mean of each entry is `mixskd_loss`'s term; use
  these to weight examples, mask them, or reduce them your own way. With `config.kl_gate` set,
  the gate is decided on the whole batch given (a batch-level quantity), and the gate's
  entries are (B,) too: `kl_gate_open` repeated, the per-example accuracies.

  Returns:
    term name -> (B,) float32, plus "loss": (B,) weighted sum of the terms with non-zero
    weight. Gradients flow as in `mixskd_loss`.
  """
  per_head, accuracies = per_head_terms(
      outputs, labels, mix, self_teacher=self_teacher, discriminators=discriminators,
      config=config, pooling=pooling)
  zero = jnp.zeros(labels.shape, jnp.float32)
  terms = {name: sum((sum(v) if isinstance(v, tuple) else v for v in values), zero)
           for name, values in per_head.items()}
  gate, gate_logs = None, {}
  if accuracies is not None:
    gate, _ = kl_schedule.gate_logs(jnp.mean(accuracies["teacher"]), jnp.mean(accuracies["backbone"]))
    gate_logs = {"kl_gate_open": jnp.broadcast_to(gate, zero.shape),
                 "kl_gate/teacher_accuracy": accuracies["teacher"],
                 "kl_gate/backbone_accuracy": accuracies["backbone"]}
  weights = _scaled_weights(config, term_scales, gate)
  terms["loss"] = sum((weights[n] * v for n, v in terms.items() if config.weight(n)), zero)
  terms.update(gate_logs)
  return terms


def apply_mixskd(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    mix: MixParams,
    config: ObjectiveConfig,
    *,
    term_scales: Mapping[str, jax.Array | float] | None = None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], ModelOutputs, Any]]:
  """Mixes `images`, runs a `MixSKDNetwork` in train mode on both views, computes the loss.

  One forward pass over the 2B rows `mixing.stack_views(clean, mixed, mix.num_groups)`, so
  BatchNorm normalizes both views together, as the reference does (per BatchNorm group of the
  model: `model.batchnorm_groups`).

  Args:
    model: a MixSKD network with `__call__(x, train)`, `teach` and `discriminate`.
    variables: {'params': ..., 'batch_stats': ...}.
    images: (B, H, W, C) normalized float images.
    labels: (B,) integer labels.
    mix: lam and permutation (see `mixing.sample_mix`).
    config: the objective.
    term_scales: per-step factors on terms' weights (see `mixskd_loss`).

  Returns:
    (loss, (terms, outputs, new_batch_stats)); differentiate with `has_aux=True`.
  """
  def forward(module, images):
    x = mixing.stack_views(images, mixing.mix(images, mix), mix.num_groups)
    outputs = module(x, train=True)
    loss, terms = mixskd_loss(outputs, labels, mix, self_teacher=module.teach,
                              discriminators=module.discriminate, config=config,
                              pooling=getattr(module, "pooling", "spatial_mean"),
                              term_scales=term_scales)
    return loss, terms, outputs

  (loss, terms, outputs), state = model.apply(
      variables, images, method=forward, mutable=["batch_stats"])
  # A model without BatchNorm (LayerNorm, tokens) has no batch_stats collection.
  return loss, (terms, outputs, state.get("batch_stats", {}))


def parameter_partition(params: Mapping[str, Any], config: ObjectiveConfig, *,
                        self_teacher: trainable.Where = ("self_teacher",),
                        discriminators: trainable.Where = ("discriminators",)) -> Any:
  """Labels every parameter TRAINABLE or FROZEN for this variant (for `optax.multi_transform`).

  The self-teacher is frozen in `reference_cifar` (PyTorch skips parameters whose gradient is
  None, so it gets neither updates nor weight decay); discriminators are frozen except in
  `adversarial`. Everything else trains.

  Args:
    params: the network's and the training-only heads' parameters.
    config: the objective.
    self_teacher, discriminators: where those heads' parameters are: a path of keys from the
      root (default: the top-level entries, as in our networks), a predicate on a
      parameter's path, or None. A nested sub-tree with one of those names that the path does
      not select is refused with an error (`mixskd_jax.method.trainable`).

  Returns:
    A pytree with the structure of `params` whose leaves are "trainable" or "frozen".
  """
  return trainable.variant_partition(params, config, self_teacher=self_teacher,
                                     discriminators=discriminators)


def trainable_mask(params: Mapping[str, Any], config: ObjectiveConfig, *,
                   self_teacher: trainable.Where = ("self_teacher",),
                   discriminators: trainable.Where = ("discriminators",)) -> Any:
  """`parameter_partition` as booleans (True = trained), e.g. for `optax.masked`."""
  return trainable.mask(parameter_partition(params, config, self_teacher=self_teacher,
                                            discriminators=discriminators))
