"""Steps compiled by the TPU compiler for a named slice on this CPU host (`python -m
mixskd_jax.aot`): topologies described or refused in one line, the compiler's out-of-memory
answer read, the fit's search, the report's fields on a single-host and a multi-host slice
(zero activation bytes, the TPU's compiler options rather than the host's), and libtpu's
start-up lines kept out of a CPU command's output."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest
from ml_collections import config_flags

from mixskd_jax import backends
from mixskd_jax.bench import aot, aot_fit, aot_table, step as step_lib, tpu_slice
from mixskd_jax.models import compiler_options
from mixskd_jax.train import sharding
from tests.doc_blocks import doc_block

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
GIB = 2 ** 30
# libtpu is a test requirement on Linux (requirements-dev.txt); elsewhere there is none.
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="libtpu is built for Linux only")


def load(path):
  return config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      os.path.join(ROOT, path))


def run_command(*args, timeout=900):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "mixskd_jax.aot", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# --- topologies ------------------------------------------------------------------------------

def test_libtpu_is_installed_for_the_tests():
  assert backends.libtpu_installed(), "pip install -r requirements-dev.txt brings libtpu"


@pytest.mark.parametrize("name,generation,shape", [
    ("v5e:2x2", "v5e", (2, 2)), ("v5e:16x16", "v5e", (16, 16)), ("v4:2x2x4", "v4", (2, 2, 4)),
    ("v5p:4x4x8", "v5p", (4, 4, 8)), ("v6e:8x8", "v6e", (8, 8)), (" v3:4x4 ", "v3", (4, 4))])
def test_topology_names_are_parsed(name, generation, shape):
  gen, dims = tpu_slice.parse(name)
  assert (gen.name, dims) == (generation, shape)


@pytest.mark.parametrize("name,says", [
    ("v5e", "is not a TPU topology"), ("v5e-16", "is not a TPU topology"),
    ("v7:2x2x1", "unknown generation 'v7'"), ("v4:2x2", "a v4 shape has 3"),
    ("v5e:2x2x1", "a v5e shape has 2"), ("v5e:0x2", "positive")])
def test_bad_topology_names_are_refused_in_one_line(name, says):
  with pytest.raises(tpu_slice.TopologyError) as error:
    tpu_slice.parse(name)
  message = str(error.value)
  assert says in message and "\n" not in message
  assert "v5e:16x16" in message and "v4:2x2x4" in message  # the accepted forms


def test_slices_are_described_with_their_hosts_and_chips():
  pod = tpu_slice.describe("v5e:16x16")
  assert (pod.num_devices, pod.num_processes, pod.device_kind) == (256, 64, "TPU v5 lite")
  assert pod.hbm_bytes_per_device == 16 * GIB
  assert sharding.platform(pod.mesh) == "tpu"
  v4 = tpu_slice.describe("v4:2x2x1")  # megacore: one device per chip, as JAX runs it
  assert (v4.num_devices, v4.device_kind) == (4, "TPU v4")
  assert tpu_slice.describe("v5e:2x2", num_slices=2).num_devices == 8


def test_a_shape_libtpu_refuses_is_one_line():
  with pytest.raises(tpu_slice.TopologyError) as error:
    tpu_slice.describe("v5e:3x3")
  assert "refused by libtpu" in str(error.value) and "\n" not in str(error.value)


def test_missing_libtpu_names_the_install_command(monkeypatch):
  monkeypatch.setattr(backends, "libtpu_installed", lambda: False)
  with pytest.raises(tpu_slice.LibtpuMissingError, match=r'pip install -e "\.\[tpu\]"'):
    tpu_slice.describe("v5e:2x2")


def test_usable_hbm_is_the_compilers_own_figure():
  # libtpu 0.0.42 keeps a quarter GiB of a v5e chip's 16 GiB for itself.
  usable = aot.usable_hbm_bytes(tpu_slice.describe("v5e:2x2"))
  assert 15 * GIB < usable < 16 * GIB


# --- the compiler's answers ------------------------------------------------------------------

def test_out_of_memory_message_is_read():
  error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required"
                       " for HLO temporaries (17.35G) exceeds available HBM (15.75G).\nmore")
  oom = aot.out_of_memory(error)
  assert oom["needed_bytes"] == int(17.35 * GIB)
  assert oom["available_bytes"] == int(15.75 * GIB)
  assert oom["message"].startswith("RESOURCE_EXHAUSTED") and "\n" not in oom["message"]
  assert aot.out_of_memory(RuntimeError("UNIMPLEMENTED: something")) is None


def test_cost_model_estimate_is_kept_only_when_positive():
  assert aot.cost_model_seconds({"optimal_seconds": 0.25, "flops": 1.0}) == 0.25
  assert aot.cost_model_seconds({"optimal_seconds": -316.9}) is None
  assert aot.cost_model_seconds([{"flops": 1.0}]) is None


def report_for(per_device, needed=None, dtype="float32"):
  return {"topology": "v5e:2x2", "per_device_batch_size": per_device, "dtype": dtype,
          "hbm_usable_bytes_per_device": int(15.75 * GIB),
          "train_step": {"fits": False, "out_of_memory": {"needed_bytes": needed}}}


def test_a_step_that_does_not_fit_says_what_to_try_in_one_line():
  line = aot_table.does_not_fit_line(report_for(128, needed=int(17.35 * GIB)))
  assert line == ("the train step on v5e:2x2 at 128 per chip needs 17.35 GiB per chip, the "
                  "chip has 15.75 GiB; try per_device_batch_size <= 116 or model.dtype=bfloat16 "
                  "or --fit (--fit: the largest per-chip batch that fits)")
  line = aot_table.does_not_fit_line(report_for(128, dtype="bfloat16"))
  assert "does not fit" in line and "model.dtype" not in line


# --- the fit's search ------------------------------------------------------------------------

def linear_memory(fixed, per_image, usable, curvature=0.0):
  calls = []

  def compile_at(batch):
    calls.append(batch)
    need = int(fixed + per_image * batch + curvature * batch * batch)
    return need <= usable, need
  return compile_at, calls


def truth(fixed, per_image, usable, granularity, curvature=0.0):
  fits = [b for b in range(granularity, 20000, granularity)
          if fixed + per_image * b + curvature * b * b <= usable]
  return max(fits, default=None)


@pytest.mark.parametrize("fixed,per_image,curvature,start,granularity", [
    (1e9, 1.1e8, 0.0, 16, 8), (1e9, 1.1e8, 0.0, 16, 1), (0.9e9, 3e8, 0.0, 16, 8),
    (1e9, 1.1e8, 2e5, 16, 8), (1e9, 1e7, 0.0, 16, 8), (1e9, 1.1e8, 0.0, 256, 8),
    (15e9, 1e8, 0.0, 16, 8)])
def test_the_fit_finds_the_boundary_in_a_few_compiles(fixed, per_image, curvature, start,
                                                       granularity):
  usable = int(15.75 * GIB)
  compile_at, calls = linear_memory(fixed, per_image, usable, curvature)
  largest, measured = aot_fit.largest_fitting(compile_at, start, usable, granularity)
  assert largest == truth(fixed, per_image, usable, granularity, curvature)
  assert len(calls) == len(set(calls)) == len(measured) <= 5
  if largest is not None:  # the boundary itself was compiled from both sides
    assert measured[largest][0] and not measured[largest + granularity][0]


def rematerializing_memory(fixed, per_image, usable, capacity):
  """The TPU compiler near the limit: it rematerializes, so every batch up to `capacity` of
  raw need fits with its peak held at about 91% of the HBM (a little up or down from one batch
  to the next), and one beyond is refused with a need well below the raw line (measured on
  v5e: fits at 14.24-14.40 of 15.75 GiB from 64 to 120 per chip, then "needs 17.35 GiB" at
  128)."""
  calls = []

  def compile_at(batch):
    calls.append(batch)
    raw = fixed + per_image * batch
    if raw <= capacity:
      return True, int(min(raw, (0.91 + 0.004 * math.sin(batch)) * usable))
    return False, int(max(0.55 * raw, 1.05 * usable))
  return compile_at, calls


@pytest.mark.parametrize("fixed,per_image,capacity,start", [
    (1.5, 0.24, 1.9, 16), (1.5, 0.15, 1.3, 16), (1.5, 0.24, 1.9, 128), (3, 0.14, 3.3, 16)])
def test_the_fit_doubles_and_bisects_where_the_compiler_rematerializes(fixed, per_image,
                                                                      capacity, start):
  """Where the peak stops growing the line says nothing: the search neither creeps up nor
  down one granule per compile (as it did on v5e, 72 to 120 per chip in steps of 8, and on
  v4, 640 down to 592), and ends at the true boundary."""
  usable = int(15.75 * GIB)
  compile_at, calls = rematerializing_memory(fixed * GIB, per_image * GIB, usable,
                                             capacity * usable)
  largest, measured = aot_fit.largest_fitting(compile_at, start, usable, 8)
  assert largest == max(b for b in range(8, 5000, 8)
                        if (fixed + per_image * b) * GIB <= capacity * usable)
  assert len(calls) == len(set(calls)) <= 11
  assert measured[largest][0] and not measured[largest + 8][0]


def test_a_search_stopped_by_the_compile_cap_says_so():
  """Cut off before the boundary, the row says `boundary_found: False` and the printed table
  shows the largest fit as a lower bound."""
  usable = int(15.75 * GIB)
  compile_at, _ = linear_memory(1e9, 1e7, usable)
  largest, measured = aot_fit.largest_fitting(compile_at, 16, usable, 8, max_compiles=3)
  assert largest is not None and aot_fit.next_candidate(measured, usable, 8) is not None
  assert aot_table.largest_cell(largest, False) == f">= {largest}"
  assert aot_table.largest_cell(largest, True) == str(largest)


def test_nothing_fits_is_none():
  compile_at, calls = linear_memory(20 * GIB, 1e8, int(15.75 * GIB))
  assert aot_fit.largest_fitting(compile_at, 16, int(15.75 * GIB), 8)[0] is None
  assert calls == [16, 8]


def test_fit_report_gives_the_batch_and_learning_rate_of_the_scaling_rule(monkeypatch):
  """The fit's wiring: each compile at the row's dtype and remat, and the global batch and
  learning rate of the ImageNet recipe's linear rule at the batch found."""
  seen = []

  def fake_compile_train(config, tpu, usable):
    seen.append((config.per_device_batch_size, config.model.dtype,
                 config.model.remat_branches))
    per_image = 0.05 * GIB if config.model.dtype == "bfloat16" else 0.1 * GIB
    need = int(1 * GIB + per_image * config.per_device_batch_size)
    if need <= usable:
      return {"fits": True, "peak_bytes": need, "lower_s": 1.0, "compile_s": 2.0}, None
    return {"fits": False, "out_of_memory": {"needed_bytes": need}, "lower_s": 1.0,
            "compile_s": 2.0}, None

  monkeypatch.setattr(aot, "compile_train", fake_compile_train)
  monkeypatch.setattr(aot, "usable_hbm_bytes", lambda tpu: 15 * GIB)
  config = load("configs/imagenet_resnet50_mixskd.py")
  lines = []
  result = aot_fit.fit_report(config, tpu_slice.describe("v5e:2x2"), remats=(False,),
                              progress=lines.append)
  f32, bf16 = result["rows"]
  assert (f32["dtype"], f32["largest_per_device_batch"]) == ("float32", 136)
  assert (bf16["dtype"], bf16["largest_per_device_batch"]) == ("bfloat16", 280)
  assert f32["global_batch_size"] == 4 * 136
  assert f32["learning_rate"] == pytest.approx(0.1 * 4 * 136 / 128)
  assert f32["peak_bytes"] == int(1 * GIB + 0.1 * GIB * 136)
  assert f32["train_step"]["peak_bytes"] == f32["peak_bytes"]  # its whole report
  assert len(lines) == len(seen)  # one progress line per compile
  assert lines[0] == "  float32, remat_branches=False: 16 per chip fits (2.60 GiB), compiled in 3 s"
  assert seen[0] == (16, "float32", False)  # from the recipe's own per-chip batch
  assert {s[1:] for s in seen} == {("float32", False), ("bfloat16", False)}
  assert f32["compile_seconds"] == 3.0 * f32["compiles"]
  assert f32["boundary_found"] and bf16["boundary_found"]
  assert "136" in aot_table.format_fit(result)


def test_a_stopped_fit_resumes_from_its_compile_log(monkeypatch, tmp_path):
  """With a compile log, a fit run again compiles nothing it logged (the same batches give
  the same answer), a line cut short by a kill is ignored and compiled again, and a changed
  config is a different key (compiled afresh)."""
  compiled = []

  def fake_compile_train(config, tpu, usable):
    compiled.append(config.per_device_batch_size)
    need = int(1 * GIB + 0.1 * GIB * config.per_device_batch_size)
    if need <= usable:
      return {"fits": True, "peak_bytes": need, "lower_s": 1.0, "compile_s": 2.0}, None
    return {"fits": False, "out_of_memory": {"needed_bytes": need}, "lower_s": 1.0,
            "compile_s": 2.0}, None

  monkeypatch.setattr(aot, "compile_train", fake_compile_train)
  monkeypatch.setattr(aot, "usable_hbm_bytes", lambda tpu: 15 * GIB)
  config = load("configs/imagenet_resnet50_mixskd.py")
  tpu = tpu_slice.describe("v5e:2x2")
  log = tmp_path / "fit.compiles.jsonl"

  def fit(cfg, lines=None):
    return aot_fit.fit_report(cfg, tpu, dtypes=("float32",), remats=(False,),
                              progress=(lines if lines is not None else []).append,
                              log_path=str(log))["rows"][0]

  first = fit(config)
  batches = list(compiled)
  assert first["largest_per_device_batch"] == 136 and len(batches) >= 3
  assert len(log.read_text().splitlines()) == len(batches)
  compiled.clear()
  lines = []
  again = fit(config, lines)
  assert compiled == [] and again["measured"] == first["measured"]
  assert all("from the compile log" in line for line in lines)
  # A kill while the last line was written: that compile (and only it) runs again.
  text = log.read_text().splitlines()
  log.write_text("\n".join(text[:-1]) + "\n" + text[-1][:40] + "\n")
  fit(config)
  assert compiled == [batches[-1]]
  compiled.clear()
  other = config.copy_and_resolve_references()
  other.optimizer.weight_decay = 2e-4
  fit(other)
  assert compiled == batches


# --- compiling for a slice -------------------------------------------------------------------

def test_the_step_for_a_tpu_carries_none_of_xla_cpus_choices():
  """The conv-input barrier and the options that keep it are XLA:CPU choices: a step built for
  a TPU mesh has neither (the TPU compiler does not implement the kept barrier), a step built
  for this host's CPU devices has both."""
  config = load("configs/default.py")
  assert config.model.conv_input_barrier
  texts = {}
  for name, mesh in (("cpu", sharding.make_mesh()), ("tpu", tpu_slice.describe("v5e:2x2").mesh)):
    texts[name] = step_lib.lower_train_step(config, mesh)[3].as_text()
  assert "optimization_barrier" in texts["cpu"]
  assert "optimization_barrier" not in texts["tpu"]
  assert compiler_options(config.model, "tpu") == {}
  assert compiler_options(config.model, "cpu")


def check_report(report, *, devices, processes):
  assert (report["devices"], report["processes"]) == (devices, processes)
  train = report["train_step"]
  memory = train["memory"]
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "peak_memory_in_bytes"):
    assert memory[field] > 0, field
  # The TPU compiler gives its own peak (XLA:CPU's leaves the temporaries out): what the
  # headroom is measured from.
  assert train["fits"] is True and train["peak_bytes"] == memory["peak_memory_in_bytes"]
  assert train["headroom_bytes"] == report["hbm_usable_bytes_per_device"] - train["peak_bytes"]
  assert 0 < train["headroom_bytes"] < report["hbm_usable_bytes_per_device"]
  assert memory["alias_size_in_bytes"] > 0  # the state is donated
  assert train["flops_per_step_per_device"] > 0
  assert train["compile_s"] > 0
  # Only the gradient and metric all-reduces cross chips: no activation moves.
  assert train["communication"]["data_moving_bytes"] == 0
  assert not train["activation_check"]["moves_activations"]
  assert set(train["communication"]["by_kind"]) == {"all-reduce"}


@pytest.mark.slow
def test_a_small_mixskd_step_compiles_for_a_single_host_slice(tmp_path):
  """The default config (small ResNet MixSKD, with the CPU's conv-input barrier on) through
  the command, train and eval steps, on a v5e 2x2 slice: before the compiler options followed
  the target, this failed with `UNIMPLEMENTED: HLO opt-barrier is not implemented on TPU`."""
  out = tmp_path / "report.json"
  result = run_command("--config=configs/default.py", "--topology=v5e:2x2",
                       "--config.model.batchnorm_groups=-1", f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  check_report(report, devices=4, processes=1)
  assert (report["method"], report["per_device_batch_size"], report["global_batch_size"]) == (
      "mixskd", 32, 128)
  assert report["eval_step"]["fits"] and report["eval_step"]["communication"][
      "data_moving_bytes"] == 0
  for row in ("HBM temporaries", "fits the chip", "cost model step time", "collectives",
              "activation bytes moved", "compile: lower + TPU"):
    assert row in result.stdout, row
  assert not backends.LIBTPU_NOISE.search(result.stdout + result.stderr), result.stderr


@pytest.mark.slow
def test_a_small_step_compiles_for_a_multi_host_slice(tmp_path):
  """16 chips over 4 hosts, the plain CE step (cheaper to compile): the config's batch of 128
  is 8 per chip, with one BatchNorm group per chip."""
  out = tmp_path / "report.json"
  result = run_command("--config=configs/default.py:cross_entropy", "--topology=v5e:4x4",
                       "--config.model.batchnorm_groups=-1", "--skip_eval", f"--json_out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  check_report(report, devices=16, processes=4)
  assert (report["per_device_batch_size"], report["global_batch_size"],
          report["batchnorm_groups"]) == (8, 128, 16)
  assert "eval_step" not in report


# --- the command's one-line answers ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args,says", [
    (("--topology=v9:2x2",), "unknown generation 'v9'"),
    (("--topology=v5e:3x3",), "refused by libtpu"),
    (("--topology=v5e:2x2", "--config.batch_size=6"),
     "config.batch_size: 6 does not split evenly over 4 devices"),
])
def test_bad_input_answers_in_one_line(args, says):
  result = run_command("--config=configs/default.py", *args, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and says in lines[0], result.stderr


@pytest.mark.slow
def test_a_cpu_command_prints_nothing_from_libtpu():
  """With libtpu installed, a CPU command's output has none of its start-up lines (they came
  from C++ on file descriptor 2 whenever JAX's backends started), and it leaves no log files
  in libtpu's default directory (named after the process id)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "TPU_LOG_DIR")}
  process = subprocess.Popen(
      [sys.executable, "-m", "mixskd_jax.benchmark", "--config=configs/default.py:smoke",
       "--steps=0", "--skip_ce", "--skip_pipeline"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  stdout, stderr = process.communicate(timeout=600)
  result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
  log_dir = "/tmp/tpu_logs"
  logs = [n for n in (os.listdir(log_dir) if os.path.isdir(log_dir) else [])
          if n.endswith(f".{process.pid}")]
  assert not logs, logs
  assert result.returncode == 0, result.stderr[-3000:]
  assert "GFLOP/step/device" in result.stdout
  output = result.stdout + result.stderr
  assert not backends.LIBTPU_NOISE.search(output), output[-3000:]
  assert "libtpu" not in output.lower() and "InitGoogle" not in output


def test_backends_start_without_libtpus_lines(capfd):
  """In this process (conftest started the backends): starting again prints nothing, and the
  filter keeps every other line."""
  backends.start()
  captured = capfd.readouterr()
  assert not backends.LIBTPU_NOISE.search(captured.err)
  noisy = ("Failed to find host bounds for accelerator type: WARNING: could not determine\n"
           "a line of ours\n"
           "WARNING: Logging before InitGoogle() is written to STDERR\n"
           "E0000 00:00:1 common_lib.cc:554] INVALID_ARGUMENT: unexpected worker hostname "
           "from env var TPU_WORKER_HOSTNAMES.\n=== Source Location Trace: ===\n"
           "learning/45eac/tfrc/runtime/libtpu_init_utils.cc:327\nanother line\n")
  assert backends.without_noise(noisy) == "a line of ours\nanother line\n"


# --- the pod documentation -------------------------------------------------------------------

SCALING = os.path.join(ROOT, "experiments", "SCALING.md")


def test_scaling_quotes_the_tpu_compilers_tables_as_rendered():
  """Every figure of SCALING.md's tables is the committed output of `python -m mixskd_jax.aot`
  (experiments/results/tpu_aot/*.json), rendered by `python -m experiments.tpu_aot --tables`."""
  from experiments import tpu_aot  # pylint: disable=import-outside-toplevel
  with open(SCALING) as f:
    text = f.read()
  blocks = [m.group(0) for m in tpu_aot._BLOCK.finditer(tpu_aot.tables())]  # pylint: disable=protected-access
  assert len(blocks) == 3
  for block in blocks:
    assert block in text, "rerun python -m experiments.tpu_aot --write"
  assert sum(block.count("\n|") for block in blocks) >= 12  # rows, not only headers


def documented_aot_commands():
  """Every `python -m mixskd_jax.aot` command in SCALING.md, the README's pod block and
  docs/pods.md's pre-launch block."""
  with open(SCALING) as f:
    texts = [f.read(), doc_block("README.md", "pod"), doc_block("docs/pods.md", "aot")]
  commands = []
  for text in texts:
    for line in text.replace("\\\n", " ").splitlines():
      if "python -m mixskd_jax.aot " in line:
        commands.append(line.split("python -m mixskd_jax.aot ", 1)[1].split("`")[0].split())
  return commands


def test_documented_aot_commands_name_real_configs_topologies_and_flags():
  commands = documented_aot_commands()
  assert len(commands) >= 3
  with open(os.path.join(ROOT, "mixskd_jax", "aot.py")) as f:
    source = f.read()
  known = {"--" + name for name in re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source)}
  assert {"--topology", "--fit", "--json_out"} <= known
  known.add("--config")  # bench/command_line.define_config_flag
  for args in commands:
    options = dict(a.split("=", 1) if "=" in a else (a, "") for a in args if a.startswith("--"))
    assert os.path.exists(os.path.join(ROOT, options["--config"].split(":")[0])), args
    tpu_slice.parse(options["--topology"])
    assert {k for k in options if not k.startswith("--config.")} <= known, args
