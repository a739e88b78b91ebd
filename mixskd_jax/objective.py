"""The MixSKD recipe: model outputs on [clean; mixed] -> (loss, named terms).

This is the only module that knows which terms exist, how they are weighted in each
variant, and which parameters each variant trains (spec §B.3-B.4):

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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax import (kl_schedule, losses, mixing, objective_checks, pooling as pooling_lib,
                        trainable)
from mixskd_jax.mixing import MixParams
from mixskd_jax.models.outputs import ModelOutputs

VARIANTS = ("reference_cifar", "full", "adversarial")
TERMS = ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
         "feature_mse", "discriminator")
# The distillation KL terms: what `kl_schedule.kl_warmup_scale` ramps.
KL_TERMS = ("kl_self_teacher", "kl_branches")
# ObjectiveConfig.kl_gate: "none"; "teacher_leads" multiplies kl_self_teacher by 1 on steps
# where the self-teacher's batch accuracy exceeds the backbone head's, else 0; "monitor"
# computes and logs the same gate and accuracies without applying it.
KL_GATES = ("none", "teacher_leads", "monitor")
# ObjectiveConfig.discriminator_input: what the discriminators read. "pooled" is the
# reference (the pooled feature maps); "unit_pooled" scales each pooled row to unit L2 norm
# first, so a frozen random discriminator's BCE cannot be lowered by growing the features.
# Built to test whether that term hurts transfer by rewarding larger features (issue #21): it
# did hurt frozen features, but not through their size (experiments/results/README.md).
DISCRIMINATOR_INPUTS = ("pooled", "unit_pooled")
TRAINABLE, FROZEN = trainable.TRAINABLE, trainable.FROZEN


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Which MixSKD objective to compute. Build it with `ObjectiveConfig.for_variant`.

  Attributes:
    variant: one of VARIANTS; decides the default weights and what is trainable.
    temperature: KD temperature T (3 in both official scripts).
    weights: weight of every term in TERMS (all 1 in the reference, except the terms a
      variant leaves out, which are 0 and still logged).
    gradient_reversal_scale: factor on the reversed gradient that reaches the network from
      the discriminators (`adversarial` only).
    kl_gate: one of KL_GATES (research option; "none" is the reference). With
      "teacher_leads", `kl_self_teacher` enters the loss only on steps where the self-teacher
      is more accurate than the backbone head on the rows that term pairs (`kl_schedule.kl_gate_accuracies`);
      "monitor" only logs that gate. Both log `kl_gate_open` (1/0) and the two accuracies.
    discriminator_input: one of DISCRIMINATOR_INPUTS ("pooled" is the reference).
  """
  variant: str = "full"
  temperature: float = 3.0
  weights: tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TERMS)
  gradient_reversal_scale: float = 1.0
  kl_gate: str = "none"
  discriminator_input: str = "pooled"

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"objective variant={self.variant!r} is unknown; use one of {VARIANTS}.")
    if not self.temperature > 0:  # also refuses NaN
      raise ValueError(f"objective temperature={self.temperature} must be > 0.")
    names = [n for n, _ in self.weights]
    if sorted(names) != sorted(TERMS):
      raise ValueError(f"objective weights must name each of {TERMS} once; got {names}.")
    if self.kl_gate not in KL_GATES:
      raise ValueError(f"objective kl_gate={self.kl_gate!r} is unknown; use one of {KL_GATES}.")
    if self.discriminator_input not in DISCRIMINATOR_INPUTS:
      raise ValueError(f"objective discriminator_input={self.discriminator_input!r} is "
                       f"unknown; use one of {DISCRIMINATOR_INPUTS}.")

  @classmethod
  def for_variant(cls, variant: str = "full", *, temperature: float = 3.0,
                  weights: Mapping[str, float] | None = None,
                  gradient_reversal_scale: float = 1.0,
                  kl_gate: str = "none",
                  discriminator_input: str = "pooled") -> "ObjectiveConfig":
    """The variant's reference weights, with any of them overridden by `weights`."""
    defaults = {t: 1.0 for t in TERMS}
    if variant == "reference_cifar":
      defaults.update(mixup_ce=0.0, self_teacher_ce=0.0)
    unknown = set(weights or {}) - set(TERMS)
    if unknown:
      raise ValueError(f"Unknown objective weight(s) {sorted(unknown)}; terms are {TERMS}.")
    defaults.update(weights or {})
    return cls(variant=variant, temperature=float(temperature),
               weights=tuple((t, float(defaults[t])) for t in TERMS),
               gradient_reversal_scale=float(gradient_reversal_scale), kl_gate=kl_gate,
               discriminator_input=discriminator_input)

  def weight(self, term: str) -> float:
    return dict(self.weights)[term]

  @property
  def trains_self_teacher(self) -> bool:
    return self.variant != "reference_cifar"

  @property
  def trains_discriminators(self) -> bool:
    return self.variant == "adversarial"


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gradient_reversal(x: jax.Array, scale: float) -> jax.Array:
  """Identity forward; multiplies the incoming gradient by -scale on the way back."""
  return x


def _reversal_fwd(x, scale):
  return x, None


def _reversal_bwd(scale, _, g):
  return (jax.tree_util.tree_map(lambda t: -scale * t, g),)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


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


def _per_head_terms(outputs: ModelOutputs, labels: jax.Array, mix: MixParams, *,
                    self_teacher: Callable, discriminators: Callable, config: ObjectiveConfig,
                    pooling: str
                    ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array] | None]:
  """Every term as a list of per-example (B,) arrays, one per head; a head pair's two
  directions of a mutual KL stay a tuple, so its batch means add in the reference's order.

  Also, when `config.kl_gate` is not "none", the per-example (B,) accuracies the gate
  compares (`kl_schedule.kl_gate_accuracies`), else None."""
  objective_checks.check_outputs(outputs, labels.shape[0])
  num_heads = outputs.num_heads
  groups = mix.num_groups
  clean_logits, mixup_logits = zip(*(mixing.split_views(losses.upcast(z), groups)
                                     for z in outputs.logits))
  clean_feats, mixup_feats = zip(*(mixing.split_views(g, groups) for g in outputs.features))
  # "Mix of the outputs": interpolate the clean half with the input's lam and permutation.
  interp_logits, interp_feats = mixing.mix((clean_logits, clean_feats), mix)
  labels_b = mixing.permute(labels, mix.perm)
  lam = mix.example_lam()
  mix_ce = lambda z: losses.mixup_cross_entropy(z, labels, labels_b, lam)
  kl = lambda s, t: losses.temperature_kl(s, t, config.temperature)

  # A head the variant keeps fixed gets no gradient into its parameters, whatever optimizer
  # the user writes; its inputs still pass the gradient on to the network.
  if not config.trains_self_teacher:
    self_teacher = trainable.frozen_function(self_teacher)
  if not config.trains_discriminators:
    discriminators = trainable.frozen_function(discriminators)

  # t_hat (from the interpolated features) and t_tilde (from the mixup ones) in one call:
  # the self-teacher works row by row, and one call gives its parameters one gradient to
  # all-reduce across devices instead of two.
  teacher_logits = self_teacher(
      [mixing.stack_views(i, m, groups) for i, m in zip(interp_feats, mixup_feats)])
  objective_checks.check_head_output("self_teacher", teacher_logits, outputs.logits[0].shape,
                     "it maps the heads' features of 2B rows to (2B, num_classes) logits, "
                     "with the heads' num_classes.")
  teacher_interp, teacher_mixup = mixing.split_views(losses.upcast(teacher_logits), groups)

  # Laid out like the network's rows, so each group's pooled features stay on its device.
  pool = lambda f: pooling_lib.pool(f, pooling)
  pooled = [mixing.stack_views(pool(i), pool(m), groups)
            for i, m in zip(interp_feats, mixup_feats)]
  if config.discriminator_input == "unit_pooled":
    pooled = [losses.unit_rows(p) for p in pooled]
  if config.trains_discriminators:
    pooled = [gradient_reversal(p, config.gradient_reversal_scale) for p in pooled]
  disc_logits = tuple(discriminators(pooled))
  if len(disc_logits) != num_heads:
    raise ValueError(f"discriminators returned {len(disc_logits)} arrays for {num_heads} heads; "
                     "it must map the H pooled arrays to H logit arrays (2B, 2).")
  for d, p in zip(disc_logits, pooled):
    objective_checks.check_head_output("discriminators", d, (p.shape[0], 2), "each head's discriminator gives "
                       "2 logits (interpolated vs mixup) per row.")

  accuracies = None
  if config.kl_gate != "none":
    accuracies = kl_schedule.kl_gate_accuracies(
        students=(interp_logits[-1], mixup_logits[-1]),
        teachers=(teacher_mixup, teacher_interp), labels=labels, labels_b=labels_b, lam=lam)

  return {
      "clean_ce": [losses.cross_entropy(c, labels) for c in clean_logits],
      "mixup_ce": [mix_ce(m) for m in mixup_logits],
      "self_teacher_ce": [mix_ce(teacher_interp), mix_ce(teacher_mixup)],
      # The main head learns across views from the self-teacher ...
      "kl_self_teacher": [kl(interp_logits[-1], teacher_mixup),
                          kl(mixup_logits[-1], teacher_interp)],
      # ... the branch heads distil mutually between the two views.
      "kl_branches": [(kl(interp_logits[k], mixup_logits[k]),
                       kl(mixup_logits[k], interp_logits[k])) for k in range(num_heads - 1)],
      "feature_mse": [losses.feature_mse(i, m) for i, m in zip(interp_feats, mixup_feats)],
      "discriminator": [losses.discriminator_bce(*mixing.split_views(d, groups))
                        for d in disc_logits],
  }, accuracies


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
    pooling: the features' layout and pooling (`mixskd_jax.pooling.POOLINGS`).
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
  per_head, accuracies = _per_head_terms(
      outputs, labels, mix, self_teacher=self_teacher, discriminators=discriminators,
      config=config, pooling=pooling)
  mean = lambda v: (sum(_batch_mean(u, where, axis_name) for u in v) if isinstance(v, tuple)
                    else _batch_mean(v, where, axis_name))
  terms = {name: sum((mean(v) for v in values), jnp.zeros((), jnp.float32))
           for name, values in per_head.items()}
  gate, gate_logs = None, {}
  if accuracies is not None:
    gate, gate_logs = kl_schedule.gate_logs(_batch_mean(accuracies["teacher"], where, axis_name),
                                 _batch_mean(accuracies["backbone"], where, axis_name))
  weights = _scaled_weights(config, term_scales, gate)
  loss = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    # A left-out term (weight 0) is logged but never enters the loss, so it sends exactly
    # no gradient (the reference's unused L_mixcls, its never-updated self-teacher).
    if config.weight(name):
      loss = loss + weights[name] * value
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
  per_head, accuracies = _per_head_terms(
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
      not select is refused with an error (`mixskd_jax.trainable`).

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
