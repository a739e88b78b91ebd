"""BatchNorm over row groups (DDP without SyncBN): each group normalized with its own biased
statistics, running statistics from the groups' means / unbiased variances or from group 0
alone, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax.models import build_model
from mixskd_jax.models.layers import BatchNorm

MOMENTUM = 0.9


def numpy_batchnorm(x, groups, scale, bias, eps=1e-5):
  """Per group: (x - mean) / sqrt(var + eps) * scale + bias, and the groups' statistics."""
  g = x.reshape((groups, -1) + x.shape[1:])
  axes = tuple(range(1, g.ndim - 1))
  mean, var = g.mean(axes, keepdims=True), g.var(axes, keepdims=True)
  y = (g - mean) / np.sqrt(var + eps) * scale + bias
  count = np.prod(g.shape[1:-1])
  return (y.reshape(x.shape), mean.reshape(groups, -1),
          (var * count / (count - 1)).reshape(groups, -1))


@pytest.mark.parametrize("running_stats", ["mean_of_groups", "first_group"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_groups_normalize_separately(groups, running_stats):
  rng = np.random.default_rng(0)
  # Groups with different offsets and scales, so shared statistics would be visibly wrong.
  x = rng.normal(size=(8, 3, 3, 5)) * np.repeat(np.arange(1, 5), 2)[:, None, None, None] + \
      np.repeat(np.arange(4) * 3.0, 2)[:, None, None, None]
  x = x.astype(np.float32)
  bn = BatchNorm(momentum=MOMENTUM, groups=groups, running_stats=running_stats)
  variables = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
  scale = rng.normal(size=5).astype(np.float32)
  variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.full(5, 0.5)},
               "batch_stats": variables["batch_stats"]}
  y, state = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  y_ref, means, variances = numpy_batchnorm(x.astype(np.float64), groups, scale, 0.5)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  pick = (lambda s: s[0]) if running_stats == "first_group" else (lambda s: s.mean(0))
  np.testing.assert_allclose(state["batch_stats"]["mean"], (1 - MOMENTUM) * pick(means),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             MOMENTUM + (1 - MOMENTUM) * pick(variances), rtol=1e-5)


def test_groups_that_do_not_divide_the_rows_are_refused():
  bn = BatchNorm(groups=3)
  variables = bn.init(jax.random.key(0), jnp.zeros((6, 2)), train=False)
  with pytest.raises(ValueError, match="groups=3 must divide the 8 rows.*batchnorm_groups"):
    bn.apply(variables, jnp.zeros((8, 2)), train=True, mutable=["batch_stats"])


def test_grouped_resnet_is_its_groups_run_alone():
  """A ResNet with batchnorm_groups=2 on 2 groups of rows gives each group's logits as the
  ungrouped ResNet on that group alone, and the mean of their running statistics."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 28, 28, 1)).astype(np.float32))
  grouped = build_model("small_resnet", 10, mixskd=False, batchnorm_groups=2)
  plain = build_model("small_resnet", 10, mixskd=False)
  variables = plain.init(jax.random.key(0), x[:1])
  out, state = grouped.apply(variables, x, train=True, mutable=["batch_stats"])
  alone = [plain.apply(variables, x[g * 4:(g + 1) * 4], train=True, mutable=["batch_stats"])
           for g in range(2)]
  np.testing.assert_allclose(out.logits[0], np.concatenate([a[0].logits[0] for a in alone]),
                             rtol=2e-5, atol=2e-5)
  mean_stats = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, alone[0][1], alone[1][1])
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(mean_stats)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
