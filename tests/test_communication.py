"""What a sharded train step sends between devices, read from its compiled HLO: the MixSKD
steps of the CIFAR and ImageNet configs move no activations on 8, 16 or 64 devices (only the
gradient and metric all-reduce, at most the parameters' bytes), while pairs that span devices
visibly do."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags

from mixskd_jax import benchmark
from mixskd_jax.bench import collectives

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
RUNNER = os.path.join(os.path.dirname(__file__), "compile_runner.py")
CONFIGS = ("configs/cifar100_resnet18_mixskd.py", "configs/imagenet_resnet50_mixskd.py")

HLO = """
HloModule m
  %all-reduce.2 = (f32[], f32[4,16]{1,0}) all-reduce(%a, %b), channel_id=5, to_apply=%add
  %ag = f32[8,128]{1,0} all-gather(%x), dimensions={0}
  %cp-start = (bf16[2,3]{1,0}, bf16[2,3]{1,0}, u32[], u32[]) collective-permute-start(%y)
  %cp-done = bf16[2,3]{1,0} collective-permute-done(%cp-start)
  %a2a = (f32[2]{0}, /*index=1*/f32[2]{0}) all-to-all(%p, %q)
  %ar-start = f64[10]{0} all-reduce-start(%z), to_apply=%add
  %ar-done = f64[10]{0} all-reduce-done(%ar-start)
  ROOT %t = (f32[]) tuple(%g)
"""


def test_collectives_are_read_with_their_bytes():
  stats = collectives.collective_stats(HLO)
  assert stats == {
      "all-reduce": {"count": 2, "bytes": 4 + 4 * 64 + 8 * 10, "max_bytes": 260},
      "all-gather": {"count": 1, "bytes": 4 * 8 * 128, "max_bytes": 4096},
      "collective-permute": {"count": 1, "bytes": 12, "max_bytes": 12},
      "all-to-all": {"count": 1, "bytes": 16, "max_bytes": 16},
  }
  with pytest.raises(ValueError, match="Unknown HLO element type"):
    collectives.shape_bytes("q7[3]")


def load(path):
  return config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      os.path.join(ROOT, path))


def assert_moves_no_activations(step, devices):
  assert step["devices"] == devices
  check = collectives.activation_check(step["communication"], step["parameter_bytes"])
  # Nothing but small exchanges and the gradient all-reduce, which never exceeds the
  # parameters (frozen ones send nothing) and carries at least half of them.
  assert not check["moves_activations"], (check, step["communication"])
  assert check["all_reduce_bytes"] >= 0.5 * step["parameter_bytes"], check


def test_activation_check_flags_a_large_gather_and_an_oversized_total():
  small = collectives.SMALL_BYTES
  quiet = {"by_kind": {"all-reduce": {"count": 1, "bytes": 1000, "max_bytes": 1000},
                       "all-gather": {"count": 1, "bytes": small, "max_bytes": small}},
           "total_bytes": 1000 + small}
  assert not collectives.activation_check(quiet, 1000)["moves_activations"]
  gather = {**quiet, "by_kind": {**quiet["by_kind"], "all-gather": {
      "count": 1, "bytes": small + 1, "max_bytes": small + 1}}}
  assert collectives.activation_check(gather, 1000)["moves_activations"]
  assert collectives.activation_check({**quiet, "total_bytes": 1000 + 64 * small + 1},
                                      1000)["moves_activations"]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS)
def test_mixskd_step_moves_no_activations_on_8_devices(path):
  step = benchmark.measure_step(load(path), steps=0)
  assert_moves_no_activations(step, 8)
  assert step["mix_groups"] == 8


@pytest.mark.slow
def test_pairs_across_devices_are_visible_in_the_hlo():
  """The check above can fail: one mix group over 8 devices moves images and feature maps."""
  config = load("configs/default.py")
  config.objective.mix_groups = 1
  step = benchmark.measure_step(config, steps=0)
  assert step["communication"]["data_moving_bytes"] > 1e6


@pytest.mark.slow
@pytest.mark.parametrize("devices", [16, 64])
def test_configs_compile_on_a_slice(devices):
  """ImageNet keeps 16 images, one mix group and one BatchNorm group per device: nothing but
  gradients moves. CIFAR keeps the reference's global 64 (4 or 1 per device), so its pairs are
  drawn from groups of 8 that span devices: those images and feature maps do move (logged by
  `train.layout`; SCALING.md gives the bytes), while the all-reduce stays gradient-sized."""
  proc = subprocess.run([sys.executable, RUNNER, str(devices), *CONFIGS], capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  compiled = json.loads(proc.stdout.split("COMPILED", 1)[1])
  cifar, imagenet = (compiled[p] for p in CONFIGS)
  assert_moves_no_activations(imagenet, devices)
  assert (imagenet["batch_size"], imagenet["mix_groups"], imagenet["batchnorm_groups"]) == (
      16 * devices, devices, devices)
  assert (cifar["devices"], cifar["batch_size"], cifar["mix_groups"],
          cifar["batchnorm_groups"]) == (devices, 64, 8, 1)
  assert cifar["communication"]["data_moving_bytes"] > 0
  assert cifar["communication"]["by_kind"]["all-reduce"]["bytes"] <= (
      cifar["parameter_bytes"] + collectives.SMALL_BYTES * 64)
