"""prepare_data: process 0 prepares the dataset, the others wait for it and then open it."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mixskd_jax.config.schema import base_config
from mixskd_jax.data import sources
from mixskd_jax.run.data_prep import prepare_data
from tests import fake_imagenet

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def recorded(monkeypatch, fail=False):
  """Replaces sources.get_builder and the barrier by recorders; returns (events, barrier)."""
  events = []

  def get_builder(data_config):
    events.append("get_builder")
    if fail:
      raise sources.DatasetUnavailableError("no tars")
  monkeypatch.setattr(sources, "get_builder", get_builder)
  return events, lambda name: events.append(f"barrier {name}")


@pytest.mark.parametrize("index, expected", [
  (0, ["get_builder", "barrier mixskd_jax.prepare_data:imagenet2012"]),
  (1, ["barrier mixskd_jax.prepare_data:imagenet2012", "get_builder"])])
def test_process_zero_prepares_before_the_barrier_the_others_after(monkeypatch, index, expected):
  events, barrier = recorded(monkeypatch)
  c = base_config()
  c.data.name = "imagenet2012"
  prepare_data(c.data, process_index=index, process_count=4, barrier=barrier)
  assert events == expected


def test_a_failure_of_process_zero_is_raised_after_the_barrier(monkeypatch):
  events, barrier = recorded(monkeypatch, fail=True)
  with pytest.raises(sources.DatasetUnavailableError, match="no tars"):
    prepare_data(base_config().data, process_index=0, process_count=2, barrier=barrier)
  assert events == ["get_builder", "barrier mixskd_jax.prepare_data:cifar100"]


def test_one_process_prepares_without_a_barrier(monkeypatch):
  events, barrier = recorded(monkeypatch)
  prepare_data(base_config().data, process_index=0, process_count=1, barrier=barrier)
  assert events == ["get_builder"]


CHILD = """
import json, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, data_dir, manual_dir, log = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
import tensorflow_datasets as tfds
from mixskd_jax.config.schema import base_config
from mixskd_jax.run.data_prep import prepare_data

prepare = tfds.core.DatasetBuilder.download_and_prepare
def logged(self, *args, **kwargs):
  start = time.time()
  prepare(self, *args, **kwargs)
  with open(log, "a") as f:
    f.write(json.dumps({"pid": pid, "prepared": [start, time.time()]}) + "\\n")
tfds.core.DatasetBuilder.download_and_prepare = logged
c = base_config()
c.data.update(dict(name="imagenet2012", data_dir=data_dir, manual_dir=manual_dir))
prepare_data(c.data)
with open(log, "a") as f:
  f.write(json.dumps({"pid": pid, "ready": time.time()}) + "\\n")
"""


@pytest.mark.slow
def test_two_processes_prepare_once(tmp_path):
  """Real jax.distributed processes on one shared data_dir: only process 0 builds."""
  manual = tmp_path / "manual"
  manual.mkdir()
  fake_imagenet.write_tars(str(manual))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  log = tmp_path / "log.jsonl"
  env = {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
  procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(pid), str(port),
                             str(tmp_path / "tfds"), str(manual), str(log)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  with open(log) as f:
    events = [json.loads(line) for line in f]
  prepared = [e for e in events if "prepared" in e]
  ready = {e["pid"]: e["ready"] for e in events if "ready" in e}
  assert [e["pid"] for e in prepared] == ["0"]
  assert ready["1"] >= prepared[0]["prepared"][1]  # process 1 waited for the build
