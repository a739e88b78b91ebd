"""A train step sharded over 8 (fake CPU) devices computes what it computes on one device,
given the same per-group pairing (BatchNorm statistics over the whole batch, SyncBN), and with
one BatchNorm group per device what 8 independent DDP ranks compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from mixskd_jax import config as config_lib
from mixskd_jax.method.methods import build_method, objective_config
from mixskd_jax.method.mixing import MixParams, sample_mix
from mixskd_jax.method.objective import apply_mixskd
from mixskd_jax.models import build_model
from mixskd_jax.train import sharding, steps
from mixskd_jax.train.optimizer import build_optimizer
from mixskd_jax.train.state import TrainState
from mixskd_jax.train.steps import train_step

# Full-model train steps compiled for 1 and 8 devices (float32 and float64): the slow tier.
pytestmark = pytest.mark.slow


def run_steps(mesh, config, num_groups, batches, dtype=jnp.float32):
  model = build_model("small_resnet", 10, dtype=dtype)
  method = build_method(config, num_groups=num_groups)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  variables = jax.tree_util.tree_map(lambda v: v.astype(dtype), variables)
  tx, schedule = build_optimizer(config, steps_per_epoch=10, num_epochs=2,
                                 partition=method.partition(variables["params"]))
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step = jax.jit(functools.partial(train_step, model=model, method=method, tx=tx,
                                   schedule=schedule, mean=(0.3,), std=(0.35,)),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl))
  state = jax.device_put(TrainState.create(variables, tx), repl)
  for batch in batches:
    global_batch = jax.device_put(batch, data)
    assert len(global_batch["image"].sharding.device_set) == mesh.size
    state, metrics = step(state, global_batch, jax.random.key(42))
  return jax.device_get(state), jax.device_get(metrics)


def compare(variant, dtype, rtol):
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py forces 8 host devices"
  config = config_lib.base_config()
  config.objective.variant = variant
  config.optimizer.warmup_epochs = 1
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(2)]
  state8, metrics8 = run_steps(Mesh(np.asarray(devices), ("data",)), config, 8, batches, dtype)
  state1, metrics1 = run_steps(Mesh(np.asarray(devices[:1]), ("data",)), config, 8, batches,
                               dtype)
  assert set(metrics8) == set(metrics1)
  for name in metrics8:
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=rtol, atol=rtol,
                               err_msg=name)
  assert int(state8.step) == 2
  return state8, state1


@pytest.mark.parametrize("variant", ["full", "reference_cifar"])
def test_eight_devices_equal_one(variant):
  """float32: loss, terms and accuracies agree to summation-order rounding."""
  compare(variant, jnp.float32, 2e-5)


def test_eight_devices_equal_one_exactly_in_float64():
  """float64: every parameter, BN statistic and optimizer state after two steps agrees to
  1e-10, so any difference in float32 is rounding (cross-device reductions sum in another
  order), not a different computation."""
  with jax.enable_x64(True):
    state8, state1 = compare("full", jnp.float64, 1e-10)
    for a, b in zip(jax.tree_util.tree_leaves(state8), jax.tree_util.tree_leaves(state1)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_grouped_step_equals_independent_devices_in_float64():
  """DDP without SyncBN (the official ImageNet run): 8 devices, each with its own mix group,
  lam and BatchNorm group. The sharded step's loss, new parameters, optimizer state and running
  statistics equal 8 independent single-device computations on each device's rows, with their
  losses and gradients averaged as DDP averages them and their running statistics averaged
  (`batchnorm_running_stats="mean_of_groups"`), to 1e-10 in float64."""
  devices = jax.devices()
  config = config_lib.base_config()
  config.objective.variant = "full"
  config.objective.lam_per_group = True
  config.optimizer.warmup_epochs = 0
  groups, batch_size = 8, 16
  with jax.enable_x64(True):
    grouped = build_model("small_resnet", 10, dtype=jnp.float64, batchnorm_groups=groups)
    single = build_model("small_resnet", 10, dtype=jnp.float64)
    method = build_method(config, num_groups=groups)
    variables = jax.tree_util.tree_map(
        lambda v: v.astype(jnp.float64),
        single.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    tx, schedule = build_optimizer(config, steps_per_epoch=10, num_epochs=2,
                                   partition=method.partition(variables["params"]))
    mesh = Mesh(np.asarray(devices), ("data",))
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    step = jax.jit(functools.partial(train_step, model=grouped, method=method, tx=tx,
                                     schedule=schedule, mean=(0.3,), std=(0.35,)),
                   in_shardings=(repl, data, repl), out_shardings=(repl, repl))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, batch_size).astype(np.int32)}
    root = jax.random.key(42)
    state = TrainState.create(variables, tx)
    new_state, metrics = jax.device_get(step(jax.device_put(state, repl),
                                             jax.device_put(batch, data), root))

    # The reference: every device alone, as a DDP rank computes it.
    mix = sample_mix(jax.random.fold_in(root, 0), batch_size, config.objective.alpha, groups,
                     lam_per_group=True)
    # Normalized in float32 inside jit, as the step does (XLA's fused division rounds its own
    # way), then widened to float64.
    images = jax.jit(lambda x: steps._images(single, x, (0.3,), (0.35,)))(batch["image"])
    rows = batch_size // groups
    obj = objective_config(config)

    def alone(params, g):
      part = slice(g * rows, (g + 1) * rows)
      return apply_mixskd(single, {"params": params, "batch_stats": variables["batch_stats"]},
                          images[part], jnp.asarray(batch["label"][part]),
                          MixParams(lam=mix.lam[g], perm=mix.perm[g]), obj)

    results = [jax.jit(jax.value_and_grad(alone, has_aux=True), static_argnums=1)(
        variables["params"], g) for g in range(groups)]
    average = lambda trees: jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)
    grads = average([r[1] for r in results])
    # Jitted as the step is, so the learning rate has the same dtype in both.
    updates, opt_state = jax.jit(tx.update)(grads, state.opt_state, variables["params"])
    want = {"params": optax.apply_updates(variables["params"], updates),
            "batch_stats": average([r[0][1][2] for r in results]), "opt_state": opt_state}
    np.testing.assert_allclose(metrics["train/loss"],
                               np.mean([r[0][0] for r in results]), rtol=1e-10)
    for name, tree in want.items():
      got = getattr(new_state, name)
      assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)
      for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
