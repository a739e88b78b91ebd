"""Multi-host for real: two processes on localhost (4 fake CPU devices each, gloo collectives)
train together, each reading its own slice of every batch through the real input pipeline,
and end with the parameters of one process with 8 devices; only process 0 writes logs."""

import glob
import json
import os
import socket
import subprocess

import numpy as np

from tests.test_resume import command, load, run
from tests.test_resume import prepared_fashion_mnist  # noqa: F401  (autouse: data prepared once)

STEPS = {"num_train_steps": 6, "checkpoint_every_steps": 3}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
  port = free_port()
  workdir = tmp_path / "multi"
  procs = []
  for pid in range(2):
    overrides = {**STEPS, "distributed.initialize": "always",
                 "distributed.coordinator_address": f"localhost:{port}",
                 "distributed.num_processes": 2, "distributed.process_id": pid,
                 "distributed.cpu_collectives": "gloo"}
    procs.append(subprocess.Popen(
        command(workdir, 4, overrides, dump=tmp_path / f"multi{pid}.npz"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  results = json.loads(outputs[0][0].split("RESULTS", 1)[1])
  assert results["processes"] == 2 and results["devices"] == 8 and results["finished"]

  run(tmp_path / "single", 8, STEPS, dump=tmp_path / "single.npz")
  single = load(tmp_path / "single.npz")
  for pid in range(2):
    multi = load(tmp_path / f"multi{pid}.npz")
    assert multi.keys() == single.keys()
    for name in single:
      np.testing.assert_allclose(multi[name], single[name], rtol=1e-4, atol=1e-6, err_msg=name)

  # Process 0 alone writes logs, results and the history; checkpoints are written together
  # (orbax spreads the bytes of replicated arrays over the processes, process 0 commits).
  assert len(glob.glob(f"{workdir}/events.out.tfevents.*")) == 1
  assert sorted(p for p in os.listdir(workdir) if not p.startswith("events.")) == [
      "checkpoints", "config.json", "eval_history.jsonl", "results.json", "train_history.jsonl"]
  with open(workdir / "eval_history.jsonl") as f:  # epoch end and final, each written once
    assert [json.loads(line)["step"] for line in f] == [4, 6]
  with open(workdir / "train_history.jsonl") as f:  # every log_every_steps, and the last step
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(set(steps)) and steps[-1] == 6
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
