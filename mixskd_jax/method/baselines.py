"""Pure pieces of the baselines MixSKD is compared with (spec §7), as Self-KD-Lib defines them.

* label smoothing: target 1 - eps, every other class eps / (C - 1);
* CutMix: one Beta(alpha, alpha) box per batch, lam recomputed from the clipped box's area;
* CS-KD: KL from a same-class partner's (no-gradient) prediction;
* PS-KD: soft targets (1 - a_t) one-hot + a_t * last epoch's prediction of the same example;
* BYOT: CE on every head, KL of each branch to the main head, MSE of each branch's final
  feature map to the main one (teacher sides without gradient).

Every loss here returns one value per example, computed in at least float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from mixskd_jax.method import losses


def smoothed_targets(labels: jax.Array, num_classes: int, epsilon: float) -> jax.Array:
  """(N,) labels -> (N, C) targets: 1 - eps on the label, eps / (C - 1) on every other class.

  Self-KD-Lib's convention; optax.smooth_labels spreads eps over all C classes instead.
  """
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (1.0 - epsilon) + (1.0 - one_hot) * (epsilon / (num_classes - 1))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-sum_c targets * log_softmax(logits): (N, C), (N, C) -> (N,)."""
  return optax.softmax_cross_entropy(losses.upcast(logits), losses.upcast(targets))


def label_smoothing_cross_entropy(logits: jax.Array, labels: jax.Array,
                                  epsilon: float) -> jax.Array:
  """(N, C) logits, (N,) labels -> (N,) cross-entropy against `smoothed_targets`."""
  return soft_cross_entropy(logits, smoothed_targets(labels, logits.shape[-1], epsilon))


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """The CutMix box for a drawn `lam`: sides sqrt(1 - lam) * (H, W), centre uniform, clipped.

  Returns:
    inside: (H, W) bool, True where the partner image is pasted.
    lam: the first image's actual share of the area, 1 - box area / (H * W).
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut), jnp.floor(width * cut)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height).astype(jnp.float32)
  cx = jax.random.randint(key_x, (), 0, width).astype(jnp.float32)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  area = (y1 - y0) * (x1 - x0)
  return inside, 1.0 - area / (height * width)


def cutmix_images(images: jax.Array, partners: jax.Array, inside: jax.Array) -> jax.Array:
  """Pastes the box of `partners` into `images`: (N, H, W, C), (N, H, W, C), (H, W)."""
  return jnp.where(inside[None, :, :, None], partners, images)


def ps_kd_targets(labels: jax.Array, previous: jax.Array, alpha_t: jax.Array) -> jax.Array:
  """(1 - alpha_t) * one-hot + alpha_t * previous, where a row never predicted (all zeros,
  e.g. during the first epoch) counts as its one-hot label.

  Args:
    labels: (N,) integer labels.
    previous: (N, C) the examples' softmax predictions from the previous epoch, or zeros.
    alpha_t: scalar, the epoch's weight of the previous prediction.

  Returns:
    (N, C) soft targets; each row sums to 1.
  """
  one_hot = jax.nn.one_hot(labels, previous.shape[-1], dtype=jnp.float32)
  seen = jnp.sum(previous, axis=-1, keepdims=True) > 0
  previous = jnp.where(seen, previous.astype(jnp.float32), one_hot)
  return (1.0 - alpha_t) * one_hot + alpha_t * jax.lax.stop_gradient(previous)


def ps_kd_alpha(epoch: jax.Array, num_epochs: int, alpha_final: float) -> jax.Array:
  """alpha_t = alpha_T * (epoch + 1) / epochs, epoch counted from 0."""
  return alpha_final * (epoch.astype(jnp.float32) + 1.0) / num_epochs


def byot_terms(logits: Sequence[jax.Array], features: Sequence[jax.Array], labels: jax.Array,
               temperature: float) -> dict[str, jax.Array]:
  """BYOT's per-example terms for heads ordered branch 1 .. branch H-1, main.

  Args:
    logits: H arrays (N, C).
    features: H final feature maps (N, h, w, c) of equal shape.
    labels: (N,) integer labels.
    temperature: KD temperature of the branch-to-main KL.

  Returns:
    'cross_entropy': sum of the H heads' CE; 'kl': sum over branches of
    T^2 KL(main / T || branch / T) with the main head as teacher; 'feature_mse': sum over
    branches of the MSE to the main feature map (main side without gradient). Each (N,).
  """
  *branch_logits, main_logits = logits
  *branch_features, main_features = features
  zero = jnp.zeros(labels.shape, jnp.float32)
  ce = sum((losses.cross_entropy(z, labels) for z in logits), zero)
  kl = sum((losses.temperature_kl(z, main_logits, temperature) for z in branch_logits), zero)
  mse = sum((losses.feature_mse(f, jax.lax.stop_gradient(main_features))
             for f in branch_features), zero)
  return {"cross_entropy": ce, "kl": kl, "feature_mse": mse}
