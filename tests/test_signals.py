"""Ctrl-C (SIGINT) to `python -m mixskd_jax.main`, in fresh processes, as a terminal sends it.

During the first compile it ends the command at once with status 130 and one line (it used to
end in "Fatal Python error: Segmentation fault": a KeyboardInterrupt out of jaxlib's compile
left the compile thread running under the interpreter's exit). During training the first
Ctrl-C is a SIGTERM: the run saves the step it stopped at and exits with 75, and the same
command finishes it; a second Ctrl-C exits with 130 at once."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mixskd_jax.run import dataset_check
from mixskd_jax.run.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
from tests.test_resume import checkpoint_steps
from tests.test_resume import prepared_fashion_mnist  # noqa: F401  (autouse: data prepared once)

# Training commands in fresh processes: the slow tier (pytest --slow).
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
# 8 steps an epoch (an evaluation each), a progress line every step, no periodic checkpoint: the
# step a Ctrl-C stops at is the only one saved.
ARGS = ["--config=configs/default.py:smoke", f"--config.num_train_steps={STEPS}",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000"]
PROMPT_S = 5.0  # from the signal to the exit (0.1-0.4 s measured on 2 busy cores)
WAIT_S = 240.0  # for a line of a run (start-up and compile: 10-30 s on 2 busy cores)
STOPPING = "Ctrl-C: stopping after this step"
INTERRUPTED = "Interrupted (Ctrl-C): exiting now with status 130"


def _default_sigint():
  # A shell script's `cmd &` (or a CI runner) may leave SIGINT ignored, and an ignored signal
  # stays ignored in children; a terminal's Ctrl-C reaches a command with the default action.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
  """A running `python -m mixskd_jax.main`; its stderr is read line by line on a thread."""

  def __init__(self, workdir, **env):
    # As a user's shell has it: no test-only device count or log level, and no compilation
    # cache unless `env` names one (a cache hit would leave nothing to interrupt).
    environ = {k: v for k, v in os.environ.items()
               if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "JAX_COMPILATION_CACHE_DIR")}
    environ.update({dataset_check.OFFLINE_ENV: "1"}, **env)
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "mixskd_jax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO,
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)
    self.lines = []
    self._changed = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      with self._changed:
        self.lines.append(line)
        self._changed.notify_all()
    with self._changed:
      self._changed.notify_all()

  @property
  def stderr(self):
    return "".join(self.lines)

  def wait_for(self, text):
    """Waits until a stderr line contains `text`; fails if the command exits first."""
    deadline = time.monotonic() + WAIT_S
    with self._changed:
      while not any(text in line for line in self.lines):
        assert self.proc.poll() is None or self._reader.is_alive(), (
            f"exited ({self.proc.returncode}) before {text!r}:\n{self.stderr[-3000:]}")
        assert time.monotonic() < deadline, f"no {text!r} in {WAIT_S} s:\n{self.stderr[-3000:]}"
        self._changed.wait(0.1)

  def interrupt(self):
    """Sends SIGINT; returns the stderr seen before it."""
    with self._changed:
      before = self.stderr
    self.proc.send_signal(signal.SIGINT)
    return before

  def finish(self):
    """(exit status, seconds from now to the exit)."""
    t0 = time.monotonic()
    code = self.proc.wait(timeout=WAIT_S)
    seconds = time.monotonic() - t0
    self._reader.join(10)
    self.proc.stdout.read()
    return code, seconds


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache for the runs that are stopped in training: their
  reruns skip the compiles (26 s -> 11 s a run on 2 busy cores); what they test starts after
  the compiles. The test of a Ctrl-C during the compile compiles for real."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def assert_clean(stderr):
  for crash in ("Segmentation fault", "Fatal Python error", "Traceback", "KeyboardInterrupt"):
    assert crash not in stderr, stderr[-3000:]


def test_ctrl_c_during_the_first_compile_exits_at_once(tmp_path):
  run = Command(tmp_path / "run", JAX_LOG_COMPILES="1")  # JAX names what it compiles
  run.wait_for("Compiling jit(train_step)")
  time.sleep(0.5)  # into XLA's compile of the train step (4-12 s on this machine)
  before = run.interrupt()
  code, seconds = run.finish()
  assert "Finished XLA compilation of jit(train_step)" not in before  # it was compiling
  assert code == INTERRUPTED_EXIT_CODE, run.stderr[-3000:]
  assert seconds < PROMPT_S
  assert_clean(run.stderr)
  assert run.stderr.count(INTERRUPTED) == 1
  assert not checkpoint_steps(tmp_path / "run")


def test_one_ctrl_c_saves_the_step_and_the_same_command_finishes(tmp_path, compile_cache):
  workdir = tmp_path / "run"
  run = Command(workdir, JAX_COMPILATION_CACHE_DIR=compile_cache)
  run.wait_for(f"step 10/{STEPS}")
  run.interrupt()
  code, seconds = run.finish()
  assert code == PREEMPTED_EXIT_CODE, run.stderr[-3000:]
  assert seconds < PROMPT_S + 5  # a step, its checkpoint and the exit
  assert_clean(run.stderr)
  assert run.stderr.count(STOPPING) == 1
  saved = int(re.search(r"Preempted at step (\d+): checkpoint saved", run.stderr)[1])
  assert 10 <= saved < STEPS and checkpoint_steps(workdir) == [saved]

  again = Command(workdir, JAX_COMPILATION_CACHE_DIR=compile_cache)
  code, _ = again.finish()
  assert code == 0, again.stderr[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["finished"] and results["steps_this_run"] == STEPS - saved


def test_a_second_ctrl_c_exits_at_once(tmp_path, compile_cache):
  run = Command(tmp_path / "run", JAX_COMPILATION_CACHE_DIR=compile_cache)
  run.wait_for(f"step 10/{STEPS}")
  run.interrupt()
  run.wait_for(STOPPING)  # the first one is handled: the run is finishing its step
  run.interrupt()  # before its save and exit are done (>= 0.3 s), or in them: 130 either way
  code, seconds = run.finish()
  assert code == INTERRUPTED_EXIT_CODE, run.stderr[-3000:]
  assert seconds < PROMPT_S
  assert_clean(run.stderr)
  assert run.stderr.count(STOPPING) == 1 and run.stderr.count(INTERRUPTED) == 1


def _deliver(sig):
  """Raises `sig` in this process and runs its Python handler (within a few bytecodes)."""
  signal.raise_signal(sig)
  for _ in range(100):
    time.sleep(0.001)


def test_in_a_notebook_ctrl_c_stays_a_keyboard_interrupt_outside_the_loop():
  """A library user (Python's default SIGINT handler): KeyboardInterrupt before the first
  step, the SIGTERM-like stop after it, KeyboardInterrupt again on a second Ctrl-C, and the
  handlers as they were after the loop; in another thread nothing is installed."""
  from mixskd_jax.run.preemption import Preemption  # pylint: disable=import-outside-toplevel
  saved = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    term = signal.getsignal(signal.SIGTERM)
    with Preemption(0) as preemption:
      with pytest.raises(KeyboardInterrupt):  # the first step (its compile): at once
        _deliver(signal.SIGINT)
      assert not preemption.should_stop(1)
      _deliver(signal.SIGINT)  # now a stop after the step
      assert preemption.should_stop(2)
      with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is term

    seen = []

    def in_a_thread():
      with Preemption(0) as other:
        seen.append((signal.getsignal(signal.SIGINT), other.should_stop(1)))
    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [(signal.default_int_handler, False)]
  finally:
    signal.signal(signal.SIGINT, saved)
