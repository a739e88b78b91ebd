"""Preemption and resume, in fresh processes: a run killed with SIGKILL (or stopped with
SIGTERM, which saves first) and restarted with the same command ends with exactly the
parameters of an uninterrupted run; a checkpoint restores onto a different number of devices
and training continues."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mixskd_jax.data import sources
from mixskd_jax.run.preemption import PREEMPTED_EXIT_CODE
from tests.training_configs import tiny_config

RUNNER = os.path.join(os.path.dirname(__file__), "train_runner.py")

# Training runs in fresh processes: the slow tier (pytest --slow); they share one compilation
# cache (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compile_cache")]


@pytest.fixture(scope="module", autouse=True)
def prepared_fashion_mnist():
  """Prepare the dataset once, before several processes want it at the same time."""
  sources.get_builder(tiny_config().data)


def command(workdir, devices, overrides, dump=None, dump_init=None):
  cmd = [sys.executable, RUNNER, "--workdir", str(workdir), "--devices", str(devices),
         "--overrides", json.dumps(overrides)]
  return (cmd + (["--dump", str(dump)] if dump else [])
          + (["--dump_init", str(dump_init)] if dump_init else []))


def run(*args, **kwargs):
  proc = subprocess.run(command(*args, **kwargs), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def checkpoint_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")
                if os.path.basename(p).isdigit())


def interrupt(workdir, devices, overrides, sig, after_checkpoint):
  """Starts a run and sends `sig` once checkpoint `after_checkpoint` is complete."""
  proc = subprocess.Popen(command(workdir, devices, overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while after_checkpoint not in checkpoint_steps(workdir):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=300)
  return proc.returncode, stderr


def load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


# 10 epochs of 4 steps, checkpoints every 4 steps: the signals land mid-training.
LONG = {"num_epochs": 10, "log_every_steps": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight")
  run(out / "work", 2, LONG, dump=out / "params.npz")
  return load(out / "params.npz")


def assert_same_params(actual, expected):
  assert actual.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_sigkill_then_same_command_ends_exactly_like_an_uninterrupted_run(tmp_path,
                                                                          uninterrupted):
  code, _ = interrupt(tmp_path / "killed", 2, LONG, signal.SIGKILL, after_checkpoint=8)
  assert code == -signal.SIGKILL
  assert not os.path.exists(tmp_path / "killed" / "results.json")
  assert max(checkpoint_steps(tmp_path / "killed")) < 40
  proc = run(tmp_path / "killed", 2, LONG, dump=tmp_path / "resumed.npz")
  results = json.loads(proc.stdout.split("RESULTS", 1)[1])
  assert results["finished"] and results["steps_this_run"] < 40
  assert_same_params(load(tmp_path / "resumed.npz"), uninterrupted)


def test_sigterm_saves_its_step_and_exits_cleanly(tmp_path, uninterrupted):
  """SIGTERM: a checkpoint at the step it stopped, and the documented "rerun me" status."""
  code, stderr = interrupt(tmp_path / "run", 2, LONG, signal.SIGTERM, after_checkpoint=4)
  assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
  saved = max(checkpoint_steps(tmp_path / "run"))
  assert f"Preempted at step {saved}: checkpoint saved" in stderr and saved < 40
  proc = run(tmp_path / "run", 2, LONG, dump=tmp_path / "resumed.npz")
  assert json.loads(proc.stdout.split("RESULTS", 1)[1])["steps_this_run"] == 40 - saved
  assert_same_params(load(tmp_path / "resumed.npz"), uninterrupted)


def test_resume_on_another_device_count(tmp_path):
  """8 steps on 2 devices, then the same workdir on 4 devices for one more step, equals 9
  steps on 2 devices up to float32 rounding (pairs stay in 2 shards in both)."""
  common = {"num_epochs": 10, "objective.mix_groups": 2}
  run(tmp_path / "run", 2, {**common, "num_train_steps": 8})
  proc = run(tmp_path / "run", 4, {**common, "num_train_steps": 9}, dump=tmp_path / "moved.npz")
  results = json.loads(proc.stdout.split("RESULTS", 1)[1])
  assert results["devices"] == 4 and results["steps_this_run"] == 1 and results["step"] == 9
  run(tmp_path / "straight", 2, {**common, "num_train_steps": 9},
      dump=tmp_path / "straight.npz")
  moved, straight = load(tmp_path / "moved.npz"), load(tmp_path / "straight.npz")
  for name in straight:
    np.testing.assert_allclose(moved[name], straight[name], rtol=1e-4, atol=1e-6, err_msg=name)
