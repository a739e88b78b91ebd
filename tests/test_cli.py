"""`python -m mixskd_jax.main` as a user runs it: the command-line and preflight errors are one
line on stderr with exit status 2, within seconds (before any data is loaded or anything
compiled); a smoke run ends with the short summary and no third-party start-up noise."""

import os
import subprocess
import sys
import time

import pytest

from mixskd_jax.run import dataset_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/default.py:smoke"
FAST_S = 15.0  # the checks that run before TensorFlow, JAX's backends or the data load


def user_env(**extra):
  """The environment of a user's shell: no test-only device count or TF log level."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", dataset_check.OFFLINE_ENV)}
  env.update(extra)
  return env


def main(*args, timeout=300, **env):
  """(exit status, stdout, stderr, seconds) of the command run from the repository root."""
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "mixskd_jax.main", *args], cwd=REPO,
                        env=user_env(**env), capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def assert_one_line_error(code, stdout, stderr, starts):
  assert code == 2, stderr[-3000:]
  assert stdout == ""
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith(starts), lines[0]
  assert "Traceback" not in stderr
  return lines[0]


@pytest.mark.parametrize("override,field,suggestion,group", [
    ("--config.batchsize=3", "batchsize", "batch_size", "config"),
    ("--config.optimizer.lr=0.5", "optimizer.lr", "optimizer.learning_rate", "config.optimizer"),
])
def test_unknown_config_field(tmp_path, override, field, suggestion, group):
  code, out, err, seconds = main(SMOKE, f"--workdir={tmp_path / 'run'}", override)
  line = assert_one_line_error(code, out, err, f"Unknown config field '{field}'; did you mean "
                                               f"'{suggestion}'? (valid fields of {group}: ")
  assert "learning_rate" in line if group == "config.optimizer" else "batch_size" in line
  assert seconds < FAST_S
  assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
  code, out, err, seconds = main("--config=configs/nope.py:smoke", f"--workdir={tmp_path}")
  assert_one_line_error(code, out, err, "Config file not found: configs/nope.py (resolved "
                                        f"against the current directory {REPO})")
  assert seconds < FAST_S


def test_workdir_under_a_file(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  code, out, err, seconds = main(SMOKE, f"--workdir={tmp_path / 'file' / 'run'}")
  assert_one_line_error(code, out, err, f"--workdir={tmp_path / 'file' / 'run'} is under a "
                                        f"file: {tmp_path / 'file'} is a file")
  assert seconds < FAST_S


def test_unwritable_workdir(tmp_path):
  if os.geteuid() == 0:  # root writes through permissions: a folder nobody can create in
    workdir = "/proc/mixskd_cli_test/run"
  else:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    workdir = str(locked / "run")
  try:
    code, out, err, seconds = main(SMOKE, f"--workdir={workdir}")
  finally:
    if os.geteuid() != 0:
      (tmp_path / "locked").chmod(0o700)
  assert_one_line_error(code, out, err, f"--workdir={workdir} cannot be created or written")
  assert seconds < FAST_S
  assert not os.path.exists(workdir)


def test_offline_unprepared_dataset(tmp_path):
  """CIFAR-100 not in the data_dir, offline: one line in seconds (tfds retried for 3.5 minutes),
  and neither the data_dir nor the workdir keeps a folder."""
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  data_dir.mkdir()
  code, out, err, seconds = main(
      "--config=configs/cifar100_resnet18_mixskd.py:smoke", f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}", **{dataset_check.OFFLINE_ENV: "1"})
  line = assert_one_line_error(code, out, err, f"Dataset cifar100 is not prepared in tfds "
                                               f"data_dir {data_dir}, and this machine is offline")
  assert "--config.data.data_dir=DIR" in line
  assert seconds < 60
  assert os.listdir(data_dir) == []
  assert not workdir.exists()


NOISE = ("oneDNN", "absl::InitializeLog", "Unable to initialize backend", "differ on disk",
         "orbax", "Orbax", "train/loss=", "steps_per_sec=", "Setting work unit notes",
         "Done: {", "calibration")


@pytest.mark.slow
def test_smoke_run_ends_with_the_summary_and_no_noise(tmp_path):
  workdir = tmp_path / "run"
  code, out, err, _ = main(SMOKE, f"--workdir={workdir}")
  assert code == 0, err[-3000:]
  combined = err + out
  for noise in NOISE:
    assert noise not in combined, noise
  assert "step 4/4 (100.0%)" in err and "eval step 4 (epoch 0.50): top-1 backbone " in err
  summary = out.strip().splitlines()
  assert summary[0].startswith("Finished: 4/4 steps in ")
  assert summary[1].startswith("Test top-1 at step 4: backbone ")
  assert "branch1" in summary[1] and "self_teacher" in summary[1]
  assert summary[2].startswith("Best backbone top-1: ")
  paths = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in summary[3:]}
  assert os.path.isfile(paths["Results"]) and paths["Results"] == str(workdir / "results.json")
  assert os.path.isdir(paths["Checkpoints"])
  assert paths["TensorBoard"] == f"tensorboard --logdir {workdir}"
  assert len(combined.splitlines()) < 20
