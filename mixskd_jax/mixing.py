"""Mixup on device: sample (lam, permutation) from a key and mix any pytree with them.

One scalar `lam` serves the whole global batch, as in the reference. The permutation is
either global, shape (B,), or per data shard, shape (S, B // S): then example i of shard s
is paired with example `perm[s, i]` of the same shard, so no feature map has to cross
devices. With S = 1 both forms are the reference's `x[randperm(B)]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class MixParams:
  """The randomness of one mixup step.

  Attributes:
    lam: () float32 weight of the original image, in [0, 1].
    perm: (B,) int32 global permutation, or (S, B // S) int32 permutations local to each of
      S contiguous data shards.
  """
  lam: jax.Array
  perm: jax.Array

  @property
  def batch_size(self) -> int:
    return self.perm.size


def sample_lambda(key: jax.Array, alpha: float) -> jax.Array:
  """lam ~ Beta(alpha, alpha); alpha <= 0 disables mixing (lam = 1) as the reference does."""
  if alpha <= 0:
    return jnp.ones((), jnp.float32)
  return jax.random.beta(key, alpha, alpha, dtype=jnp.float32)


def sample_mix(key: jax.Array, batch_size: int, alpha: float, num_shards: int = 1) -> MixParams:
  """Draws one `lam` for the batch and a permutation (global if num_shards == 1).

  Args:
    key: PRNG key; the same key gives the same draw.
    batch_size: B, the number of clean examples in the (global) batch.
    alpha: Beta concentration; the reference uses 0.4 on CIFAR, 0.2 on ImageNet.
    num_shards: S; with S > 1 each of S contiguous blocks of B // S examples is permuted
      within itself and `perm` has shape (S, B // S).

  Returns:
    MixParams.
  """
  if num_shards < 1 or batch_size % num_shards:
    raise ValueError(
        f"batch_size={batch_size} must split evenly into num_shards={num_shards} data shards; "
        "choose a batch size that is a multiple of the number of devices.")
  lam_key, perm_key = jax.random.split(key)
  lam = sample_lambda(lam_key, alpha)
  if num_shards == 1:
    perm = jax.random.permutation(perm_key, batch_size)
  else:
    keys = jax.random.split(perm_key, num_shards)
    perm = jax.vmap(lambda k: jax.random.permutation(k, batch_size // num_shards))(keys)
  return MixParams(lam=lam, perm=perm.astype(jnp.int32))


def global_permutation(perm: jax.Array) -> jax.Array:
  """The (B,) global index equivalent to a per-shard (S, B // S) permutation (or `perm` itself)."""
  if perm.ndim == 1:
    return perm
  shards, per_shard = perm.shape
  return (perm + per_shard * jnp.arange(shards, dtype=perm.dtype)[:, None]).reshape(-1)


def permute(x: jax.Array, perm: jax.Array) -> jax.Array:
  """x[perm] along axis 0; per shard when `perm` is (S, B // S).

  Args:
    x: (B, ...) array.
    perm: (B,) or (S, B // S) permutation.

  Returns:
    (B, ...) the partner of every example.
  """
  if perm.ndim == 1:
    return x[perm]
  shards, per_shard = perm.shape
  blocks = x.reshape((shards, per_shard) + x.shape[1:])
  return jax.vmap(lambda block, p: block[p])(blocks, perm).reshape(x.shape)


def mix(tree: PyTree, params: MixParams) -> PyTree:
  """lam * x + (1 - lam) * x[perm] for every floating array leaf of `tree`.

  Works on images, one-hot labels, logits and feature maps alike: the reference builds its
  mixed images and its interpolated logits/features with exactly this formula.

  Args:
    tree: pytree of (B, ...) floating arrays.
    params: the step's MixParams.

  Returns:
    A pytree of the same structure and dtypes.
  """
  def mix_leaf(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"mix() needs floating arrays, got {x.dtype}; convert images to float "
                      "(and normalize them) before mixing.")
    lam = params.lam.astype(x.dtype)
    return lam * x + (1 - lam) * permute(x, params.perm)
  return jax.tree_util.tree_map(mix_leaf, tree)
