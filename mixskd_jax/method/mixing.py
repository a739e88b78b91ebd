"""Mixup on device: sample (lam, permutation) from a key, mix any pytree with them, and lay
out the clean and mixed views of a batch for one forward pass.

The permutation is either global, shape (B,), or per mix group, shape (G, B // G): then
example i of group g is paired with example `perm[g, i]` of the same group. Groups are
contiguous blocks of the batch; with one group per device (or several per device) no image or
feature map crosses devices. With G = 1 both forms are the reference's `x[randperm(B)]`.

`lam` is one scalar for the batch, as in the reference's CIFAR script, or one per group, shape
(G,), as in its 8-GPU ImageNet run (every GPU process drew its own). It stays float32 whatever
the dtype of what is mixed.

The network sees both views in one batch of 2B rows, `stack_views(clean, mixed, G)`: per group
g the rows [clean_g; mixed_g]. With G = 1 that is the reference's [clean; mixed]; with one
group per device every device holds its own clean rows and their mixed partners, so a BatchNorm
over a device's rows normalizes them together as the reference's DDP run does.
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
    lam: () float32 weight of the original image, in [0, 1], or (G,) one per mix group.
    perm: (B,) int32 global permutation, or (G, B // G) int32 permutations local to each of
      G contiguous mix groups.
  """
  lam: jax.Array
  perm: jax.Array

  @property
  def batch_size(self) -> int:
    return self.perm.size

  @property
  def num_groups(self) -> int:
    """G: the contiguous blocks pairs stay in (1 for a global permutation)."""
    return self.perm.shape[0] if self.perm.ndim == 2 else 1

  def example_lam(self) -> jax.Array:
    """lam of every example: () if one lam serves the batch, else (B,) float32."""
    if self.lam.ndim == 0:
      return self.lam
    return jnp.repeat(self.lam, self.batch_size // self.lam.shape[0])


def sample_lambda(key: jax.Array, alpha: float) -> jax.Array:
  """lam ~ Beta(alpha, alpha); alpha <= 0 disables mixing (lam = 1) as the reference does."""
  if alpha <= 0:
    return jnp.ones((), jnp.float32)
  return jax.random.beta(key, alpha, alpha, dtype=jnp.float32)


def masked_permutation(key: jax.Array, where: jax.Array) -> jax.Array:
  """A random permutation that pairs real rows among themselves and keeps padded rows put.

  Args:
    key: PRNG key.
    where: (n,) bool, True for real rows.

  Returns:
    (n,) int32 `perm` with `where[perm[i]] == where[i]`; `perm[i] == i` for padded rows.
  """
  n = where.shape[0]
  noise = jax.random.uniform(key, (n,))
  # Real rows in random order, then padded rows in index order ...
  sources = jnp.argsort(jnp.where(where, noise, 2.0 + jnp.arange(n) / n))
  # ... given to the real positions in index order, then to the padded ones.
  targets = jnp.argsort(jnp.logical_not(where).astype(jnp.int32), stable=True)
  return jnp.zeros(n, jnp.int32).at[targets].set(sources.astype(jnp.int32))


def sample_mix(key: jax.Array, batch_size: int, alpha: float, num_groups: int = 1, *,
               lam_per_group: bool = False, where: jax.Array | None = None) -> MixParams:
  """Draws `lam` and a permutation (global if num_groups == 1).

  Args:
    key: PRNG key; the same key gives the same draw.
    batch_size: B, the number of clean examples in the (global) batch.
    alpha: Beta concentration; the reference uses 0.4 on CIFAR, 0.2 on ImageNet.
    num_groups: G; with G > 1 each of G contiguous blocks of B // G examples is permuted
      within itself and `perm` has shape (G, B // G).
    lam_per_group: draw one lam per group, shape (G,), instead of one for the batch.
    where: optional (B,) bool, True for real rows of a padded batch: real rows are paired
      only with real rows (within their group) and padded rows with themselves.

  Returns:
    MixParams.
  """
  if num_groups < 1 or batch_size % num_groups:
    raise ValueError(
        f"batch_size={batch_size} must split evenly into num_groups={num_groups} mix groups; "
        "choose a batch size that is a multiple of the number of groups (by default the "
        "number of devices).")
  lam_key, perm_key = jax.random.split(key)
  if lam_per_group:
    lam = jax.vmap(lambda k: sample_lambda(k, alpha))(jax.random.split(lam_key, num_groups))
  else:
    lam = sample_lambda(lam_key, alpha)
  if where is not None:
    if where.shape != (batch_size,):
      raise ValueError(f"where must be one bool per example, shape ({batch_size},); got "
                       f"{where.shape}.")
    keys = jax.random.split(perm_key, num_groups)
    perm = jax.vmap(masked_permutation)(keys, where.reshape(num_groups, -1))
    perm = perm[0] if num_groups == 1 else perm
  elif num_groups == 1:
    perm = jax.random.permutation(perm_key, batch_size)
  else:
    keys = jax.random.split(perm_key, num_groups)
    perm = jax.vmap(lambda k: jax.random.permutation(k, batch_size // num_groups))(keys)
  return MixParams(lam=lam, perm=perm.astype(jnp.int32))


def global_permutation(perm: jax.Array) -> jax.Array:
  """The (B,) global index equivalent to a per-group (G, B // G) permutation (or `perm`)."""
  if perm.ndim == 1:
    return perm
  groups, per_group = perm.shape
  return (perm + per_group * jnp.arange(groups, dtype=perm.dtype)[:, None]).reshape(-1)


def _grouped(x: jax.Array, groups: int) -> jax.Array:
  """(B, ...) -> (G, B // G, ...): the contiguous blocks, without moving data."""
  return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def permute(x: jax.Array, perm: jax.Array) -> jax.Array:
  """x[perm] along axis 0; per group when `perm` is (G, B // G).

  Args:
    x: (B, ...) array.
    perm: (B,) or (G, B // G) permutation.

  Returns:
    (B, ...) the partner of every example.
  """
  if perm.ndim == 1:
    return x[perm]
  return jax.vmap(lambda block, p: block[p])(_grouped(x, perm.shape[0]), perm).reshape(x.shape)


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
    # lam stays float32 (or wider): a bf16 lam would mix features with another weight than
    # the float32 one that mixed the images.
    lam = params.example_lam().astype(jnp.promote_types(x.dtype, jnp.float32))
    lam = lam.reshape(lam.shape + (1,) * (x.ndim - lam.ndim))
    return (lam * x + (1 - lam) * permute(x, params.perm)).astype(x.dtype)
  return jax.tree_util.tree_map(mix_leaf, tree)


def stack_views(clean: jax.Array, mixed: jax.Array, num_groups: int = 1) -> jax.Array:
  """The 2B rows the network sees: per group g, [clean_g; mixed_g].

  Args:
    clean, mixed: (B, ...) the two views, grouped as the mix that made `mixed`.
    num_groups: G (`MixParams.num_groups`); 1 gives [clean; mixed].

  Returns:
    (2B, ...).
  """
  both = jnp.concatenate([_grouped(clean, num_groups), _grouped(mixed, num_groups)], axis=1)
  return both.reshape((2 * clean.shape[0],) + clean.shape[1:])


def split_views(x: jax.Array, num_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """Inverse of `stack_views`: (2B, ...) rows -> (clean (B, ...), mixed (B, ...))."""
  if x.shape[0] % (2 * num_groups):
    raise ValueError(f"{x.shape[0]} rows do not hold [clean; mixed] pairs of {num_groups} "
                     "mix group(s).")
  both = _grouped(x, num_groups)
  half = both.shape[1] // 2
  rest = (x.shape[0] // 2,) + x.shape[1:]
  return both[:, :half].reshape(rest), both[:, half:].reshape(rest)
