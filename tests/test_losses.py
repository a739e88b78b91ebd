"""Tests of mixskd_jax.method.losses against float64 numpy references of spec section B.3.

Every loss is per-example and float32 inside; batch means are compared with the PyTorch
calls the reference uses (kl_div batchmean * T^2, BCEWithLogits mean) where torch exists.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax.method import losses

RTOL = 1e-5
ATOL = 1e-6


# ---------------------------------------------------------------------------
# Independent float64 numpy references (spec B.3)
# ---------------------------------------------------------------------------


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _np_cross_entropy(logits, labels):
  logp = _np_log_softmax(logits)
  return -logp[np.arange(len(labels)), np.asarray(labels)]


def _np_mixup_cross_entropy(logits, labels_a, labels_b, lam):
  return (lam * _np_cross_entropy(logits, labels_a)
          + (1.0 - lam) * _np_cross_entropy(logits, labels_b))


def _np_temperature_kl(s, t, temperature):
  log_ps = _np_log_softmax(np.asarray(s, np.float64) / temperature)
  log_pt = _np_log_softmax(np.asarray(t, np.float64) / temperature)
  pt = np.exp(log_pt)
  # xlogy convention: p * log p = 0 where p = 0.
  terms = np.where(pt > 0, pt * (log_pt - log_ps), 0.0)
  return temperature ** 2 * terms.sum(axis=-1)


def _np_feature_mse(a, b):
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return (d ** 2).reshape(d.shape[0], -1).mean(axis=-1)


def _np_bce_with_logits(x, target):
  x = np.asarray(x, np.float64)
  # -[t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))], written stably.
  return np.maximum(x, 0.0) - x * target + np.log1p(np.exp(-np.abs(x)))


def _np_discriminator_bce(interp, mixup):
  t_interp = np.tile([1.0, 0.0], (interp.shape[0], 1))
  t_mixup = np.tile([0.0, 1.0], (mixup.shape[0], 1))
  # Per example: the mean of its interpolated and its mixup row's two columns.
  return (_np_bce_with_logits(interp, t_interp).mean(-1)
          + _np_bce_with_logits(mixup, t_mixup).mean(-1)) / 2


# ---------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------


def _logits(seed, n=6, c=10, scale=3.0):
  return (np.random.default_rng(seed).standard_normal((n, c)) * scale).astype(np.float32)


def _labels(seed, n=6, c=10):
  return np.random.default_rng(seed).integers(0, c, size=n).astype(np.int32)


def _maybe_jit(fn, jit, static_argnums=()):
  return jax.jit(fn, static_argnums=static_argnums) if jit else fn


# ---------------------------------------------------------------------------
# Each loss against its numpy reference, plain and jitted
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_cross_entropy_matches_numpy(jit):
  """Per-example CE is logsumexp(z) - z[y]."""
  z, y = _logits(0), _labels(1)
  got = _maybe_jit(losses.cross_entropy, jit)(z, y)
  assert got.shape == (6,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_cross_entropy(z, y), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_mixup_cross_entropy_matches_numpy(jit, lam):
  """lam * CE(y_a) + (1 - lam) * CE(y_b), lam given as a traced scalar under jit."""
  z, ya, yb = _logits(2), _labels(3), _labels(4)
  got = _maybe_jit(losses.mixup_cross_entropy, jit)(z, ya, yb, jnp.float32(lam))
  assert got.shape == (6,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_mixup_cross_entropy(z, ya, yb, lam),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_temperature_kl_matches_numpy(jit, temperature):
  """T^2 * sum_c p_t (log p_t - log p_s) with softened softmaxes."""
  s, t = _logits(5), _logits(6)
  fn = _maybe_jit(losses.temperature_kl, jit, static_argnums=(2,))
  got = fn(s, t, temperature)
  assert got.shape == (6,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_temperature_kl(s, t, temperature),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit", [False, True])
def test_feature_mse_matches_numpy(jit):
  """Per-example mean over every non-batch element of (a - b)^2, NHWC maps."""
  rng = np.random.default_rng(7)
  a = rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
  b = rng.standard_normal((3, 4, 4, 5)).astype(np.float32)
  got = _maybe_jit(losses.feature_mse, jit)(a, b)
  assert got.shape == (3,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_feature_mse(a, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("jit", [False, True])
def test_discriminator_bce_matches_numpy(jit):
  """Interpolated rows target [1, 0], mixup rows [0, 1], mean over the two columns."""
  rng = np.random.default_rng(8)
  interp = (rng.standard_normal((4, 2)) * 3).astype(np.float32)
  mixup = (rng.standard_normal((4, 2)) * 3).astype(np.float32)
  got = _maybe_jit(losses.discriminator_bce, jit)(interp, mixup)
  assert got.shape == (4,)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_discriminator_bce(interp, mixup),
                             rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# temperature_kl: PyTorch equivalence and gradient flow
# ---------------------------------------------------------------------------


def test_temperature_kl_batch_mean_matches_torch_kl_div():
  """Batch mean is F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  s, t, temperature = _logits(9), _logits(10), 3.0
  want = F.kl_div(F.log_softmax(torch.from_numpy(s).double() / temperature, 1),
                  F.softmax(torch.from_numpy(t).double() / temperature, 1),
                  reduction="batchmean") * temperature * temperature
  got = jnp.mean(losses.temperature_kl(s, t, temperature))
  np.testing.assert_allclose(float(got), float(want), rtol=RTOL)


def test_temperature_kl_zero_when_student_equals_teacher():
  """KL(p || p) = 0 for every example."""
  z = _logits(11)
  np.testing.assert_allclose(np.asarray(losses.temperature_kl(z, z, 3.0)), 0.0, atol=1e-5)


def test_temperature_kl_gradient_only_into_student():
  """Teacher side is stop-gradient; the student gradient is T * (p_s - p_t) / N."""
  s, t, temperature = _logits(12), _logits(13), 3.0

  def mean_kl(s, t):
    return jnp.mean(losses.temperature_kl(s, t, temperature))

  g_s, g_t = jax.grad(mean_kl, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(g_t), 0.0)
  assert np.abs(np.asarray(g_s)).max() > 1e-3
  p_s = np.exp(_np_log_softmax(s / temperature))
  p_t = np.exp(_np_log_softmax(t / temperature))
  want = temperature * (p_s - p_t) / s.shape[0]
  np.testing.assert_allclose(np.asarray(g_s), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# feature_mse: reduction and mutual gradient
# ---------------------------------------------------------------------------


def test_feature_mse_batch_mean_is_mean_over_all_elements():
  """Batch mean equals F.mse_loss (mean over every element), since examples are equal-sized."""
  rng = np.random.default_rng(14)
  a = rng.standard_normal((4, 2, 3, 5)).astype(np.float32)
  b = rng.standard_normal((4, 2, 3, 5)).astype(np.float32)
  want = np.mean((a.astype(np.float64) - b) ** 2)
  np.testing.assert_allclose(float(jnp.mean(losses.feature_mse(a, b))), want, rtol=RTOL)


def test_feature_mse_gradient_into_both_sides_equal_and_opposite():
  """No stop-gradient: d/da = -d/db = 2 (a - b) / (number of elements)."""
  rng = np.random.default_rng(15)
  a = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  b = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)

  def mean_mse(a, b):
    return jnp.mean(losses.feature_mse(a, b))

  g_a, g_b = jax.grad(mean_mse, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
  assert np.abs(np.asarray(g_a)).max() > 1e-3
  assert np.abs(np.asarray(g_b)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(g_a), -np.asarray(g_b), rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(g_a), 2.0 * (a.astype(np.float64) - b) / a.size,
                             rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------
# discriminator_bce: PyTorch equivalence and hand-computed values
# ---------------------------------------------------------------------------


def test_discriminator_bce_mean_matches_torch():
  """Mean equals BCEWithLogits on the (2N, 2) stack with targets [1,0]xN ++ [0,1]xN."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  rng = np.random.default_rng(16)
  interp = (rng.standard_normal((5, 2)) * 2).astype(np.float32)
  mixup = (rng.standard_normal((5, 2)) * 2).astype(np.float32)
  logits = torch.from_numpy(np.concatenate([interp, mixup])).double()
  targets = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(5, 1),
                       torch.tensor([[0.0, 1.0]]).repeat(5, 1)]).double()
  want = F.binary_cross_entropy_with_logits(logits, targets)
  got = jnp.mean(losses.discriminator_bce(interp, mixup))
  np.testing.assert_allclose(float(got), float(want), rtol=RTOL)


def test_discriminator_bce_zero_logits_is_log2():
  """sigmoid(0) = 1/2 on every column, so every row costs log 2."""
  got = losses.discriminator_bce(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
  np.testing.assert_allclose(np.asarray(got), math.log(2.0), rtol=1e-6)


def test_discriminator_bce_hand_computed_example():
  """One example: interpolated row [2, -1] (target [1, 0]), mixup row [0, 3] (target [0, 1])."""
  def softplus(v):
    return math.log1p(math.exp(v))
  got = losses.discriminator_bce(jnp.array([[2.0, -1.0]]), jnp.array([[0.0, 3.0]]))
  want = [(softplus(-2.0) + softplus(-1.0)      # -log sig(2), -log(1 - sig(-1))
           + math.log(2.0) + softplus(-3.0)) / 4]  # -log(1 - sig(0)), -log sig(3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


# ---------------------------------------------------------------------------
# float32 inside
# ---------------------------------------------------------------------------


def _bf16_cases():
  rng = np.random.default_rng(17)
  z = _logits(18)
  t = _logits(19)
  fa = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  fb = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  da = (rng.standard_normal((3, 2)) * 2).astype(np.float32)
  db = (rng.standard_normal((3, 2)) * 2).astype(np.float32)
  y, y2 = _labels(20), _labels(21)
  return {
      "cross_entropy": (lambda c: losses.cross_entropy(c(z), y)),
      "mixup_cross_entropy": (lambda c: losses.mixup_cross_entropy(c(z), y, y2, 0.3)),
      "temperature_kl": (lambda c: losses.temperature_kl(c(z), c(t), 3.0)),
      "feature_mse": (lambda c: losses.feature_mse(c(fa), c(fb))),
      "discriminator_bce": (lambda c: losses.discriminator_bce(c(da), c(db))),
  }


@pytest.mark.parametrize("name", sorted(_bf16_cases()))
def test_bfloat16_inputs_give_float32_outputs(name):
  """bfloat16 in -> float32 out, equal to the float32 computation on the same (rounded) values."""
  call = _bf16_cases()[name]
  got = call(lambda x: jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.float32
  # Same values, upcast before the call: a bfloat16 computation inside would be ~1e-2 off.
  want = call(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # And close to the unrounded float32 inputs, within bfloat16 input rounding.
  full = call(jnp.asarray)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------
# mixup_cross_entropy in lam
# ---------------------------------------------------------------------------


def test_mixup_cross_entropy_lam_one_is_cross_entropy_of_labels_a():
  """lam = 1 keeps only the first image's labels."""
  z, ya, yb = _logits(22), _labels(23), _labels(24)
  np.testing.assert_allclose(np.asarray(losses.mixup_cross_entropy(z, ya, yb, 1.0)),
                             np.asarray(losses.cross_entropy(z, ya)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(losses.mixup_cross_entropy(z, ya, yb, 0.0)),
                             np.asarray(losses.cross_entropy(z, yb)), rtol=1e-6)


def test_mixup_cross_entropy_is_linear_in_lam():
  """f(lam) = f(0) + lam * (f(1) - f(0)) for several lam."""
  z, ya, yb = _logits(25), _labels(26), _labels(27)
  f0 = np.asarray(losses.mixup_cross_entropy(z, ya, yb, 0.0), np.float64)
  f1 = np.asarray(losses.mixup_cross_entropy(z, ya, yb, 1.0), np.float64)
  assert np.abs(f1 - f0).max() > 1e-2  # the two label sets really differ
  for lam in (0.1, 0.5, 0.83):
    got = np.asarray(losses.mixup_cross_entropy(z, ya, yb, lam))
    np.testing.assert_allclose(got, f0 + lam * (f1 - f0), rtol=1e-5, atol=1e-6)
