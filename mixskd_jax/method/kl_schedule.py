"""When MixSKD's distillation KL terms act (research options, off in every reference variant):
a linear warm-up of their weights over the first epochs, and the self-teacher's KL gated on
whether the teacher currently out-predicts the backbone head it distils into.

Pure functions; `objective.mixskd_loss` applies them through its `term_scales` and
`ObjectiveConfig.kl_gate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixskd_jax.method import losses


def kl_warmup_scale(step: jax.Array, *, steps_per_epoch: int,
                    warmup_epochs: float) -> jax.Array:
  """The distillation KL terms' weight factor at `step`: a linear ramp over fractional epochs,
  min(1, (step / steps_per_epoch) / warmup_epochs), so 0 at step 0 and 1 from `warmup_epochs`
  epochs on. Float32 (); pass it as `mixskd_loss(..., term_scales={t: s for t in KL_TERMS})`.
  """
  if not warmup_epochs > 0 or steps_per_epoch < 1:
    raise ValueError(f"kl_warmup_scale needs warmup_epochs > 0 and steps_per_epoch >= 1, got "
                     f"{warmup_epochs} and {steps_per_epoch}; a warm-up of 0 is no ramp.")
  steps = jnp.float32(steps_per_epoch * warmup_epochs)
  return jnp.minimum(jnp.float32(1.0), jnp.asarray(step, jnp.float32) / steps)


def mixup_accuracy(logits: jax.Array, labels_a: jax.Array, labels_b: jax.Array,
                   lam: jax.Array) -> jax.Array:
  """(N,) top-1 accuracy against a mixup target, credited as the mixup CE weighs its labels:
  lam * [argmax = y_a] + (1 - lam) * [argmax = y_b] (1 or 0 when y_a = y_b)."""
  pred = jnp.argmax(logits, axis=-1)
  lam = losses.upcast(lam)
  return lam * (pred == labels_a) + (1.0 - lam) * (pred == labels_b)


def kl_gate_accuracies(*, students, teachers, labels, labels_b, lam) -> dict[str, jax.Array]:
  """The per-example accuracies the KL gate compares, on exactly the rows kl_self_teacher
  pairs: its students (the backbone head's interpolated and mixup logits) and its teachers
  (the self-teacher on the mixup and on the interpolated features). All four predict the same
  mixup target lam * y_a + (1 - lam) * y_b; each side's accuracy is the mean over its two
  views of `mixup_accuracy`. No gradient."""
  acc = lambda zs: 0.5 * sum(mixup_accuracy(z, labels, labels_b, lam) for z in zs)
  return jax.lax.stop_gradient({"teacher": acc(teachers), "backbone": acc(students)})


def gate_logs(teacher_accuracy: jax.Array, backbone_accuracy: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The gate (1.0 when the self-teacher's accuracy strictly exceeds the backbone's, else 0.0;
  a tie closes it) and what it logs."""
  gate = (teacher_accuracy > backbone_accuracy).astype(jnp.float32)
  return gate, {"kl_gate_open": gate, "kl_gate/teacher_accuracy": teacher_accuracy,
                "kl_gate/backbone_accuracy": backbone_accuracy}
