"""The guides' shell commands are commands their programs accept. Most would run for minutes to
days, so each `python -m` command's flags are parsed by the program's own flags, stopping
before its `main` (and a training config must pass the config's checks; tests/doc_commands.py);
the cheap ones run, and the two-process example runs for real in the slow tier."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest

from experiments import protocol
from tests.doc_blocks import ROOT, doc_block, read_page
from tests.doc_commands import parse_command, python_commands, shell_lines

TRAINING = "docs/training.md"
PODS = "docs/pods.md"


def only_command(page, name):
  (words,) = python_commands(doc_block(page, name))
  return words


# ---------------------------------------------------------------------------------------------
# docs/training.md

def test_default_training_command_trains_the_offline_default():
  parsed = parse_command(only_command(TRAINING, "default-train"))
  assert parsed["flags"]["workdir"] == "/tmp/mixskd_default"
  assert parsed["config"]["data"]["name"] == "fashion_mnist"
  assert parsed["config"]["model"]["name"] == "small_resnet"


def test_configs_are_listed_and_named_without_a_checkout():
  """The listing names every config; the smoke command, with the path the configs command
  prints substituted as the shell would, parses into a smoke run of the default."""
  listing, train = shell_lines(doc_block(TRAINING, "no-checkout"))
  assert shlex.split(listing) == ["python", "-m", "mixskd_jax.configs"]
  names = subprocess.run([sys.executable, "-m", "mixskd_jax.configs"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
  assert "default " in names and "cifar100_resnet18_mixskd " in names
  inner = "$(python -m mixskd_jax.configs default)"
  assert inner in train
  path = subprocess.run([sys.executable, "-m", "mixskd_jax.configs", "default"], cwd=ROOT,
                        check=True, capture_output=True, text=True, timeout=120).stdout.strip()
  parsed = parse_command(shlex.split(train.replace(inner, path)))
  assert parsed["config"]["data"]["name"] == "fashion_mnist"
  assert parsed["config"]["num_train_steps"] > 0  # :smoke


# ---------------------------------------------------------------------------------------------
# docs/pods.md

def two_process_block(port=12345, workdir="/tmp/two_hosts"):
  block = doc_block(PODS, "two-processes")
  for old, new in (("localhost:12345", f"localhost:{port}"), ("/tmp/two_hosts", workdir)):
    assert old in block
    block = block.replace(old, new)
  return block


def test_two_process_commands_make_one_two_process_run():
  (words,) = python_commands(two_process_block())
  assert words[-1] == "&" and "--config.distributed.process_id=$i" in words
  for i in (0, 1):
    config = parse_command([w.replace("$i", str(i)) for w in words[:-1]])["config"]
    assert config["distributed"] == {
        "initialize": "always", "coordinator_address": "localhost:12345", "num_processes": 2,
        "process_id": i, "local_device_ids": None, "cpu_collectives": "gloo"}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_example_runs(tmp_path, subprocess_compile_cache):
  """The block itself, in bash, on a free port and a fresh workdir: both processes finish the
  smoke run together. `python` is this interpreter, as in an activated venv."""
  del subprocess_compile_cache  # the environment already points the processes at it
  workdir = tmp_path / "two_hosts"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  os.symlink(sys.executable, bin_dir / "python")
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
         "MIXSKD_ASSUME_OFFLINE": "1"}
  proc = subprocess.Popen(["bash", "-c", two_process_block(free_port(), str(workdir))],
                          cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    out, _ = proc.communicate(timeout=540)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  assert proc.returncode == 0, out[-3000:]
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert results["finished"], out[-3000:]


# ---------------------------------------------------------------------------------------------
# docs/checkpoints.md (the probe, the transfer command and the export commands are checked in
# test_transfer.py, test_transfer_protocol.py and test_export_torch.py)

def test_fine_tune_source_command_trains_a_plain_model():
  source = python_commands(doc_block("docs/checkpoints.md", "fine-tune"))[0]
  parsed = parse_command(source)
  assert parsed["flags"]["workdir"] == "/tmp/source"
  assert parsed["config"]["model"]["mixskd"] is False


def test_fair_transfer_suite_command_names_the_suite():
  parsed = parse_command(only_command("docs/checkpoints.md", "transfer-suite"))
  assert parsed["flags"]["suite"] == "fashion_mnist_transfer_fair"
  assert parsed["flags"]["suite"] in protocol.SUITES


# ---------------------------------------------------------------------------------------------
# docs/baselines.md and docs/backbones.md

def test_method_token_command_trains_cutmix():
  config = parse_command(only_command("docs/baselines.md", "method-token"))["config"]
  assert config["method"] == "cutmix" and config["model"]["mixskd"] is False


def test_comparison_suite_commands_name_real_suites_and_fields():
  commands = python_commands(doc_block("docs/baselines.md", "suites"))
  assert len(commands) == 4
  for words in commands:
    parsed = parse_command(words)
    assert parsed["flags"]["suite"] in protocol.SUITES, words
    for override in parsed["flags"].get("set", []):
      assert override == "data.data_dir=/data/tfds"


def test_vit_commands_train_mixskd_and_its_cross_entropy_twin():
  mixskd_run, ce_run = (parse_command(words)["config"] for words in
                        python_commands(doc_block("docs/backbones.md", "vit")))
  assert mixskd_run["model"]["name"] == ce_run["model"]["name"] == "small_vit"
  assert mixskd_run["model"]["mixskd"] and ce_run["method"] == "cross_entropy"


# ---------------------------------------------------------------------------------------------
# docs/benchmarking.md

def test_benchmark_commands_parse_and_write_where_the_results_are_kept():
  plain = parse_command(only_command("docs/benchmarking.md", "benchmark"))
  side = parse_command(only_command("docs/benchmarking.md", "side-by-side"))
  assert side["flags"]["against"] == "torch" and side["config"]["batch_size"] == 64
  breakdown = parse_command(only_command("docs/benchmarking.md", "breakdown"))
  assert breakdown["flags"]["against"] == "torch" and breakdown["flags"]["profile"]
  assert breakdown["config"]["batch_size"] == 64
  for parsed in (plain, side, breakdown):
    assert os.path.isdir(os.path.join(ROOT, os.path.dirname(parsed["flags"]["json_out"])))


# ---------------------------------------------------------------------------------------------
# docs/testing.md

def test_testing_guides_command_is_the_set_ups_command_2():
  (command,) = shell_lines(doc_block("docs/testing.md", "test-command"))
  set_up = read_page("README.md").split("## Set up", 1)[1]
  assert f" && {command}\n" in set_up


def test_slow_subset_command_selects_slow_tests():
  """Collected, not run: the files exist and the selection holds slow tests."""
  (command,) = shell_lines(doc_block("docs/testing.md", "slow-subset"))
  words = shlex.split(command)
  assert words[:3] == ["python3", "-m", "pytest"] and "--slow" in words
  args = [w for w in words[3:] if w != "-q"]  # one -q: collection lists each test's id
  out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  selected = [line for line in out.stdout.splitlines() if "::" in line]
  assert selected and all("quick" in line for line in selected), out.stdout[-2000:]
