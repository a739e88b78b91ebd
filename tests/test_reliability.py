"""What a run does when things go wrong, each with its exact expected outcome:

- SIGKILL at 10 seeded points (between steps, inside checkpoint saves, between Orbax's commit
  and the digest, inside evaluations, while appending history, inside a resume's restore),
  5 kills per workdir: rerunning the same command ends with the train state (parameters
  and optimizer state) and the evaluation history of an uninterrupted run, bit for bit;
- damaged checkpoints (a flipped bit, truncated or deleted files, missing metadata, an empty
  step directory, ...): the newest intact one is resumed, the damaged one moved aside;
- a second trainer on a workdir in use, or a changed config on resume: refused in one line;
- a disk that fills during a save, an immutable checkpoints folder: one line, the right exit
  status, within seconds, and the older checkpoints resume;
- an evaluation that fails after its step was checkpointed loses no training.

Bad config values: tests/test_config_validation.py; Ctrl-C: tests/test_signals.py; divergence:
tests/test_train_loop.py.
"""

import concurrent.futures
import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax import config as config_lib
from mixskd_jax.run import run_guard
from mixskd_jax.store import checkpoint_digest
from mixskd_jax.store.checkpoint import DAMAGED_DIR, Checkpoints
from tests.test_cli import REPO, main as cli
from tests.test_resume import assert_same_params, command, load, prepared_fashion_mnist  # noqa: F401

KILL_RUNNER = os.path.join(os.path.dirname(__file__), "kill_runner.py")
LONG = {"num_epochs": 10, "log_every_steps": 1}  # 40 steps, a checkpoint and an eval every 4

# The ~25 training processes below compile the same programs: once (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("subprocess_compile_cache")


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints, on a small pytree (the default tier).

def _toy_state(value):
  rng = np.random.default_rng(value)
  return {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
          "opt": {"m": jnp.asarray(rng.normal(size=(300,)), jnp.float32)},
          "step": jnp.int32(value)}


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("three") / "work"
  checkpoints = Checkpoints(workdir, keep=3)
  for step in (1, 2, 3):
    checkpoints.save(step, _toy_state(step))
  checkpoints.close()
  return workdir


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/default/**/d/*", recursive=True)]
  return max(files, key=os.path.getsize)


def _flip_a_bit(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


DAMAGE = {
    "bit flip in array data": (_flip_a_bit, "SHA-256 mismatch"),
    "truncated array file": (lambda d: os.truncate(_largest_data_file(d), 100), "bytes"),
    "deleted array file": (lambda d: os.remove(_largest_data_file(d)), "is missing"),
    "deleted _METADATA": (lambda d: os.remove(f"{d}/default/_METADATA"),
                          "default/_METADATA is missing"),
    "deleted OCDBT manifest": (lambda d: os.remove(f"{d}/default/manifest.ocdbt"),
                               "default/manifest.ocdbt is missing"),
    "truncated array metadata": (
        lambda d: os.truncate(f"{d}/default/array_metadatas/process_0", 10), "has 10 bytes"),
    "emptied item directory": (
        lambda d: (shutil.rmtree(f"{d}/default"), os.mkdir(f"{d}/default")), "is missing"),
    "unreadable digest": (
        lambda d: open(f"{d}/{checkpoint_digest.DIGEST_FILE}", "w").write("{"), "unreadable"),
    "extra file": (lambda d: open(f"{d}/default/stray", "w").write("x"), "was not part of it"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(
    tmp_path, three_checkpoints, kind):
  damage, reason = DAMAGE[kind]
  workdir = tmp_path / "work"
  shutil.copytree(three_checkpoints, workdir)
  damage(str(workdir / "checkpoints" / "3"))
  checkpoints = Checkpoints(workdir, keep=3)
  restored = checkpoints.restore_or_keep(_toy_state(0))
  checkpoints.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, _toy_state(2))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
  assert os.listdir(workdir / DAMAGED_DIR) == ["3"]  # moved whole, not deleted
  assert reason in (workdir / DAMAGED_DIR / "3" / "DAMAGE.txt").read_text()


def test_an_empty_directory_named_as_a_newer_step_is_moved_aside(tmp_path, three_checkpoints):
  workdir = tmp_path / "work"
  shutil.copytree(three_checkpoints, workdir)
  os.mkdir(workdir / "checkpoints" / "9")
  checkpoints = Checkpoints(workdir, keep=3)
  restored = checkpoints.restore_or_keep(_toy_state(0))
  assert checkpoints.latest_step() == 3
  checkpoints.save(4, _toy_state(4))  # and saving goes on after it
  checkpoints.close()
  assert int(restored["step"]) == 3 and os.listdir(workdir / DAMAGED_DIR) == ["9"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3", "4"]


def test_missing_commit_markers_are_still_tolerated(tmp_path, three_checkpoints):
  workdir = tmp_path / "work"
  shutil.copytree(three_checkpoints, workdir)
  for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
    os.remove(workdir / "checkpoints" / "3" / name)
  checkpoints = Checkpoints(workdir, keep=3)
  assert int(checkpoints.restore_or_keep(_toy_state(0))["step"]) == 3
  checkpoints.close()
  assert not os.path.exists(workdir / DAMAGED_DIR)


def test_every_checkpoint_damaged_is_an_error_that_keeps_them_all(tmp_path, three_checkpoints):
  from mixskd_jax.store.checkpoint import NoUsableCheckpointError
  workdir = tmp_path / "work"
  shutil.copytree(three_checkpoints, workdir)
  for step in (1, 2, 3):
    _flip_a_bit(workdir / "checkpoints" / str(step))
  checkpoints = Checkpoints(workdir, keep=3)
  with pytest.raises(NoUsableCheckpointError, match="Every checkpoint"):
    checkpoints.restore_or_keep(_toy_state(0))
  checkpoints.close()
  assert sorted(os.listdir(workdir / DAMAGED_DIR)) == ["1", "2", "3"]


def test_an_intact_checkpoint_of_another_model_is_not_called_damaged(tmp_path, three_checkpoints):
  from mixskd_jax.store.checkpoint import CheckpointMismatchError
  workdir = tmp_path / "work"
  shutil.copytree(three_checkpoints, workdir)
  other = {**_toy_state(0), "w": jnp.zeros((32, 64))}
  checkpoints = Checkpoints(workdir, keep=3)
  with pytest.raises(CheckpointMismatchError, match="is intact but does not fit"):
    checkpoints.restore_or_keep(other)
  checkpoints.close()
  assert not os.path.exists(workdir / DAMAGED_DIR)


# ---------------------------------------------------------------------------------------------
# One owner per workdir; the config a run resumes under (the default tier).

def test_a_second_lock_on_a_workdir_is_refused_naming_its_holder(tmp_path):
  with run_guard.WorkdirLock(str(tmp_path)):
    with pytest.raises(run_guard.WorkdirBusyError,
                       match=rf"is in use by another trainer \(pid {os.getpid()} on "):
      run_guard.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(run_guard.WorkdirBusyError):
      run_guard.WorkdirLock(str(tmp_path)).check()
  run_guard.WorkdirLock(str(tmp_path)).check()  # released: free again, and check takes nothing
  with run_guard.WorkdirLock(str(tmp_path)):
    pass


def _stored_run(workdir, config):
  os.makedirs(workdir / "checkpoints" / "8")
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))


def test_resuming_under_another_config_is_refused_naming_the_fields(tmp_path):
  config = config_lib.base_config()
  _stored_run(tmp_path, config)
  changed = config_lib.base_config()
  changed.optimizer.learning_rate = 0.3
  changed.objective.variant = "reference_cifar"
  changed.log_every_steps = 7  # free to change: not named
  with pytest.raises(run_guard.ConfigChangedError) as error:
    run_guard.check_resume(str(tmp_path), changed, has_checkpoints=True)
  message = str(error.value)
  assert "\n" not in message and "log_every_steps" not in message
  assert "objective.variant \"full\" -> \"reference_cifar\"" in message
  assert "optimizer.learning_rate 0.1 -> 0.3" in message
  assert "--config.resume_policy=allow_changes" in message
  changed.resume_policy = "allow_changes"
  run_guard.check_resume(str(tmp_path), changed, has_checkpoints=True)
  free = config_lib.base_config()
  free.checkpoint_every_steps, free.data.data_dir = 5, "/elsewhere"
  run_guard.check_resume(str(tmp_path), free, has_checkpoints=True)
  run_guard.check_resume(str(tmp_path), changed, has_checkpoints=False)  # nothing to resume


def test_a_field_added_after_the_run_was_saved_is_no_change_at_its_default(tmp_path):
  """A workdir saved before a library upgrade added a field resumes when the new field is at
  its default (it trains what the run trained), and is refused when it is not."""
  config = config_lib.base_config()
  _stored_run(tmp_path, config)
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["objective"]["temperature"], stored["seed"]  # as if added since
  (tmp_path / "config.json").write_text(json.dumps(stored))
  run_guard.check_resume(str(tmp_path), config_lib.base_config(), has_checkpoints=True)
  changed = config_lib.base_config()
  changed.objective.temperature = 4.0
  with pytest.raises(run_guard.ConfigChangedError, match=r"objective\.temperature \(absent\) "
                     r"-> 4\.0"):
    run_guard.check_resume(str(tmp_path), changed, has_checkpoints=True)


# ---------------------------------------------------------------------------------------------
# SIGKILL anywhere: the same command ends like an uninterrupted run (the slow tier).

def _kill_plan(seed=0):
  """Two chains (workdirs) of five kills each: every site at least once, saves and evaluations
  three and two times, the points within each site drawn from a seeded generator."""
  rng = random.Random(seed)
  sites = ["save", "eval", "digest", "step", "save", "history", "restore", "eval", "save",
           "step"]
  plan = []
  for site in sites:
    k = rng.randint(3, 30) if site == "step" else rng.randint(1, 2)
    delay = {"save": rng.uniform(0.0, 0.15), "eval": rng.uniform(0.0, 0.1),
             "restore": rng.uniform(0.0, 0.3)}.get(site, 0.0)
    plan.append(f"{site}:{k}:{delay:.3f}")
  return [plan[i::2] for i in range(2)]


def _workdir_outcome(workdir):
  with open(f"{workdir}/eval_history.jsonl") as f:
    evals = [json.loads(line) for line in f]
  with open(f"{workdir}/train_history.jsonl") as f:
    logged = [json.loads(line)["step"] for line in f]
  return evals, logged


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory):
  out = tmp_path_factory.mktemp("straight")
  proc = subprocess.run(command(out / "work", 1, LONG, dump=out / "state.npz") + ["--dump_all"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out / "work", load(out / "state.npz")


def _run_chain(workdir, kills, dump):
  """Each kill in turn on the same workdir, then the plain command; the exit statuses."""
  codes = []
  for kill in kills:
    proc = subprocess.run([sys.executable, KILL_RUNNER, kill] + command(workdir, 1, LONG)[2:],
                          capture_output=True, text=True, timeout=600)
    codes.append((kill, proc.returncode, proc.stderr[-2000:]))
  proc = subprocess.run(command(workdir, 1, LONG, dump=dump) + ["--dump_all"],
                        capture_output=True, text=True, timeout=600)
  codes.append(("final", proc.returncode, proc.stderr[-2000:]))
  return codes


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_rerun_ends_bit_identical(tmp_path, uninterrupted_long):
  straight_workdir, straight = uninterrupted_long
  chains = _kill_plan(seed=0)
  assert sum(map(len, chains)) >= 10
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two cores
    outcomes = list(pool.map(lambda i: _run_chain(tmp_path / f"chain{i}", chains[i],
                                                  tmp_path / f"state{i}.npz"),
                             range(len(chains))))
  for i, codes in enumerate(outcomes):
    *killed, final = codes
    for kill, code, stderr in killed:
      assert code == -signal.SIGKILL, (kill, code, stderr)  # every planned kill landed
    assert final[1] == 0, final
    assert_same_params(load(tmp_path / f"state{i}.npz"), straight)
    assert _workdir_outcome(tmp_path / f"chain{i}") == _workdir_outcome(straight_workdir)


@pytest.mark.slow
def test_a_damaged_checkpoint_of_a_real_run_resumes_bit_identical(tmp_path, uninterrupted_long):
  straight_workdir, straight = uninterrupted_long
  workdir = tmp_path / "work"
  shutil.copytree(straight_workdir, workdir)
  os.remove(workdir / "results.json")
  _flip_a_bit(workdir / "checkpoints" / "40")
  proc = subprocess.run(command(workdir, 1, LONG, dump=tmp_path / "state.npz") + ["--dump_all"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Checkpoint 40 is damaged" in proc.stderr and os.listdir(workdir / DAMAGED_DIR) == ["40"]
  results = json.loads(proc.stdout.split("RESULTS", 1)[1])
  assert results["steps_this_run"] == 4  # from checkpoint 36
  assert_same_params(load(tmp_path / "state.npz"), straight)


# ---------------------------------------------------------------------------------------------
# Two trainers, a full disk, an immutable folder, a failing evaluation (the slow tier).

@pytest.mark.slow
def test_a_second_trainer_on_a_workdir_in_use_is_refused_at_once(tmp_path):
  workdir = tmp_path / "work"
  first = subprocess.Popen(command(workdir, 1, {"num_epochs": 200}), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not glob.glob(f"{workdir}/checkpoints/4"):
      assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
      time.sleep(0.1)
    # The first trainer, stopped, still holds the workdir; stopped, it no longer competes
    # with the second for the cores, so the second's time is its own start-up and refusal.
    first.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    second = subprocess.run(command(workdir, 1, {"num_epochs": 200}), capture_output=True,
                            text=True, timeout=300)
    seconds = time.monotonic() - t0
  finally:
    first.kill()
    first.communicate()
  assert second.returncode != 0
  assert f"is in use by another trainer (pid {first.pid} on " in second.stderr
  # Refused before any data, checkpoint or compile: none of their lines, and no longer than
  # the imports take on a loaded machine.
  for later in ("Training", "Restored checkpoint", "Compiled and ran"):
    assert later not in second.stderr, later
  assert seconds < 60
  assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 200


def _limit_file_size(max_bytes):
  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  return limit


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes(tmp_path):
  """A file-size limit (the way to fill a disk without root) makes checkpoint 4's large array
  file fail: exit 74, one line naming the cause and the intact checkpoint 2, no traceback.
  First, on the same workdir, an immutable checkpoints folder is refused up front."""
  workdir = str(tmp_path / "work")
  args = ("--config=configs/default.py:smoke", f"--workdir={workdir}")
  cache = {"MIXSKD_ASSUME_OFFLINE": "1",
           "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"]}
  assert cli(*args, "--config.num_train_steps=2", **cache)[0] == 0
  _immutable_checkpoints_folder_is_refused_before_training(workdir, args, cache)
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "mixskd_jax.main", *args], cwd=REPO,
                        env={**os.environ, "MIXSKD_ASSUME_OFFLINE": "1"}, capture_output=True,
                        text=True, timeout=300, preexec_fn=_limit_file_size(200_000))
  seconds = time.monotonic() - t0
  assert proc.returncode == 74, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "Could not write" in line]
  assert len(errors) == 1 and "File too large" in errors[0], proc.stderr[-3000:]
  assert "checkpoint 2 is intact" in errors[0]
  assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr
  assert seconds < 120
  code, stdout, stderr, _ = cli(*args, **cache)
  assert code == 0, stderr[-3000:]
  assert json.loads(open(f"{workdir}/results.json").read())["steps_this_run"] == 2


def _chattr(flag, path):
  if shutil.which("chattr") is None:
    return False
  return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def _immutable_checkpoints_folder_is_refused_before_training(workdir, args, env):
  """An immutable checkpoints folder (where `chattr +i` is permitted: root on ext4/xfs): exit 2
  in seconds, one line, instead of failing at the first save (or hanging, as once seen)."""
  if not _chattr("+i", f"{workdir}/checkpoints"):
    warnings.warn("chattr +i is not permitted here: the immutable-folder case is not checked")
    return
  try:
    code, _, stderr, seconds = cli(*args, **env)
  finally:
    _chattr("-i", f"{workdir}/checkpoints")
  assert code == 2 and seconds < 20, stderr[-3000:]
  assert stderr.strip().splitlines() == [
      f"--workdir={workdir} cannot be created or written (Operation not permitted in "
      f"{workdir}/checkpoints): choose a --workdir you can write to, or make "
      f"{workdir}/checkpoints writable."]


@pytest.mark.slow
def test_a_failing_evaluation_keeps_its_step_checkpointed_and_the_rerun_evaluates_it(
    tmp_path, monkeypatch):
  from mixskd_jax.run.loop import Trainer
  from tests.training_configs import tiny_config
  workdir = str(tmp_path / "work")
  original = Trainer.evaluate

  def broken(self, state):
    raise RuntimeError("the evaluation broke")

  monkeypatch.setattr(Trainer, "evaluate", broken)
  with pytest.raises(RuntimeError, match="the evaluation broke"):
    Trainer(tiny_config({"num_train_steps": 8}), workdir).run()
  assert os.path.isdir(f"{workdir}/checkpoints/4")  # saved before the evaluation failed
  monkeypatch.setattr(Trainer, "evaluate", original)
  results = Trainer(tiny_config({"num_train_steps": 8}), workdir).run()
  assert results["steps_this_run"] == 4
  assert [h["step"] for h in results["history"]] == [4, 8]  # step 4 evaluated first
