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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax import losses, mixing
from mixskd_jax.mixing import MixParams
from mixskd_jax.models.layers import global_avg_pool
from mixskd_jax.models.outputs import ModelOutputs

VARIANTS = ("reference_cifar", "full", "adversarial")
TERMS = ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
         "feature_mse", "discriminator")
TRAINABLE, FROZEN = "trainable", "frozen"


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
  """
  variant: str = "full"
  temperature: float = 3.0
  weights: tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TERMS)
  gradient_reversal_scale: float = 1.0

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"objective variant={self.variant!r} is unknown; use one of {VARIANTS}.")
    if not self.temperature > 0:  # also refuses NaN
      raise ValueError(f"objective temperature={self.temperature} must be > 0.")
    names = [n for n, _ in self.weights]
    if sorted(names) != sorted(TERMS):
      raise ValueError(f"objective weights must name each of {TERMS} once; got {names}.")

  @classmethod
  def for_variant(cls, variant: str = "full", *, temperature: float = 3.0,
                  weights: Mapping[str, float] | None = None,
                  gradient_reversal_scale: float = 1.0) -> "ObjectiveConfig":
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
               gradient_reversal_scale=float(gradient_reversal_scale))

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


def mixskd_loss(
    outputs: ModelOutputs,
    labels: jax.Array,
    mix: MixParams,
    *,
    self_teacher: Callable[[Sequence[jax.Array]], jax.Array],
    discriminators: Callable[[Sequence[jax.Array]], Sequence[jax.Array]],
    config: ObjectiveConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MixSKD objective of one step.

  Args:
    outputs: the model's outputs on the 2B images `mixing.stack_views(clean, mixed,
      mix.num_groups)` (with one mix group: `[clean; mixed]`): H heads of logits (2B, C) and
      final feature maps (2B, h, w, c), ordered branch 1 .. branch H-1, main.
    labels: (B,) integer labels of the clean images.
    mix: the `lam` and permutation that made the mixed half from the clean half; with G mix
      groups every group's rows stay together, so nothing crosses devices when the groups
      lie on them.
    self_teacher: maps the H feature maps of one view (B, h, w, c) to logits (B, C).
    discriminators: maps H pooled feature arrays (2B, c) to H logit arrays (2B, 2).
    config: variant, temperature and weights.

  Returns:
    (loss, terms): the weighted scalar loss and every term by name (unweighted, float32),
    plus `loss` itself.
  """
  batch = labels.shape[0]
  num_heads = outputs.num_heads
  if len(outputs.features) != num_heads:
    raise ValueError(f"outputs has {num_heads} logits but {len(outputs.features)} feature maps; "
                     "MixSKD needs one final feature map per head.")
  for z in outputs.logits:
    if z.shape[0] != 2 * batch:
      raise ValueError(f"outputs must cover 2B = {2 * batch} images [clean; mixed] for {batch} "
                       f"labels, got logits of shape {z.shape}.")
  groups = mix.num_groups
  clean_logits, mixup_logits = zip(*(mixing.split_views(losses.upcast(z), groups)
                                     for z in outputs.logits))
  clean_feats, mixup_feats = zip(*(mixing.split_views(g, groups) for g in outputs.features))
  # "Mix of the outputs": interpolate the clean half with the input's lam and permutation.
  interp_logits, interp_feats = mixing.mix((clean_logits, clean_feats), mix)
  labels_b = mixing.permute(labels, mix.perm)
  lam = mix.example_lam()
  mix_ce = lambda z: jnp.mean(losses.mixup_cross_entropy(z, labels, labels_b, lam))
  kl = lambda s, t: jnp.mean(losses.temperature_kl(s, t, config.temperature))

  # t_hat (from the interpolated features) and t_tilde (from the mixup ones) in one call:
  # the self-teacher works row by row, and one call gives its parameters one gradient to
  # all-reduce across devices instead of two.
  teacher_interp, teacher_mixup = mixing.split_views(losses.upcast(self_teacher(
      [mixing.stack_views(i, m, groups) for i, m in zip(interp_feats, mixup_feats)])), groups)

  # Laid out like the network's rows, so each group's pooled features stay on its device.
  pooled = [mixing.stack_views(global_avg_pool(i), global_avg_pool(m), groups)
            for i, m in zip(interp_feats, mixup_feats)]
  if config.trains_discriminators:
    pooled = [gradient_reversal(p, config.gradient_reversal_scale) for p in pooled]
  disc_logits = discriminators(pooled)

  terms = {
      "clean_ce": sum(jnp.mean(losses.cross_entropy(c, labels)) for c in clean_logits),
      "mixup_ce": sum(mix_ce(m) for m in mixup_logits),
      "self_teacher_ce": mix_ce(teacher_interp) + mix_ce(teacher_mixup),
      # The main head learns across views from the self-teacher ...
      "kl_self_teacher": (kl(interp_logits[-1], teacher_mixup)
                          + kl(mixup_logits[-1], teacher_interp)),
      # ... the branch heads distil mutually between the two views.
      "kl_branches": sum((kl(interp_logits[k], mixup_logits[k])
                          + kl(mixup_logits[k], interp_logits[k])
                          for k in range(num_heads - 1)), jnp.zeros((), jnp.float32)),
      "feature_mse": sum(jnp.mean(losses.feature_mse(i, m))
                         for i, m in zip(interp_feats, mixup_feats)),
      "discriminator": sum(jnp.mean(losses.discriminator_bce(*mixing.split_views(d, groups)))
                           for d in disc_logits),
  }
  loss = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    # A left-out term (weight 0) is logged but never enters the loss, so it sends exactly
    # no gradient (the reference's unused L_mixcls, its never-updated self-teacher).
    if config.weight(name):
      loss = loss + config.weight(name) * value
  terms = {name: jax.lax.stop_gradient(v) for name, v in terms.items()}
  terms["loss"] = jax.lax.stop_gradient(loss)
  return loss, terms


def apply_mixskd(
    model: nn.Module,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    mix: MixParams,
    config: ObjectiveConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], ModelOutputs, Any]]:
  """Mixes `images`, runs a `MixSKDResNet` in train mode on both views, computes the loss.

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

  Returns:
    (loss, (terms, outputs, new_batch_stats)); differentiate with `has_aux=True`.
  """
  def forward(module, images):
    x = mixing.stack_views(images, mixing.mix(images, mix), mix.num_groups)
    outputs = module(x, train=True)
    loss, terms = mixskd_loss(outputs, labels, mix, self_teacher=module.teach,
                              discriminators=module.discriminate, config=config)
    return loss, terms, outputs

  (loss, terms, outputs), state = model.apply(
      variables, images, method=forward, mutable=["batch_stats"])
  return loss, (terms, outputs, state["batch_stats"])


def parameter_partition(params: Mapping[str, Any], config: ObjectiveConfig) -> Any:
  """Labels every parameter TRAINABLE or FROZEN for this variant (for `optax.multi_transform`).

  The self-teacher is frozen in `reference_cifar` (PyTorch skips parameters whose gradient is
  None, so it gets neither updates nor weight decay); discriminators are frozen except in
  `adversarial`. Everything else trains.

  Args:
    params: the model's `params` collection with top-level `self_teacher` and
      `discriminators` entries (others are trained).
    config: the objective.

  Returns:
    A pytree with the structure of `params` whose leaves are "trainable" or "frozen".
  """
  frozen = set()
  if not config.trains_self_teacher:
    frozen.add("self_teacher")
  if not config.trains_discriminators:
    frozen.add("discriminators")
  return {name: jax.tree_util.tree_map(lambda _: FROZEN if name in frozen else TRAINABLE, sub)
          for name, sub in params.items()}
