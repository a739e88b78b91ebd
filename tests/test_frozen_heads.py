"""Frozen means frozen, whatever optimizer a user writes: the objective sends no gradient into
the heads a variant keeps fixed (the discriminators of `reference_cifar` and `full`, the
self-teacher of `reference_cifar`), so plain `optax.sgd` (Linen) and `nnx.Optimizer(wrt=
nnx.Param)` (NNX) leave them bit-identical; `mixskd.optimizer` and its NNX twin keep weight
decay off them too. The network still learns through a frozen head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from mixskd_jax import nnx as mixskd_nnx
import mixskd_jax as mixskd
from mixskd_jax.method.trainable import frozen_function

STEPS = 5
# variant -> (frozen top-level sub-trees, trained ones that must move)
FROZEN = {"reference_cifar": (("discriminators", "self_teacher"), ("backbone",)),
          "full": (("discriminators",), ("backbone", "self_teacher")),
          "adversarial": ((), ("backbone", "self_teacher", "discriminators"))}
IMAGES = jax.random.normal(jax.random.key(0), (8, 16, 16, 1))
LABELS = jnp.arange(8) % 4


class LinenStage(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.LayerNorm()(nn.Conv(self.width, (3, 3), strides=2)(x)))


def same(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(np.array_equal(u, v)), a, b)))


def assert_frozen_and_trained(before, after, variant):
  frozen, trained = FROZEN[variant]
  for name in frozen:
    assert same(before[name], after[name]), f"{variant}: {name} moved"
  for name in trained:
    assert not same(before[name], after[name]), f"{variant}: {name} did not train"


def linen_training(variant, tx_of):
  """STEPS steps of a staged Linen network like docs/own-model.md's, with the optimizer
  `tx_of(params, config)`; returns (params before, params after)."""
  model = mixskd.mixskd_network([LinenStage(8), LinenStage(16)], num_classes=4,
                                stem=nn.Conv(8, (3, 3)))
  variables = model.init(jax.random.key(1), IMAGES)
  config = mixskd.ObjectiveConfig.for_variant(variant)
  tx = tx_of(variables["params"], config)

  @jax.jit
  def step(params, opt_state, key):
    mix = mixskd.sample_mix(key, IMAGES.shape[0], alpha=0.4)
    grads = jax.grad(lambda p: mixskd.apply_mixskd(model, {"params": p}, IMAGES, LABELS, mix,
                                                   config)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = variables["params"], tx.init(variables["params"])
  for k in range(STEPS):
    params, opt_state = step(params, opt_state, jax.random.key(10 + k))
  return variables["params"], params


@pytest.mark.parametrize("variant", list(FROZEN))
def test_linen_plain_sgd_leaves_frozen_heads_bit_identical(variant):
  before, after = linen_training(variant, lambda p, c: optax.sgd(0.1, momentum=0.9))
  assert_frozen_and_trained(before, after, variant)


def test_linen_weight_decay_moves_frozen_heads_unless_the_variant_optimizer_masks_them():
  """Decoupled weight decay moves parameters with a zero gradient: `optax.adamw` alone moves
  the frozen discriminators, `mixskd.optimizer(optax.adamw(...), params, config)` does not."""
  adamw = lambda: optax.adamw(1e-2, weight_decay=0.5)
  before, after = linen_training("full", lambda p, c: adamw())
  assert not same(before["discriminators"], after["discriminators"])
  before, after = linen_training("full", lambda p, c: mixskd.optimizer(adamw(), p, c))
  assert_frozen_and_trained(before, after, "full")


def test_own_model_with_heads_as_functions_of_a_params_dict():
  """The "any multi-head model" path: mixskd_loss gets the heads as lambdas over the user's
  params dict; with `reference_cifar`, plain Nesterov SGD leaves both frozen heads
  bit-identical while the network trains."""
  teacher, discs = mixskd.SelfTeacher(4), mixskd.FeatureDiscriminators(hidden=8)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
      b = nn.relu(nn.Conv(8, (3, 3), strides=2)(a))
      logits = (nn.Dense(4)(a.mean((1, 2))), nn.Dense(4)(b.mean((1, 2))))
      return mixskd.ModelOutputs(logits=logits, features=(nn.avg_pool(a, (2, 2), (2, 2)), b))

  net = Net()
  feats = net.apply(net.init(jax.random.key(0), IMAGES), IMAGES).features
  params = {"network": net.init(jax.random.key(0), IMAGES)["params"],
            "self_teacher": teacher.init(jax.random.key(1), feats)["params"],
            "discriminators": discs.init(jax.random.key(2),
                                         [f.mean((1, 2)) for f in feats])["params"]}
  config = mixskd.ObjectiveConfig.for_variant("reference_cifar")

  def loss(p, key):
    mix = mixskd.sample_mix(key, IMAGES.shape[0], alpha=0.4)
    both = mixskd.stack_views(IMAGES, mixskd.mix(IMAGES, mix))
    outputs = net.apply({"params": p["network"]}, both)
    return mixskd.mixskd_loss(
        outputs, LABELS, mix, config=config,
        self_teacher=lambda f: teacher.apply({"params": p["self_teacher"]}, f),
        discriminators=lambda q: discs.apply({"params": p["discriminators"]}, q))[0]

  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  state, new = tx.init(params), params
  for k in range(STEPS):
    updates, state = tx.update(jax.grad(loss)(new, jax.random.key(k)), state)
    new = optax.apply_updates(new, updates)
  assert_frozen_and_trained({"backbone": params["network"], **params},
                            {"backbone": new["network"], **new}, "reference_cifar")


class NNXStage(nnx.Module):
  """A stage with BatchNorm, as a user writes it."""

  def __init__(self, i, o, rngs):
    self.conv = nnx.Conv(i, o, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(o, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


def nnx_training(variant, optimizer_of):
  model = mixskd_nnx.MixSKDNetwork(
      stem=lambda rngs: nnx.Conv(1, 8, (3, 3), rngs=rngs),
      stages=[functools.partial(NNXStage, 8, 16), functools.partial(NNXStage, 16, 32)],
      num_classes=4, features=32, rngs=nnx.Rngs(0))
  config = mixskd.ObjectiveConfig.for_variant(variant)
  before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  optimizer = optimizer_of(model, config)

  @nnx.jit
  def step(model, optimizer, key):
    mix = mixskd.sample_mix(key, IMAGES.shape[0], alpha=0.4)
    grads = nnx.grad(lambda m: mixskd_nnx.mixskd_loss(m, IMAGES, LABELS, mix, config)[0],
                     argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)

  model.train()
  for k in range(STEPS):
    step(model, optimizer, jax.random.key(10 + k))
  return before, nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("variant", list(FROZEN))
def test_nnx_optimizer_over_every_param_leaves_frozen_heads_bit_identical(variant):
  before, after = nnx_training(
      variant, lambda m, c: nnx.Optimizer(m, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param))
  assert_frozen_and_trained(before, after, variant)


def test_nnx_variant_optimizer_keeps_decoupled_weight_decay_off_frozen_heads():
  adamw = lambda: optax.adamw(1e-2, weight_decay=0.5)
  before, after = nnx_training("full", lambda m, c: nnx.Optimizer(m, adamw(), wrt=nnx.Param))
  assert not same(before["discriminators"], after["discriminators"])
  before, after = nnx_training("full", lambda m, c: mixskd_nnx.optimizer(m, adamw(), c))
  assert_frozen_and_trained(before, after, "full")


def test_frozen_function_keeps_values_and_input_gradients_and_stops_parameter_gradients():
  head = nn.Dense(3)
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = head.init(jax.random.key(1), x)["params"]

  def loss(p, x, freeze):
    fn = lambda inputs: head.apply({"params": p}, inputs)
    fn = frozen_function(fn) if freeze else fn
    return jnp.sum(jnp.sin(fn(x)))

  for argnums in (0, 1):
    free = jax.value_and_grad(loss, argnums)(params, x, False)
    frozen = jax.value_and_grad(loss, argnums)(params, x, True)
    assert float(free[0]) == float(frozen[0])
    if argnums == 1:  # the input's gradient passes through unchanged
      np.testing.assert_array_equal(frozen[1], free[1])
    else:
      assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen[1]))
      assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(free[1]))
