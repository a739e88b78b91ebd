"""Batch layout: the grouped [clean_g; mixed_g] rows, and the device-dependent config fields
resolved for a device count, with an error naming the field for every bad combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax import config as config_lib
from mixskd_jax.method import mixing
from mixskd_jax.train import layout


def test_stack_views_puts_each_groups_mixed_rows_after_its_clean_rows():
  clean, mixed = np.arange(6), 10 + np.arange(6)
  np.testing.assert_array_equal(mixing.stack_views(jnp.asarray(clean), jnp.asarray(mixed), 3),
                                [0, 1, 10, 11, 2, 3, 12, 13, 4, 5, 14, 15])
  np.testing.assert_array_equal(mixing.stack_views(jnp.asarray(clean), jnp.asarray(mixed), 1),
                                np.concatenate([clean, mixed]))
  rows = jnp.asarray(np.random.default_rng(0).normal(size=(12, 2, 3)))
  back = mixing.stack_views(*mixing.split_views(rows, 3), 3)
  np.testing.assert_array_equal(back, rows)
  with pytest.raises(ValueError, match="do not hold"):
    mixing.split_views(rows, 4)


def test_per_group_lam_mixes_each_group_with_its_own_lam():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32))
  mix = mixing.MixParams(lam=jnp.asarray([0.1, 0.5, 0.8], jnp.float32),
                         perm=jnp.asarray([[1, 0]] * 3, jnp.int32))
  xn = np.asarray(x)
  want = np.concatenate([lam * xn[2 * g:2 * g + 2] + (1 - lam) * xn[2 * g:2 * g + 2][::-1]
                         for g, lam in enumerate([0.1, 0.5, 0.8])])
  np.testing.assert_allclose(mixing.mix(x, mix), want, rtol=1e-6)


def test_sample_mix_draws_one_lam_per_group():
  mix = mixing.sample_mix(jax.random.key(0), 32, 0.4, 4, lam_per_group=True)
  assert mix.lam.shape == (4,) and mix.lam.dtype == jnp.float32 and mix.perm.shape == (4, 8)
  assert len(set(np.asarray(mix.lam).tolist())) == 4
  assert np.all((np.asarray(mix.lam) >= 0) & (np.asarray(mix.lam) <= 1))
  np.testing.assert_array_equal(mix.example_lam(), np.repeat(np.asarray(mix.lam), 8))


def test_lam_stays_float32_when_bfloat16_is_mixed():
  """A bf16 array is mixed with the float32 lam (then rounded once), not a bf16-rounded lam."""
  x = jnp.asarray([[1.0], [3.0]], jnp.bfloat16)
  mix = mixing.MixParams(lam=jnp.float32(0.3), perm=jnp.asarray([1, 0], jnp.int32))
  out = mixing.mix(x, mix)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(jnp.asarray([[2.4], [1.6]], jnp.bfloat16), np.float32))


def config(**fields):
  c = config_lib.base_config()
  for dotted, value in fields.items():
    node = c
    *parents, leaf = dotted.split("__")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def test_defaults_on_one_device_are_the_reference():
  c = layout.resolve(config(), 1)
  assert (c.batch_size, c.objective.mix_groups, c.model.batchnorm_groups) == (64, 1, 1)
  assert c.optimizer.learning_rate == 0.1


def test_per_device_batch_and_linear_learning_rate():
  c = layout.resolve(config(batch_size=-1, per_device_batch_size=16,
                            optimizer__lr_reference_batch=128), 32)
  assert c.batch_size == 512 and c.optimizer.learning_rate == pytest.approx(0.4)
  assert c.optimizer.lr_reference_batch is None  # applied once
  assert layout.resolve(c, 32).optimizer.learning_rate == pytest.approx(0.4)


@pytest.mark.parametrize("mixskd,tokens,per_device,reference", [
    (True, "", 16, 128), (False, "", 32, 256), (True, "cross_entropy", 16, 128),
    (True, "mixup", 16, 128), (True, "byot", 16, 128), (True, "cs_kd", 16, 128)])
@pytest.mark.parametrize("devices", [8, 64, 256])
def test_every_imagenet_recipe_scales_per_device(mixskd, tokens, per_device, reference,
                                                 devices):
  """MixSKD and every baseline on ImageNet (the CE recipe, and the methods trained on the
  MixSKD recipe): a fixed per-device batch, one BatchNorm group per device (as the DDP runs
  without SyncBN the numbers come from), the linear learning rate from 0.1 at the official
  batch, which 8 devices reproduce."""
  c = config_lib.finalize(config_lib.recipes.imagenet(mixskd=mixskd), tokens)
  r = layout.resolve(c, devices)
  assert (r.per_device_batch_size, r.batch_size) == (per_device, per_device * devices)
  assert r.model.batchnorm_groups == r.objective.mix_groups == devices
  assert r.optimizer.learning_rate == pytest.approx(0.1 * per_device * devices / reference)
  if devices == 8:
    assert (r.batch_size, r.optimizer.learning_rate) == (reference, pytest.approx(0.1))


def test_mix_groups_merge_devices_that_hold_too_few_examples():
  assert layout.resolve(config(batch_size=64), 8).objective.mix_groups == 8
  assert layout.resolve(config(batch_size=64), 16).objective.mix_groups == 8
  assert layout.resolve(config(batch_size=64), 64).objective.mix_groups == 8
  c = layout.resolve(config(batch_size=64, objective__min_mix_group_size=1), 64)
  assert c.objective.mix_groups == 64


def test_batchnorm_groups_follow_the_mix_groups():
  c = layout.resolve(config(batch_size=64, model__batchnorm_groups=-1), 8)
  assert c.model.batchnorm_groups == 8
  c = layout.resolve(config(batch_size=64, model__batchnorm_groups=2), 8)
  assert c.model.batchnorm_groups == 2


def test_eval_batch_rounds_up_to_the_devices():
  assert layout.resolve(config(eval_batch_size=1000), 64).eval_batch_size == 1024
  assert layout.resolve(config(eval_batch_size=1000), 8).eval_batch_size == 1000


@pytest.mark.parametrize("fields,devices,message", [
    (dict(batch_size=12), 8, r"config.batch_size: 12 does not split evenly over 8"),
    (dict(batch_size=0), 1, r"config.batch_size: 0 must be positive"),
    (dict(batch_size=-1), 8, r"config.batch_size: -1 means per_device_batch_size"),
    (dict(batch_size=64, per_device_batch_size=16), 8,
     r"config.per_device_batch_size: 16 x 8 devices != config.batch_size=64"),
    (dict(objective__mix_groups=3), 1, r"config.objective.mix_groups: 3 must be"),
    (dict(model__batchnorm_groups=3, objective__mix_groups=4), 1,
     r"config.model.batchnorm_groups: 3 must be .* divisor of objective.mix_groups=4"),
    (dict(model__batchnorm_groups=8, objective__mix_groups=4), 1,
     r"config.model.batchnorm_groups: 8"),
    (dict(eval_batch_size=0), 1, r"config.eval_batch_size: 0 must be positive"),
    (dict(objective__min_mix_group_size=0), 1, r"config.objective.min_mix_group_size"),
    (dict(optimizer__lr_reference_batch=0), 1, r"config.optimizer.lr_reference_batch"),
])
def test_bad_layouts_name_the_field(fields, devices, message):
  with pytest.raises(ValueError, match=message):
    layout.resolve(config(**fields), devices)
