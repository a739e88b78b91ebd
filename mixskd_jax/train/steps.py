"""Pure train and eval steps. Bind the keyword-only dependencies with functools.partial, then jit.

The step key is `fold_in(root_key, step)`, so a resumed run draws the same mixup as an
uninterrupted one. Images arrive as uint8 and are normalized here, on device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mixskd_jax.data import normalize
from mixskd_jax.method.methods import Method, StepInputs
from mixskd_jax.models.staged import MixSKDNetwork
from mixskd_jax.train.state import TrainState


def _images(model: nn.Module, images: jax.Array, mean, std) -> jax.Array:
  """uint8 -> normalized, in float32 or the model's wider dtype (float64 under x64), so the
  mixup of the images is computed at the model's precision."""
  dtype = jnp.promote_types(jnp.float32, getattr(model, "dtype", jnp.float32))
  return normalize(images, mean, std).astype(dtype)


def head_names(num_heads: int) -> list[str]:
  """branch1, ..., branch{H-1}, backbone (the head used at inference)."""
  return [f"branch{k + 1}" for k in range(num_heads - 1)] + ["backbone"]


def train_step(state: TrainState, batch: dict, root_key: jax.Array, *, model: nn.Module,
               method: Method, tx: optax.GradientTransformation,
               schedule: Callable[[jax.Array], jax.Array], mean: Sequence[float],
               std: Sequence[float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch {'image': uint8 (B, H, W, C), 'label': (B,)}.

  Returns:
    (new state, metrics): every term of the method under `train/<term>`, the clean-half
    accuracy of each head, and the learning rate used.
  """
  labels = batch["label"]
  pairs = batch.get("pair_image")
  inputs = StepInputs(
      images=_images(model, batch["image"], mean, std), labels=labels,
      key=jax.random.fold_in(root_key, state.step), step=state.step, batch=batch,
      pair_images=None if pairs is None else _images(model, pairs, mean, std),
      method_state=state.method_state)

  def loss_fn(params):
    return method.loss(model, {"params": params, "batch_stats": state.batch_stats}, inputs)

  (_, (terms, outputs, batch_stats, method_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {f"train/{name}": value for name, value in terms.items()}
  # Methods return the logits of the clean rows (B, C) per head.
  for name, logits in zip(head_names(len(outputs.logits)), outputs.logits):
    metrics[f"train/accuracy/{name}"] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics["train/learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, method_state=method_state)
  return new_state, metrics


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  k = min(k, logits.shape[-1])
  return jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)


def calibration_sums(logits: jax.Array, labels: jax.Array, weight: jax.Array,
                     num_bins: int) -> dict[str, jax.Array]:
  """Per confidence bin (equal widths over [0, 1]): example count, summed confidence (max
  softmax probability) and correct count. (N, C), (N,), (N,) -> three (num_bins,) arrays."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  # Bin b holds confidences in (b / n, (b + 1) / n]; confidence >= 1/C > 0 always.
  bins = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  one_hot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * weight[:, None]
  return {"calibration/count": jnp.sum(one_hot, axis=0),
          "calibration/confidence": confidence @ one_hot,
          "calibration/correct": correct @ one_hot}


def expected_calibration_error(count, confidence, correct) -> float:
  """ECE in %: sum over bins of |accuracy - mean confidence| weighted by the bin's share."""
  count, confidence, correct = (np.asarray(a, np.float64) for a in (count, confidence, correct))
  return 100.0 * float(np.sum(np.abs(correct - confidence)) / max(np.sum(count), 1.0))


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, mean: Sequence[float],
              std: Sequence[float], calibration_bins: int = 15) -> dict[str, jax.Array]:
  """Sums over the real (mask True) examples of a padded eval batch.

  Returns:
    `count`, the backbone head's `loss_sum`, per head (and for a MixSKD model the
    self-teacher reading the clean features) `top1/<head>` and `top5/<head>` correct counts,
    and the backbone head's `calibration/*` bin sums (see `calibration_sums`).
  """
  images = _images(model, batch["image"], mean, std)
  labels, mask = batch["label"], batch["mask"]

  def forward(module, images):
    outputs = module(images, train=False)
    teacher = module.teach(outputs.features) if isinstance(module, MixSKDNetwork) else None
    return outputs, teacher

  outputs, teacher = model.apply(state.variables, images, method=forward)
  heads = dict(zip(head_names(len(outputs.logits)), outputs.logits))
  if teacher is not None:
    heads["self_teacher"] = teacher
  weight = mask.astype(jnp.float32)
  sums = {"count": jnp.sum(weight)}
  for name, logits in heads.items():
    logits = logits.astype(jnp.float32)
    sums[f"top1/{name}"] = jnp.sum(weight * (jnp.argmax(logits, -1) == labels))
    sums[f"top5/{name}"] = jnp.sum(weight * _topk_correct(logits, labels, 5))
  ce = optax.softmax_cross_entropy_with_integer_labels(heads["backbone"].astype(jnp.float32),
                                                       labels)
  sums["loss_sum"] = jnp.sum(weight * ce)
  sums.update(calibration_sums(heads["backbone"], labels, weight, calibration_bins))
  return sums


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """Host side: sums -> accuracies in %, the backbone headline, its expected calibration
  error in %, and the reference's "max over heads" protocol (max of the per-head top-1,
  self-teacher excluded)."""
  count = float(sums["count"])
  out = {"eval/count": count, "eval/loss": float(sums["loss_sum"]) / count}
  if "calibration/count" in sums:
    out["eval/ece/backbone"] = expected_calibration_error(
        sums["calibration/count"], sums["calibration/confidence"], sums["calibration/correct"])
  for key, value in sums.items():
    if key.startswith("top"):
      out[f"eval/{key}"] = 100.0 * float(value) / count
  head_top1 = [v for k, v in out.items() if k.startswith("eval/top1/") and
               not k.endswith("self_teacher")]
  out["eval/top1_max_over_heads_reference_protocol"] = max(head_top1)
  return out
