"""Pure loss functions of MixSKD, one number per example, at least float32 inside.

Each function takes arrays and returns per-example values; the objective takes the batch
mean. No configuration is read here: weights and temperatures are arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def upcast(x: jax.Array) -> jax.Array:
  """Upcasts bfloat16/float16 to float32; float64 (under x64) stays float64."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy with integer labels.

  Args:
    logits: (N, C) unnormalized scores.
    labels: (N,) integer class ids.

  Returns:
    (N,) per-example cross-entropy; the batch mean is PyTorch's `F.cross_entropy`.
  """
  return optax.softmax_cross_entropy_with_integer_labels(upcast(logits), labels)


def mixup_cross_entropy(logits: jax.Array, labels_a: jax.Array, labels_b: jax.Array,
                        lam: jax.Array | float) -> jax.Array:
  """Cross-entropy against a mixup pair of labels: lam * CE(y_a) + (1 - lam) * CE(y_b).

  Args:
    logits: (N, C).
    labels_a: (N,) labels of the first image of each pair.
    labels_b: (N,) labels of the second image (usually `labels_a[perm]`).
    lam: scalar mixing weight of the first image.

  Returns:
    (N,) per-example mixed cross-entropy.
  """
  lam = upcast(lam)
  return lam * cross_entropy(logits, labels_a) + (1.0 - lam) * cross_entropy(logits, labels_b)


def temperature_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                   temperature: float) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), teacher side stop-gradient.

  The batch mean equals PyTorch's
  `kl_div(log_softmax(s / T), softmax(t / T), reduction='batchmean') * T**2`.

  Args:
    student_logits: (N, C) logits that receive the gradient.
    teacher_logits: (N, C) logits of the teacher; no gradient flows into them.
    temperature: softening temperature T > 0.

  Returns:
    (N,) per-example scaled KL divergence.
  """
  t = float(temperature)
  log_student = jax.nn.log_softmax(upcast(student_logits) / t, axis=-1)
  log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(upcast(teacher_logits)) / t, axis=-1)
  return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher) * (t * t)


def feature_mse(features_a: jax.Array, features_b: jax.Array) -> jax.Array:
  """Mean squared difference of two feature maps, gradients into both sides.

  Args:
    features_a: (N, ...) e.g. (N, H, W, C).
    features_b: same shape as `features_a`.

  Returns:
    (N,) per-example mean over all non-batch elements. Its batch mean is PyTorch's
    `F.mse_loss(a, b)` (mean over every element) since every example has the same size.
  """
  err = optax.squared_error(upcast(features_a), upcast(features_b))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def unit_rows(x: jax.Array) -> jax.Array:
  """(N, c) -> (N, c): each row divided by its L2 norm (an all-zero row stays zero).

  Float32 whatever the input dtype; the gradient at a zero row is zero, not NaN.
  """
  x = upcast(x)
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = squared > 0
  # The double `where` keeps rsqrt's infinite derivative at 0 out of the backward pass.
  return jnp.where(positive, x * jax.lax.rsqrt(jnp.where(positive, squared, 1.0)), 0.0)


def discriminator_bce(interpolated_logits: jax.Array, mixup_logits: jax.Array) -> jax.Array:
  """Binary cross-entropy of a two-output discriminator with the reference's one-hot targets.

  Interpolated rows have target [1, 0] and mixup rows [0, 1]; each of the two columns is
  an independent sigmoid (PyTorch `BCEWithLogitsLoss` on a (2N, 2) float target).

  Args:
    interpolated_logits: (N, 2) discriminator outputs on interpolated features.
    mixup_logits: (N, 2) discriminator outputs on features of the mixed images.

  Returns:
    (N,) per example: the mean of its interpolated row's and its mixup row's four entries.
    Its mean is the reference's mean over all 2N x 2 entries. Computed per example, without
    joining the two views' rows, so that rows sharded over devices stay where they are.
  """
  targets = jnp.array([1.0, 0.0], jnp.float32)
  interp = optax.sigmoid_binary_cross_entropy(upcast(interpolated_logits), targets)
  mixup = optax.sigmoid_binary_cross_entropy(upcast(mixup_logits), 1.0 - targets)
  return 0.5 * (jnp.mean(interp, axis=-1) + jnp.mean(mixup, axis=-1))
