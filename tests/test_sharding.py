"""A train step sharded over 8 (fake CPU) devices computes what it computes on one device,
given the same per-shard pairing: BatchNorm statistics and the loss are global under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mixskd_jax import config_schema
from mixskd_jax.models import build_model
from mixskd_jax.train import sharding
from mixskd_jax.train.methods import build_method
from mixskd_jax.train.optimizer import build_optimizer
from mixskd_jax.train.state import TrainState
from mixskd_jax.train.steps import train_step


def run_steps(mesh, config, num_shards, batches, dtype=jnp.float32):
  model = build_model("small_resnet", 10, dtype=dtype)
  method = build_method(config, num_shards=num_shards)
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
  config = config_schema.base_config()
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


def test_indivisible_batch_is_a_clear_error():
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  with pytest.raises(ValueError, match="config.batch_size=12 does not split evenly over 8"):
    sharding.check_divisible(12, mesh, "batch_size")
