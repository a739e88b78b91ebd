"""Which parameters a MixSKD variant trains, found by path, never by a name that may be nested.

A variant freezes whole sub-trees: the self-teacher in `reference_cifar`, the discriminators in
`reference_cifar` and `full`. Where those sub-trees live is the user's model's business, so
they are given as paths (tuples of keys from the root of `params`) or predicates over a leaf's
path. A sub-tree named `self_teacher` or `discriminators` somewhere else in the tree is refused
unless a path or predicate says what it is: guessing would silently train (or freeze) it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import optax
from flax import traverse_util
from flax.core import unfreeze

TRAINABLE, FROZEN = "trainable", "frozen"
# A sub-tree: a path of keys from the root, or a predicate on a leaf's path; None: absent.
Where = Sequence[str] | Callable[[tuple[str, ...]], bool] | None


def _flat(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  flat = traverse_util.flatten_dict(unfreeze(params))
  return {tuple(str(k) for k in path): v for path, v in flat.items()}


def _selector(where: Where, paths: Sequence[tuple[str, ...]],
              role: str) -> Callable[[tuple[str, ...]], bool]:
  if where is None:
    return lambda path: False
  if callable(where):
    if not any(where(p) for p in paths):
      raise ValueError(f"The {role} predicate selects no parameter; check it against the "
                       f"parameter paths, e.g. {['/'.join(p) for p in paths[:4]]}.")
    return where
  prefix = tuple(where)
  if not any(p[:len(prefix)] == prefix for p in paths):
    found = sorted({p[:p.index(role) + 1] for p in paths if role in p})
    if found:
      raise ValueError(f"params has no sub-tree at {'/'.join(prefix)!r} for the {role}, but "
                       f"has one at {'/'.join(found[0])!r}: pass {role}={found[0]!r}.")
    raise ValueError(
        f"params has no sub-tree at {'/'.join(prefix)!r} for the {role}. Pass {role}=<path> "
        f"(a tuple of keys from the root of params) where its parameters live, a predicate on "
        f"a parameter's path, or {role}=None if the model has none. Top-level keys: "
        f"{sorted({p[0] for p in paths})}.")
  return lambda path: path[:len(prefix)] == prefix


def partition(params: Mapping[str, Any], *, roles: Mapping[str, Where],
              frozen: Sequence[str]) -> Any:
  """Labels every leaf of `params` TRAINABLE or FROZEN (for `optax.multi_transform`).

  Args:
    params: a nested dict of parameters.
    roles: role -> where its sub-tree is (`Where`). Each given location must select at least
      one leaf. A key named like a guarded role ("self_teacher", "discriminators") that the
      role's path does not cover is refused (a predicate takes responsibility for its role).
    frozen: the roles whose leaves are FROZEN; every other leaf is TRAINABLE.

  Returns:
    A nested dict with the structure of `params` and "trainable" / "frozen" leaves.
  """
  flat = _flat(params)
  paths = list(flat)
  selectors = {role: _selector(where, paths, role) for role, where in roles.items()}
  for path in paths:
    for depth, key in enumerate(path):
      if key in roles and not callable(roles[key]) and not selectors[key](path):
        raise ValueError(
            f"params holds a {key!r} sub-tree at {'/'.join(path[:depth + 1])!r} that "
            f"{key}={roles[key]!r} does not select, so it would be treated as part of the "
            f"network. Pass {key}={path[:depth + 1]!r} (its path) or a predicate.")
  labels = {path: FROZEN if any(selectors[r](path) for r in frozen) else TRAINABLE
            for path in paths}
  return traverse_util.unflatten_dict(labels)


def variant_partition(params: Mapping[str, Any], config: Any, *,
                      self_teacher: Where = ("self_teacher",),
                      discriminators: Where = ("discriminators",)) -> Any:
  """TRAINABLE / FROZEN labels of `params` for an objective variant.

  Args:
    params: the parameters of the network and the training-only heads.
    config: an `objective.ObjectiveConfig` (reads `trains_self_teacher`,
      `trains_discriminators`).
    self_teacher, discriminators: where those heads' parameters are (`Where`); by default
      the top-level entries `self_teacher` and `discriminators`, as in our networks.
  """
  frozen = [role for role, trained in (("self_teacher", config.trains_self_teacher),
                                       ("discriminators", config.trains_discriminators))
            if not trained]
  return partition(params, roles={"self_teacher": self_teacher,
                                  "discriminators": discriminators}, frozen=frozen)


def freeze_except(labels: Mapping[str, Any], trained: Sequence[Sequence[str]]) -> Any:
  """`labels` with every leaf outside the `trained` sub-trees FROZEN (a linear probe: only
  the classifier head trains). A leaf already FROZEN stays so.

  Args:
    labels: TRAINABLE / FROZEN labels (`partition`'s output).
    trained: paths (tuples of keys from the root) of the sub-trees that may still train;
      each must exist.
  """
  flat = _flat(labels)
  prefixes = [tuple(p) for p in trained]
  for prefix in prefixes:
    if not any(path[:len(prefix)] == prefix for path in flat):
      raise ValueError(f"params has no sub-tree at {'/'.join(prefix)!r} to keep training; "
                       f"top-level keys: {sorted({p[0] for p in flat})}.")
  kept = {path: label if any(path[:len(p)] == p for p in prefixes) else FROZEN
          for path, label in flat.items()}
  return traverse_util.unflatten_dict(kept)


def mask(labels: Any) -> Any:
  """TRAINABLE / FROZEN labels -> booleans (True = trained), e.g. for `optax.masked`."""
  if isinstance(labels, Mapping):
    return {k: mask(v) for k, v in labels.items()}
  return labels == TRAINABLE


def frozen_function(fn: Callable) -> Callable:
  """`fn` with no gradient into the arrays it closes over (a frozen head's parameters);
  gradients still reach its arguments, so the network learns through a frozen head.

  The closed-over arrays are found by tracing `fn` (`jax.closure_convert`), so this works for
  a lambda over a params dict, a bound Linen method and an NNX module's method alike. The
  forward computation is the same jaxpr, so values do not change.
  """
  def call(*args):
    converted, consts = jax.closure_convert(fn, *args)
    return converted(*args, *(jax.lax.stop_gradient(c) for c in consts))
  return call


def partitioned(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
  """Applies `tx` to TRAINABLE leaves and a zero update (no decay, no momentum) to FROZEN ones.

  Args:
    tx: the optimizer of the trained parameters.
    labels: pytree of TRAINABLE / FROZEN labels, e.g. `variant_partition`'s.
  """
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def variant_optimizer(tx: optax.GradientTransformation, params: Mapping[str, Any], config: Any,
                      *, self_teacher: Where = ("self_teacher",),
                      discriminators: Where = ("discriminators",)
                      ) -> optax.GradientTransformation:
  """`tx` for the parameters `config`'s variant trains; the frozen heads get a zero update.

  The objective already sends no gradient into frozen heads, so a gradient-only optimizer
  (SGD, momentum, Adam) leaves them alone; this also keeps weight decay (coupled or decoupled,
  e.g. `optax.adamw`) and any other update that moves parameters without a gradient off them.

  Args:
    tx: any optax optimizer.
    params: the network's and the training-only heads' parameters (their structure is read).
    config: an `objective.ObjectiveConfig`.
    self_teacher, discriminators: where those heads are (`Where`, as in `variant_partition`).
  """
  return partitioned(tx, variant_partition(params, config, self_teacher=self_teacher,
                                           discriminators=discriminators))
