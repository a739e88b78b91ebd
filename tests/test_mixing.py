"""Tests of mixskd_jax.method.mixing: lam / permutation sampling and mixing of pytrees (spec B.1).

The mix is checked against numpy's lam * x + (1 - lam) * x[perm]; the per-shard pairing
against the single-shard mix applied block by block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax.method import mixing
from mixskd_jax.method.mixing import MixParams


# ---------------------------------------------------------------------------
# sample_lambda
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.4, 1.0])
def test_sample_lambda_is_beta_alpha_alpha(alpha):
  """Over many keys: lam in [0, 1], mean 1/2 and variance 1 / (4 (2 alpha + 1))."""
  keys = jax.random.split(jax.random.key(0), 4000)
  lams = np.asarray(jax.vmap(lambda k: mixing.sample_lambda(k, alpha))(keys), np.float64)
  assert lams.shape == (4000,)
  assert lams.min() >= 0.0 and lams.max() <= 1.0
  # Std of the mean is at most 0.5 / sqrt(4000) ~ 0.008; 0.04 is > 5 sigma.
  assert abs(lams.mean() - 0.5) < 0.04
  # Tells Beta(alpha, alpha) from e.g. uniform (var 1/12) or Beta(2 alpha, 2 alpha).
  want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0))
  assert abs(lams.var() - want_var) < 0.2 * want_var


def test_sample_lambda_dtype_and_shape():
  """One float32 scalar per batch."""
  lam = mixing.sample_lambda(jax.random.key(1), 0.4)
  assert lam.shape == ()
  assert lam.dtype == jnp.float32


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_sample_lambda_non_positive_alpha_is_exactly_one(alpha):
  """alpha <= 0 disables mixing: lam = 1 for every key."""
  for seed in range(3):
    lam = mixing.sample_lambda(jax.random.key(seed), alpha)
    assert lam.dtype == jnp.float32
    assert float(lam) == 1.0


def test_sample_lambda_deterministic_per_key():
  """Same key, same draw; different keys, different draws."""
  k1, k2 = jax.random.key(3), jax.random.key(4)
  assert float(mixing.sample_lambda(k1, 0.4)) == float(mixing.sample_lambda(k1, 0.4))
  assert float(mixing.sample_lambda(k1, 0.4)) != float(mixing.sample_lambda(k2, 0.4))


# ---------------------------------------------------------------------------
# sample_mix
# ---------------------------------------------------------------------------


def test_sample_mix_single_shard_is_a_permutation():
  """num_groups = 1: perm is (B,) int32 and a permutation of arange(B)."""
  params = mixing.sample_mix(jax.random.key(5), 16, 0.4)
  perm = np.asarray(params.perm)
  assert perm.shape == (16,)
  assert params.perm.dtype == jnp.int32
  np.testing.assert_array_equal(np.sort(perm), np.arange(16))
  assert params.lam.shape == () and 0.0 <= float(params.lam) <= 1.0
  assert params.batch_size == 16


def test_sample_mix_per_shard_rows_are_permutations():
  """num_groups = S: perm is (S, B // S), each row a permutation of arange(B // S)."""
  params = mixing.sample_mix(jax.random.key(6), 32, 0.4, num_groups=4)
  perm = np.asarray(params.perm)
  assert perm.shape == (4, 8)
  assert params.perm.dtype == jnp.int32
  for row in perm:
    np.testing.assert_array_equal(np.sort(row), np.arange(8))
  # Independent keys per shard: the rows are not all the same permutation.
  assert len({tuple(row) for row in perm}) > 1
  assert params.batch_size == 32


def test_sample_mix_deterministic_per_key():
  """Same key gives the same (lam, perm); a different key a different perm."""
  a = mixing.sample_mix(jax.random.key(7), 64, 0.4)
  b = mixing.sample_mix(jax.random.key(7), 64, 0.4)
  c = mixing.sample_mix(jax.random.key(8), 64, 0.4)
  assert float(a.lam) == float(b.lam)
  np.testing.assert_array_equal(np.asarray(a.perm), np.asarray(b.perm))
  assert not np.array_equal(np.asarray(a.perm), np.asarray(c.perm))


def test_sample_mix_alpha_zero_gives_lam_one():
  """alpha = 0 in sample_mix also switches mixing off."""
  assert float(mixing.sample_mix(jax.random.key(9), 8, 0.0).lam) == 1.0


@pytest.mark.parametrize("batch_size,num_groups", [(10, 4), (8, 3), (8, 0)])
def test_sample_mix_indivisible_batch_raises(batch_size, num_groups):
  """A batch that does not split into the shards is a clear ValueError naming num_groups."""
  with pytest.raises(ValueError, match="num_groups"):
    mixing.sample_mix(jax.random.key(10), batch_size, 0.4, num_groups=num_groups)


# ---------------------------------------------------------------------------
# global_permutation and permute
# ---------------------------------------------------------------------------


def test_global_permutation_stays_inside_shards():
  """Per-shard perm -> a global permutation; element s*P + i maps to s*P + perm[s, i]."""
  perm = mixing.sample_mix(jax.random.key(11), 24, 0.4, num_groups=3).perm
  g = np.asarray(mixing.global_permutation(perm))
  p = np.asarray(perm)
  assert g.shape == (24,)
  np.testing.assert_array_equal(np.sort(g), np.arange(24))
  np.testing.assert_array_equal(g // 8, np.arange(24) // 8)
  want = np.concatenate([s * 8 + p[s] for s in range(3)])
  np.testing.assert_array_equal(g, want)


def test_global_permutation_of_global_perm_is_identity():
  """A (B,) permutation is already global."""
  perm = jnp.array([2, 0, 3, 1], jnp.int32)
  np.testing.assert_array_equal(np.asarray(mixing.global_permutation(perm)), [2, 0, 3, 1])


def test_permute_matches_numpy_indexing():
  """permute(x, perm) is x[perm] globally and x[global_permutation(perm)] per shard."""
  x = np.random.default_rng(12).standard_normal((12, 3)).astype(np.float32)
  perm1 = np.array([5, 3, 0, 11, 1, 2, 10, 4, 9, 8, 7, 6], np.int32)
  np.testing.assert_array_equal(np.asarray(mixing.permute(jnp.asarray(x), jnp.asarray(perm1))),
                                x[perm1])
  perm3 = np.array([[2, 0, 3, 1], [1, 0, 2, 3], [3, 2, 1, 0]], np.int32)
  g = np.concatenate([s * 4 + perm3[s] for s in range(3)])
  np.testing.assert_array_equal(np.asarray(mixing.permute(jnp.asarray(x), jnp.asarray(perm3))),
                                x[g])


# ---------------------------------------------------------------------------
# mix
# ---------------------------------------------------------------------------


def _tree(seed, b=8, k=5):
  rng = np.random.default_rng(seed)
  return {
      "images": rng.standard_normal((b, 4, 4, 3)).astype(np.float32),
      "labels": np.eye(k, dtype=np.float32)[rng.integers(0, k, size=b)],
      "logits": (rng.standard_normal((b, k)) * 2).astype(np.float32),
  }


def _np_mix(tree, lam, gperm):
  return {name: lam * x.astype(np.float64) + (1 - lam) * x.astype(np.float64)[gperm]
          for name, x in tree.items()}


def _params(lam, perm):
  return MixParams(lam=jnp.float32(lam), perm=jnp.asarray(perm, jnp.int32))


_PERM8 = np.array([3, 7, 0, 1, 6, 2, 5, 4], np.int32)
_PERM8_SHARDED = np.array([[1, 0, 3, 2], [2, 3, 0, 1]], np.int32)


@pytest.mark.parametrize("jit", [False, True])
def test_mix_matches_numpy_on_a_pytree(jit):
  """Images, one-hot labels and logits all become lam * x + (1 - lam) * x[perm]."""
  tree, lam = _tree(13), 0.3
  fn = jax.jit(mixing.mix) if jit else mixing.mix
  got = fn(jax.tree_util.tree_map(jnp.asarray, tree), _params(lam, _PERM8))
  want = _np_mix(tree, lam, _PERM8)
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == tree[name].shape
    assert got[name].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-6)
  # One-hot labels become soft labels that still sum to one.
  np.testing.assert_allclose(np.asarray(got["labels"]).sum(-1), 1.0, rtol=1e-6)


def test_mix_endpoints():
  """lam = 1 leaves the batch unchanged; lam = 0 gives the permuted batch."""
  tree = jax.tree_util.tree_map(jnp.asarray, _tree(14))
  same = mixing.mix(tree, _params(1.0, _PERM8))
  swapped = mixing.mix(tree, _params(0.0, _PERM8))
  for name in tree:
    np.testing.assert_array_equal(np.asarray(same[name]), np.asarray(tree[name]))
    np.testing.assert_array_equal(np.asarray(swapped[name]), np.asarray(tree[name])[_PERM8])


def test_mix_is_linear():
  """mix(a x + b y) == a mix(x) + b mix(y) for a fixed (lam, perm)."""
  x = jax.tree_util.tree_map(jnp.asarray, _tree(15))
  y = jax.tree_util.tree_map(jnp.asarray, _tree(16))
  a, b = 0.7, -1.3
  params = _params(0.42, _PERM8)
  lhs = mixing.mix(jax.tree_util.tree_map(lambda u, v: a * u + b * v, x, y), params)
  mx, my = mixing.mix(x, params), mixing.mix(y, params)
  for name in x:
    np.testing.assert_allclose(np.asarray(lhs[name]),
                               a * np.asarray(mx[name]) + b * np.asarray(my[name]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8])
def test_mix_rejects_integer_arrays(dtype):
  """Integer images (e.g. raw uint8) must be converted first: TypeError, not silent truncation."""
  with pytest.raises(TypeError, match="floating"):
    mixing.mix({"images": jnp.zeros((8, 2, 2, 3), dtype)}, _params(0.5, _PERM8))


def test_mix_per_shard_equals_shard_by_shard_single_mix():
  """(S, B//S) perm == single-shard mix of each block with its row and the same lam."""
  tree, lam = _tree(17), 0.61
  got = mixing.mix(jax.tree_util.tree_map(jnp.asarray, tree), _params(lam, _PERM8_SHARDED))
  for name, x in tree.items():
    blocks = []
    for s in range(2):
      block = {name: jnp.asarray(x[4 * s:4 * (s + 1)])}
      blocks.append(np.asarray(mixing.mix(block, _params(lam, _PERM8_SHARDED[s]))[name]))
    np.testing.assert_allclose(np.asarray(got[name]), np.concatenate(blocks), rtol=1e-6, atol=1e-7)
    # And the same as numpy with the equivalent global index.
    g = np.concatenate([4 * s + _PERM8_SHARDED[s] for s in range(2)])
    np.testing.assert_allclose(np.asarray(got[name]), _np_mix({name: x}, lam, g)[name],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_mix_per_shard_equals_mix_with_global_permutation(jit):
  """Mixing with (S, B//S) perm equals mixing with global_permutation(perm)."""
  tree = jax.tree_util.tree_map(jnp.asarray, _tree(18, b=12))
  params = mixing.sample_mix(jax.random.key(19), 12, 0.4, num_groups=3)
  fn = jax.jit(mixing.mix) if jit else mixing.mix
  sharded = fn(tree, params)
  flat = fn(tree, MixParams(lam=params.lam, perm=mixing.global_permutation(params.perm)))
  for name in tree:
    np.testing.assert_allclose(np.asarray(sharded[name]), np.asarray(flat[name]),
                               rtol=1e-6, atol=1e-7)


def test_mix_with_sampled_params_under_jit():
  """sample_mix + mix inside one jit, keyed like the train step; matches numpy."""
  tree = _tree(20, b=16)

  @jax.jit
  def step(key, tree):
    params = mixing.sample_mix(key, 16, 0.4, num_groups=2)
    return params, mixing.mix(tree, params)

  params, got = step(jax.random.key(21), jax.tree_util.tree_map(jnp.asarray, tree))
  gperm = np.asarray(mixing.global_permutation(params.perm))
  want = _np_mix(tree, float(params.lam), gperm)
  for name in tree:
    np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-6)


def test_mix_preserves_bfloat16():
  """bfloat16 in -> bfloat16 out, close to the float64 mix."""
  tree = _tree(22)
  bf = {name: jnp.asarray(x, jnp.bfloat16) for name, x in tree.items()}
  got = mixing.mix(bf, _params(0.3, _PERM8))
  rounded = {name: np.asarray(x.astype(jnp.float32)) for name, x in bf.items()}
  want = _np_mix(rounded, 0.3, _PERM8)
  for name in tree:
    assert got[name].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got[name].astype(jnp.float32)), want[name],
                               rtol=2e-2, atol=2e-2)
