"""Every MixSKD term per head and per example, before any reduction (spec §B.1-B.3).

From a model's outputs on the 2B rows [clean; mixed], `per_head_terms` builds the two views
MixSKD compares (the clean half's outputs interpolated with the input's mix, and the mixup
half's), runs the self-teacher and the discriminators on them, and returns each term as a list
of per-example arrays, one per head. `objective.mixskd_loss` takes batch means of them;
`objective.mixskd_per_example_terms` sums them over heads.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from mixskd_jax.method import kl_schedule, losses, mixing, objective_checks, trainable
from mixskd_jax.method.gradient_reversal import gradient_reversal
from mixskd_jax.method.mixing import MixParams
from mixskd_jax.method.objective_config import ObjectiveConfig
from mixskd_jax.models import pooling as pooling_lib
from mixskd_jax.models.outputs import ModelOutputs


class Views(NamedTuple):
  """The heads' outputs on the two views, each a tuple over heads (branch 1 .. main), with the
  labels each view's rows are mixed from."""
  groups: int                             # mix groups: G blocks [clean_g; mixed_g] of rows
  clean_logits: tuple[jax.Array, ...]     # (B, C) float32, on the clean images
  mixup_logits: tuple[jax.Array, ...]     # (B, C) float32, on the mixed images
  interp_logits: tuple[jax.Array, ...]    # (B, C), the clean logits mixed like the images
  mixup_feats: tuple[jax.Array, ...]      # final features on the mixed images
  interp_feats: tuple[jax.Array, ...]     # the clean features mixed like the images
  labels: jax.Array                       # (B,) labels of the clean images
  labels_b: jax.Array                     # (B,) labels of each row's mixing partner
  lam: jax.Array                          # () or (B,) weight of `labels`


def split_and_interpolate(outputs: ModelOutputs, labels: jax.Array, mix: MixParams) -> Views:
  """Splits every head's logits (upcast to float32) and features into the clean and mixup
  views, and interpolates the clean view with the input's lam and permutation."""
  groups = mix.num_groups
  clean_logits, mixup_logits = zip(*(mixing.split_views(losses.upcast(z), groups)
                                     for z in outputs.logits))
  clean_feats, mixup_feats = zip(*(mixing.split_views(g, groups) for g in outputs.features))
  # "Mix of the outputs": interpolate the clean half with the input's lam and permutation.
  interp_logits, interp_feats = mixing.mix((clean_logits, clean_feats), mix)
  labels_b = mixing.permute(labels, mix.perm)
  lam = mix.example_lam()
  return Views(groups=groups, clean_logits=clean_logits, mixup_logits=mixup_logits,
               interp_logits=interp_logits, mixup_feats=mixup_feats, interp_feats=interp_feats,
               labels=labels, labels_b=labels_b, lam=lam)


def teacher_logits(self_teacher: Callable, views: Views,
                   logits_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The self-teacher's float32 logits (t_hat, t_tilde) on the interpolated and the mixup
  features; `logits_shape` is the heads' (2B, num_classes), which it must return."""
  # t_hat (from the interpolated features) and t_tilde (from the mixup ones) in one call:
  # the self-teacher works row by row, and one call gives its parameters one gradient to
  # all-reduce across devices instead of two.
  logits = self_teacher(
      [mixing.stack_views(i, m, views.groups)
       for i, m in zip(views.interp_feats, views.mixup_feats)])
  objective_checks.check_head_output(
      "self_teacher", logits, logits_shape,
      "it maps the heads' features of 2B rows to (2B, num_classes) logits, "
      "with the heads' num_classes.")
  return mixing.split_views(losses.upcast(logits), views.groups)


def discriminator_logits(discriminators: Callable, views: Views, config: ObjectiveConfig,
                         pooling: str, num_heads: int) -> tuple[jax.Array, ...]:
  """Each head's discriminator logits (2B, 2) on its pooled [interpolated; mixup] features,
  read through the configured input (`discriminator_input`) and, when the variant trains the
  discriminators, through the gradient-reversal layer."""
  # Laid out like the network's rows, so each group's pooled features stay on its device.
  pool = lambda f: pooling_lib.pool(f, pooling)
  pooled = [mixing.stack_views(pool(i), pool(m), views.groups)
            for i, m in zip(views.interp_feats, views.mixup_feats)]
  if config.discriminator_input == "unit_pooled":
    pooled = [losses.unit_rows(p) for p in pooled]
  if config.trains_discriminators:
    pooled = [gradient_reversal(p, config.gradient_reversal_scale) for p in pooled]
  disc_logits = tuple(discriminators(pooled))
  if len(disc_logits) != num_heads:
    raise ValueError(f"discriminators returned {len(disc_logits)} arrays for {num_heads} heads; "
                     "it must map the H pooled arrays to H logit arrays (2B, 2).")
  for d, p in zip(disc_logits, pooled):
    objective_checks.check_head_output(
        "discriminators", d, (p.shape[0], 2),
        "each head's discriminator gives 2 logits (interpolated vs mixup) per row.")
  return disc_logits


def term_values(views: Views, teacher: tuple[jax.Array, jax.Array],
                disc_logits: tuple[jax.Array, ...], temperature: float
                ) -> dict[str, list[jax.Array]]:
  """Every term as a list of per-example (B,) arrays, one per head (`teacher` is the
  self-teacher's (t_hat, t_tilde)); a head pair's two directions of a mutual KL stay a tuple,
  so its batch means add in the reference's order."""
  teacher_interp, teacher_mixup = teacher
  interp_logits, mixup_logits = views.interp_logits, views.mixup_logits
  mix_ce = lambda z: losses.mixup_cross_entropy(z, views.labels, views.labels_b, views.lam)
  kl = lambda s, t: losses.temperature_kl(s, t, temperature)
  return {
      "clean_ce": [losses.cross_entropy(c, views.labels) for c in views.clean_logits],
      "mixup_ce": [mix_ce(m) for m in mixup_logits],
      "self_teacher_ce": [mix_ce(teacher_interp), mix_ce(teacher_mixup)],
      # The main head learns across views from the self-teacher ...
      "kl_self_teacher": [kl(interp_logits[-1], teacher_mixup),
                          kl(mixup_logits[-1], teacher_interp)],
      # ... the branch heads distil mutually between the two views.
      "kl_branches": [(kl(interp_logits[k], mixup_logits[k]),
                       kl(mixup_logits[k], interp_logits[k]))
                      for k in range(len(interp_logits) - 1)],
      "feature_mse": [losses.feature_mse(i, m)
                      for i, m in zip(views.interp_feats, views.mixup_feats)],
      "discriminator": [losses.discriminator_bce(*mixing.split_views(d, views.groups))
                        for d in disc_logits],
  }


def per_head_terms(outputs: ModelOutputs, labels: jax.Array, mix: MixParams, *,
                   self_teacher: Callable, discriminators: Callable, config: ObjectiveConfig,
                   pooling: str
                   ) -> tuple[dict[str, list[jax.Array]], dict[str, jax.Array] | None]:
  """Every term as a list of per-example (B,) arrays, one per head (see `term_values`).

  Also, when `config.kl_gate` is not "none", the per-example (B,) accuracies the gate
  compares (`kl_schedule.kl_gate_accuracies`), else None."""
  objective_checks.check_outputs(outputs, labels.shape[0])
  views = split_and_interpolate(outputs, labels, mix)

  # A head the variant keeps fixed gets no gradient into its parameters, whatever optimizer
  # the user writes; its inputs still pass the gradient on to the network.
  if not config.trains_self_teacher:
    self_teacher = trainable.frozen_function(self_teacher)
  if not config.trains_discriminators:
    discriminators = trainable.frozen_function(discriminators)

  teacher_interp, teacher_mixup = teacher_logits(self_teacher, views, outputs.logits[0].shape)
  disc_logits = discriminator_logits(discriminators, views, config, pooling, outputs.num_heads)

  accuracies = None
  if config.kl_gate != "none":
    accuracies = kl_schedule.kl_gate_accuracies(
        students=(views.interp_logits[-1], views.mixup_logits[-1]),
        teachers=(teacher_mixup, teacher_interp), labels=labels, labels_b=views.labels_b,
        lam=views.lam)
  return term_values(views, (teacher_interp, teacher_mixup), disc_logits,
                     config.temperature), accuracies
