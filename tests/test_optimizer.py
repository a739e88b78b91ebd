"""Learning-rate schedules equal the reference's formulas; weight decay and momentum skip
exactly the parameters a variant freezes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax import config as config_lib
from mixskd_jax.method import objective
from mixskd_jax.method.schedule import reference_schedule
from mixskd_jax.train import optimizer

N = 782  # CIFAR steps per epoch at batch 64


def cifar_reference_lr(epoch, step_in_epoch):
  """main_mixskd_cifar.py's adjust_lr, transcribed from spec §C.1."""
  if epoch < 5:
    return 0.1 * (1 + step_in_epoch + epoch * N) / (5 * N)
  return 0.1 * 0.1 ** sum(m <= epoch - 5 for m in (100, 150))


def imagenet_reference_lr(epoch, step_in_epoch, n=10010):
  if epoch < 5:
    return 0.1 * (1 + step_in_epoch + epoch * n) / (5 * n)
  return 0.1 * 0.5 * (1 + math.cos(math.pi * (epoch - 5) / (305 - 5)))


@pytest.mark.parametrize("epoch,step", [(0, 0), (0, 1), (2, 400), (4, 781), (5, 0), (104, 781),
                                        (105, 0), (154, 781), (155, 0), (204, 781)])
def test_cifar_multistep_schedule(epoch, step):
  schedule = reference_schedule(base_lr=0.1, steps_per_epoch=N, num_epochs=205, warmup_epochs=5,
                                schedule="multistep", milestones=(100, 150))
  np.testing.assert_allclose(schedule(epoch * N + step), cifar_reference_lr(epoch, step),
                             rtol=1e-6)


@pytest.mark.parametrize("epoch,step", [(0, 0), (4, 10009), (5, 0), (6, 5000), (155, 3),
                                        (304, 10009)])
def test_imagenet_cosine_schedule(epoch, step):
  schedule = reference_schedule(base_lr=0.1, steps_per_epoch=10010, num_epochs=305,
                                warmup_epochs=5, schedule="cosine")
  np.testing.assert_allclose(schedule(epoch * 10010 + step), imagenet_reference_lr(epoch, step),
                             rtol=1e-5, atol=1e-9)


def test_schedule_is_constant_within_an_epoch_after_warmup():
  schedule = reference_schedule(base_lr=0.1, steps_per_epoch=100, num_epochs=20, warmup_epochs=2,
                                schedule="cosine")
  values = [float(schedule(s)) for s in range(700, 800)]
  assert len(set(values)) == 1 and float(schedule(800)) < values[0]


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match="config.optimizer.schedule"):
    reference_schedule(base_lr=0.1, steps_per_epoch=1, num_epochs=1, warmup_epochs=0,
                       schedule="linear")


@pytest.mark.parametrize("variant,frozen", [("reference_cifar", {"self_teacher", "discriminators"}),
                                            ("full", {"discriminators"}),
                                            ("adversarial", set())])
def test_weight_decay_skips_exactly_the_frozen_parameters(variant, frozen):
  """With zero gradients only the coupled decay acts: trained groups move, frozen ones stay."""
  params = {name: {"w": jnp.full((3,), 2.0)} for name in
            ("backbone", "branches_0", "self_teacher", "discriminators")}
  config = config_lib.base_config()
  config.objective.variant = variant
  config.optimizer.warmup_epochs = 0
  config.optimizer.schedule = "constant"
  obj = objective.ObjectiveConfig.for_variant(variant)
  tx, _ = optimizer.build_optimizer(config, steps_per_epoch=10, num_epochs=1,
                                    partition=objective.parameter_partition(params, obj))
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name, update in updates.items():
    # First Nesterov step (PyTorch): buf = d, step = d + 0.9 * buf, with d = wd * w.
    expected = 0.0 if name in frozen else -0.1 * (1 + 0.9) * 5e-4 * 2.0
    np.testing.assert_allclose(update["w"], expected, rtol=1e-6, atol=0)
