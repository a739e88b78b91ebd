"""Multi-host for real: two processes on localhost (fake CPU devices, gloo collectives) train
together, each reading its own slice of every batch through the real input pipeline, and end
with the parameters of one process with 8 devices; only process 0 writes logs. SIGTERM to one
of them stops both at the same step with one checkpoint, and rerunning both resumes exactly."""

import glob
import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from mixskd_jax.run.preemption import PREEMPTED_EXIT_CODE
from tests.test_resume import assert_same_params, checkpoint_steps, command, load, run
from tests.test_resume import prepared_fashion_mnist  # noqa: F401  (autouse: data prepared once)

# Two training processes: the slow tier (pytest --slow).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("subprocess_compile_cache")]

# At lr 0.1 on batches of 16, the float32 rounding by which gloo's all-reduce differs from the
# in-process one (~1e-7 after a step) grows to ~1e-4 within 4 steps (plain CE too): lr 0.01
# keeps the comparison about the processes' slices. 2 images per device: the mix groups of 8
# images span 4 devices, and so the two processes.
STEPS = {"num_train_steps": 6, "checkpoint_every_steps": 3, "optimizer.learning_rate": 0.01}
# Even at lr 0.01 that rounding reaches, on some CPUs, 0.6% of how far 6 steps moved a tensor
# (an Intel Xeon, where the result is the same on every run: a branch conv kernel off by 4.6e-5
# of a 7.9e-3 move, a BatchNorm bias by 7e-6), so each tensor is compared with a tolerance of 5%
# of its largest move. A process reading the wrong slice, or both the same one, replaces half
# of every batch, which changes the updates by tens of percent; the tensors training leaves
# alone (the frozen discriminators) must agree to float32 rounding.
UPDATE_RTOL = 0.05


def assert_same_training(multi, single, init):
  """Every tensor of `multi` equals `single` up to UPDATE_RTOL of its update from `init`."""
  assert multi.keys() == single.keys() == init.keys()
  for name in single:
    moved = float(np.max(np.abs(single[name] - init[name])))
    np.testing.assert_allclose(multi[name], single[name], rtol=1e-5,
                               atol=1e-7 + UPDATE_RTOL * moved, err_msg=name)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, devices, overrides, dump=None):
  """Both processes of one run (gloo on a fresh localhost port); `dump`: a path prefix. Their
  output goes to files: a full pipe would block one process, and the other in a collective."""
  port = free_port()
  procs = []
  for pid in range(2):
    distributed = {"distributed.initialize": "always",
                   "distributed.coordinator_address": f"localhost:{port}",
                   "distributed.num_processes": 2, "distributed.process_id": pid,
                   "distributed.cpu_collectives": "gloo"}
    logs = [open(f"{workdir}.{pid}.{name}", "w+") for name in ("out", "err")]
    proc = subprocess.Popen(command(workdir, devices, {**overrides, **distributed},
                                    dump=dump and f"{dump}{pid}.npz"),
                            stdout=logs[0], stderr=logs[1], text=True)
    proc.logs = logs
    procs.append(proc)
  return procs


def finish(procs, timeout=600):
  """[(returncode, stdout, stderr)] of each process; kills both if one hangs."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for p in procs:
    for f in p.logs:
      f.seek(0)
    outputs.append((p.returncode, p.logs[0].read(), p.logs[1].read()))
    for f in p.logs:
      f.close()
  return outputs


def results_of(stdout):
  return json.loads(stdout.split("RESULTS", 1)[1])


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  workdir = tmp_path / "multi"
  outputs = finish(start_two_processes(workdir, 4, STEPS, dump=tmp_path / "multi"))
  for code, _, err in outputs:
    assert code == 0, err[-3000:]
  results = results_of(outputs[0][1])
  assert results["processes"] == 2 and results["devices"] == 8 and results["finished"]

  run(tmp_path / "single", 8, STEPS, dump=tmp_path / "single.npz",
      dump_init=tmp_path / "init.npz")
  single, init = load(tmp_path / "single.npz"), load(tmp_path / "init.npz")
  for pid in range(2):
    assert_same_training(load(tmp_path / f"multi{pid}.npz"), single, init)

  # Process 0 alone writes logs, results and the history; checkpoints are written together
  # (orbax spreads the bytes of replicated arrays over the processes, process 0 commits).
  assert len(glob.glob(f"{workdir}/events.out.tfevents.*")) == 1
  assert sorted(p for p in os.listdir(workdir) if not p.startswith("events.")) == [
      ".mixskd.lock", "checkpoints", "config.json", "eval_history.jsonl", "results.json",
      "train_history.jsonl"]  # the lock: process 0's (run_guard.py)
  with open(workdir / "eval_history.jsonl") as f:  # epoch end and final, each written once
    assert [json.loads(line)["step"] for line in f] == [4, 6]
  with open(workdir / "train_history.jsonl") as f:  # every log_every_steps, and the last step
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps)) and steps[-1] == 6
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


# 1 device per process (the least work), 6 epochs of 4 steps, a checkpoint every 2: the signal
# comes after the first, JAX notices it within a second, and the processes stop a few steps
# later, well before the end.
PREEMPT = {"num_epochs": 6, "log_every_steps": 1, "checkpoint_every_steps": 2}
PREEMPT_STEPS = 24


def test_sigterm_to_one_process_stops_both_at_one_step_and_both_resume_exactly(tmp_path):
  """JAX's preemption sync (not a Python SIGTERM handler, which would stop the signalled
  process alone and leave the other waiting in the next step's collectives) stops both
  processes after the same step; they save one checkpoint there and exit with the "rerun me"
  status; rerunning both ends bit-identical to an uninterrupted 2-process run."""
  for code, _, err in finish(start_two_processes(tmp_path / "straight", 1, PREEMPT,
                                                 dump=tmp_path / "straight")):
    assert code == 0, err[-3000:]

  workdir = tmp_path / "run"
  procs = start_two_processes(workdir, 1, PREEMPT)
  deadline = time.time() + 300
  while 2 not in checkpoint_steps(workdir) and time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only
  outputs = finish(procs, timeout=300)
  for code, _, err in outputs:
    assert code == PREEMPTED_EXIT_CODE, err[-3000:]
  saved = max(checkpoint_steps(workdir))
  assert 2 <= saved < PREEMPT_STEPS
  for _, out, err in outputs:
    results = results_of(out)
    assert results["step"] == saved and results["preempted"] and not results["finished"]
    assert f"Preempted at step {saved}: checkpoint saved" in err

  for code, out, err in finish(start_two_processes(workdir, 1, PREEMPT,
                                                   dump=tmp_path / "resumed")):
    assert code == 0, err[-3000:]
    assert results_of(out)["steps_this_run"] == PREEMPT_STEPS - saved
  for pid in range(2):
    assert_same_params(load(tmp_path / f"resumed{pid}.npz"), load(tmp_path / f"straight{pid}.npz"))
  with open(workdir / "train_history.jsonl") as f:  # the stop step logged once, none missing
    assert [json.loads(line)["step"] for line in f] == list(range(1, PREEMPT_STEPS + 1))
