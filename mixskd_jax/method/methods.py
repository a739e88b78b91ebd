"""Training methods: what one step computes from a clean batch, for the trainer to differentiate.

A method turns (model, variables, StepInputs) into
`(loss, (terms, outputs, new_batch_stats, new_method_state))`, where `outputs.logits` hold
each head's logits of the B clean rows (what the step's train accuracy reads; MixSKD's
network also sees the mixed rows and drops them here), and says which parameters it
trains and what per-run state it keeps (PS-KD's table of predictions). MixSKD and the
baselines it is compared with (spec §7) all share the model, data and optimizer; only this
function differs. `config.method` picks one of METHODS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from mixskd_jax.config.choices import BRANCHED_METHODS, DATA_NEEDS, METHODS
from mixskd_jax.method import baselines, kl_schedule, losses, mixing, objective, trainable
from mixskd_jax.method.objective import ObjectiveConfig

# METHODS, BRANCHED_METHODS and DATA_NEEDS: config/choices.py.


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """One step's inputs, on device.

  Attributes:
    images: (B, H, W, C) normalized images.
    labels: (B,) integer labels.
    key: the step's PRNG key.
    step: () int32 global step (before the update).
    batch: the raw batch dict (extra fields: 'example_id', 'pair_image', ...).
    pair_images: (B, H, W, C) normalized same-class partners, or None.
    method_state: the method's state pytree ({} for stateless methods).
  """
  images: jax.Array
  labels: jax.Array
  key: jax.Array
  step: jax.Array
  batch: Mapping[str, jax.Array]
  pair_images: jax.Array | None
  method_state: Any


LossFn = Callable[[nn.Module, Mapping[str, Any], StepInputs],
                  tuple[jax.Array, tuple[dict, Any, Any, Any]]]


@dataclasses.dataclass(frozen=True)
class Method:
  """name, loss(model, variables, inputs), partition(params), init_state(num_examples, C)."""
  name: str
  loss: LossFn
  partition: Callable[[Mapping[str, Any]], Any]
  init_state: Callable[[int, int], Any] = lambda num_examples, num_classes: {}


def _all_trainable(params):
  return jax.tree_util.tree_map(lambda _: objective.TRAINABLE, params)


def _logged(terms: Mapping[str, jax.Array], loss: jax.Array) -> dict[str, jax.Array]:
  out = {name: jax.lax.stop_gradient(value) for name, value in terms.items()}
  out["loss"] = jax.lax.stop_gradient(loss)
  return out


def _forward(model: nn.Module, variables, images):
  outputs, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return outputs, state.get("batch_stats", {})


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
  """`config.objective` -> ObjectiveConfig; a weight left None takes the variant's default."""
  weights = {k: v for k, v in config.objective.weights.to_dict().items() if v is not None}
  return ObjectiveConfig.for_variant(
      config.objective.variant, temperature=config.objective.temperature, weights=weights,
      gradient_reversal_scale=config.objective.gradient_reversal_scale,
      kl_gate=config.objective.get("kl_gate", "none"),
      discriminator_input=config.objective.get("discriminator_input", "pooled"))


def mixskd_method(config: ml_collections.ConfigDict, *, num_groups: int,
                  steps_per_epoch: int = 1) -> Method:
  """MixSKD: lam and a permutation (within each of `num_groups` mix groups) from the key.

  The outputs it returns hold the clean rows' logits only (what the step's accuracy reads).
  With `config.objective.kl_warmup_epochs` > 0 the KL terms' weights ramp up linearly over
  that many epochs of `steps_per_epoch` steps (`kl_schedule.kl_warmup_scale`, logged as
  `kl_warmup_scale`); `config.objective.kl_gate` is the objective's (`ObjectiveConfig`).
  """
  obj = objective_config(config)
  alpha = float(config.objective.alpha)
  lam_per_group = bool(config.objective.get("lam_per_group", False))
  kl_warmup_epochs = float(config.objective.get("kl_warmup_epochs", 0.0))

  def loss(model, variables, inputs: StepInputs):
    mix = mixing.sample_mix(inputs.key, inputs.images.shape[0], alpha, num_groups,
                            lam_per_group=lam_per_group)
    ramp = None
    if kl_warmup_epochs > 0:
      ramp = kl_schedule.kl_warmup_scale(inputs.step, steps_per_epoch=steps_per_epoch,
                                       warmup_epochs=kl_warmup_epochs)
    value, (terms, outputs, stats) = objective.apply_mixskd(
        model, variables, inputs.images, inputs.labels, mix, obj,
        term_scales=None if ramp is None else {t: ramp for t in objective.KL_TERMS})
    if ramp is not None:
      terms = {**terms, "kl_warmup_scale": jax.lax.stop_gradient(ramp)}
    clean = tuple(mixing.split_views(z, num_groups)[0] for z in outputs.logits)
    return value, (terms, outputs.replace(logits=clean), stats, inputs.method_state)

  return Method("mixskd", loss, lambda params: objective.parameter_partition(params, obj))


def _single_loss_method(name: str, per_example: Callable) -> Method:
  """A method whose loss is one per-example function of (logits, labels) on the clean batch."""
  def loss(model, variables, inputs: StepInputs):
    outputs, stats = _forward(model, variables, inputs.images)
    value = jnp.mean(per_example(outputs.logits[-1], inputs.labels))
    return value, (_logged({name: value}, value), outputs, stats, inputs.method_state)
  return Method(name, loss, _all_trainable)


def cross_entropy_method() -> Method:
  """The plain baseline: cross-entropy of the single head on the clean batch."""
  return _single_loss_method("cross_entropy", losses.cross_entropy)


def label_smoothing_method(epsilon: float) -> Method:
  """CE against 1 - eps on the label and eps / (C - 1) elsewhere."""
  return _single_loss_method(
      "label_smoothing", lambda z, y: baselines.label_smoothing_cross_entropy(z, y, epsilon))


def _mixed_input_method(name: str, alpha: float, make_inputs: Callable,
                        num_groups: int) -> Method:
  """Mixup and CutMix: the network sees only mixed images; the loss mixes the two labels.

  lam ~ Beta(alpha, alpha) and the partner permutation come from `mixing.sample_mix`;
  `make_inputs(key, images, mix)` -> (mixed images, lam actually used).
  """
  def loss(model, variables, inputs: StepInputs):
    mix_key, box_key = jax.random.split(inputs.key)
    mix = mixing.sample_mix(mix_key, inputs.images.shape[0], alpha, num_groups)
    mixed, lam = make_inputs(box_key, inputs.images, mix)
    outputs, stats = _forward(model, variables, mixed)
    labels_b = mixing.permute(inputs.labels, mix.perm)
    value = jnp.mean(losses.mixup_cross_entropy(outputs.logits[-1], inputs.labels, labels_b,
                                                lam))
    terms = _logged({"mixup_ce": value, "lam": lam}, value)
    return value, (terms, outputs, stats, inputs.method_state)
  return Method(name, loss, _all_trainable)


def mixup_method(alpha: float, num_groups: int) -> Method:
  """Mixup (Zhang et al.): one lam per batch, images mixed, loss-level label mixing."""
  return _mixed_input_method("mixup", alpha, lambda key, images, mix: (
      mixing.mix(images, mix), mix.lam), num_groups)


def cutmix_method(alpha: float, num_groups: int) -> Method:
  """CutMix (Yun et al.): one box per batch, lam recomputed from the box's clipped area."""
  def make_inputs(key, images, mix):
    inside, lam = baselines.cutmix_box(key, images.shape[1], images.shape[2], mix.lam)
    return baselines.cutmix_images(images, mixing.permute(images, mix.perm), inside), lam
  return _mixed_input_method("cutmix", alpha, make_inputs, num_groups)


def cs_kd_method(temperature: float, weight: float) -> Method:
  """CS-KD (Yun et al. 2020): CE on the anchors + T^2 KL to a same-class partner's prediction.

  The partner goes through the network in train mode without gradient, as a separate
  forward pass (its BatchNorm statistics update the running averages too, as in the
  reference, which forwards it under no_grad in train mode).
  """
  def loss(model, variables, inputs: StepInputs):
    if inputs.pair_images is None:
      raise ValueError("cs_kd needs same-class partners: set config.data.class_pairs=True.")
    outputs, stats = _forward(model, variables, inputs.images)
    frozen = jax.lax.stop_gradient(variables["params"])
    partner, stats = _forward(model, {"params": frozen, "batch_stats": stats},
                              inputs.pair_images)
    ce = jnp.mean(losses.cross_entropy(outputs.logits[-1], inputs.labels))
    kl = jnp.mean(losses.temperature_kl(outputs.logits[-1], partner.logits[-1], temperature))
    value = ce + weight * kl
    terms = _logged({"cross_entropy": ce, "class_kl": kl}, value)
    return value, (terms, outputs, stats, inputs.method_state)
  return Method("cs_kd", loss, _all_trainable)


def ps_kd_method(alpha_final: float, *, steps_per_epoch: int, num_epochs: int) -> Method:
  """PS-KD (Kim et al. 2021): soft targets from each example's prediction one epoch ago.

  The state is a (num_examples, C) table of the latest softmax prediction of every training
  example; a step reads its examples' rows (last epoch's predictions, since each example is
  seen once per epoch) and then overwrites them with this step's predictions.
  """
  def init_state(num_examples, num_classes):
    return {"predictions": jnp.zeros((num_examples, num_classes), jnp.float32)}

  def loss(model, variables, inputs: StepInputs):
    ids = inputs.batch.get("example_id")
    if ids is None:
      raise ValueError("ps_kd needs example ids: set config.data.example_ids=True.")
    outputs, stats = _forward(model, variables, inputs.images)
    logits = losses.upcast(outputs.logits[-1])
    table = inputs.method_state["predictions"]
    alpha_t = baselines.ps_kd_alpha(inputs.step // steps_per_epoch, num_epochs, alpha_final)
    targets = baselines.ps_kd_targets(inputs.labels, table[ids], alpha_t)
    value = jnp.mean(baselines.soft_cross_entropy(logits, targets))
    table = table.at[ids].set(jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1)))
    terms = _logged({"soft_ce": value, "alpha_t": alpha_t}, value)
    return value, (terms, outputs, stats, {"predictions": table})
  return Method("ps_kd", loss, _all_trainable, init_state)


def byot_method(temperature: float, kl_weight: float, feature_weight: float) -> Method:
  """BYOT (Zhang et al. 2019) on the MixSKD network's branches; self-teacher and
  discriminators are unused and frozen."""
  def loss(model, variables, inputs: StepInputs):
    outputs, stats = _forward(model, variables, inputs.images)
    per_example = baselines.byot_terms(outputs.logits, outputs.features, inputs.labels,
                                       temperature)
    terms = {name: jnp.mean(v) for name, v in per_example.items()}
    value = (terms["cross_entropy"] + kl_weight * terms["kl"]
             + feature_weight * terms["feature_mse"])
    return value, (_logged(terms, value), outputs, stats, inputs.method_state)

  def partition(params):
    return trainable.partition(
        params, roles={"self_teacher": ("self_teacher",), "discriminators": ("discriminators",)},
        frozen=("self_teacher", "discriminators"))
  return Method("byot", loss, partition)


def method_name(config: ml_collections.ConfigDict) -> str:
  """`config.method`, or when unset the one `config.model.mixskd` implies."""
  name = config.get("method")
  if name is None:
    return "mixskd" if config.model.mixskd else "cross_entropy"
  return name


def check_config(config: ml_collections.ConfigDict) -> str:
  """Validates the method against the model and data fields; returns its name."""
  name = method_name(config)
  if name not in METHODS:
    raise ValueError(f"config.method={name!r} is unknown; use one of {METHODS}.")
  branched = name in BRANCHED_METHODS
  if bool(config.model.mixskd) != branched:
    raise ValueError(f"config.method={name!r} {'needs' if branched else 'trains a plain'} "
                     f"network{' with auxiliary branches' if branched else ''}: set "
                     f"config.model.mixskd={branched}.")
  field = DATA_NEEDS.get(name)
  if field and not config.data.get(field, False):
    raise ValueError(f"config.method={name!r} needs config.data.{field}=True.")
  return name


def build_method(config: ml_collections.ConfigDict, *, num_groups: int,
                 steps_per_epoch: int = 1, num_epochs: int = 1) -> Method:
  """The method `config.method` names, with its hyperparameters from `config.baselines`.

  Args:
    num_groups: mix groups pairs stay within (mixskd, mixup, cutmix).
    steps_per_epoch, num_epochs: the schedule PS-KD's alpha_t and MixSKD's KL warm-up follow.
  """
  name = check_config(config)
  b = config.get("baselines") or ml_collections.ConfigDict()
  if name == "mixskd":
    return mixskd_method(config, num_groups=num_groups, steps_per_epoch=steps_per_epoch)
  if name == "cross_entropy":
    return cross_entropy_method()
  if name == "label_smoothing":
    return label_smoothing_method(b.label_smoothing)
  if name == "mixup":
    return mixup_method(b.mixup_alpha, num_groups)
  if name == "cutmix":
    return cutmix_method(b.cutmix_alpha, num_groups)
  if name == "cs_kd":
    return cs_kd_method(b.kd_temperature, b.cs_kd_weight)
  if name == "ps_kd":
    return ps_kd_method(b.ps_kd_alpha, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
  return byot_method(b.kd_temperature, b.byot_kl_weight, b.byot_feature_weight)
