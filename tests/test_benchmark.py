"""The benchmark harness (`mixskd_jax.benchmark`) and the speed options of the models.

The benchmark runs for real on the small model (a few steps on synthetic batches); what is
checked is that its fields are sane and consistent, never how fast anything is. The speed
options (`model.conv_input_barrier`, `remat_branches`, `cpu_convolutions`) must leave
parameters, logits, loss, updated BatchNorm statistics and gradients equal (the convolution
library up to float32 rounding), and reach the compiler.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax import benchmark
from mixskd_jax import config as config_lib
from mixskd_jax.method import mixing, objective
from mixskd_jax.models import SPECS, build_model, compiler_options, xla_options
from mixskd_jax.models.layers import BatchNorm
from tests.fake_fashion_mnist import write_idx
from tests.training_configs import tiny_config


# small_resnet cut to two stages (one auxiliary branch): the same code paths, compiled in a
# few seconds.
TWO_STAGES = dict(stage_sizes=(1, 1), stage_widths=(8, 16), stage_strides=(1, 2))


@pytest.fixture(scope="module")
def two_stage_small_resnet():
  """Registers small_resnet as its two-stage cut for the tests of this module."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(SPECS, "small_resnet", dataclasses.replace(SPECS["small_resnet"], **TWO_STAGES))
    yield


def _tiny_benchmark_config(**overrides):
  # 16 clean images: divisible by the 8 fake devices of tests/conftest.py.
  return tiny_config({"batch_size": 16, **overrides})


@pytest.fixture(scope="module")
def result(tmp_path_factory, two_stage_small_resnet):
  del two_stage_small_resnet
  path = str(tmp_path_factory.mktemp("bench") / "out" / "bench.json")
  res = benchmark.run_benchmark(_tiny_benchmark_config(), steps=3, warmup=1, skip_pipeline=True,
                                probe_size=256, json_out=path, label="tiny")
  return res, path


@pytest.mark.slow
def test_run_benchmark_fields_are_sane(result):
  """Guards the reported numbers: FLOPs, step times, images/s, memory and the peak."""
  res, _ = result
  assert res["probe"]["gflops"] > 0 and res["peak"]["source"] == "float32 matmul probe"
  for name in ("step", "ce_step"):
    s = res[name]
    assert s["flops_per_step_per_device"] > 0
    assert s["lower_s"] > 0 and s["compile_s"] > 0
    times = s["step_s"]
    assert len(times["all"]) == 3
    assert times["min"] <= times["median"] <= times["max"]
    assert s["clean_images_per_s"] == pytest.approx(16 / times["median"])
    assert s["achieved_gflops_per_device"] == pytest.approx(
        s["flops_per_step_per_device"] / times["median"] / 1e9)
    assert s["fraction_of_peak"] == pytest.approx(
        s["achieved_gflops_per_device"] / res["peak"]["gflops"])
    assert s["memory"]["peak_bytes"] >= s["memory"]["argument_size_in_bytes"] > 0
  assert res["step"]["method"] == "mixskd" and res["ce_step"]["method"] == "cross_entropy"
  # Two views through backbone and branches cost several plain steps.
  assert res["step"]["flops_per_step_per_device"] > 2 * res["ce_step"]["flops_per_step_per_device"]
  assert res["step"]["memory"]["peak_bytes"] > res["ce_step"]["memory"]["peak_bytes"]
  assert "pipeline" not in res


@pytest.mark.slow
def test_ratios_match_the_step_times_and_flops(result):
  """Guards the MixSKD/CE ratios against the per-step numbers they come from."""
  res, _ = result
  r, s, ce = res["ratios"], res["step"], res["ce_step"]
  assert r["step_time"] == pytest.approx(s["step_s"]["median"] / ce["step_s"]["median"])
  assert r["flops"] == pytest.approx(s["flops_per_step_per_device"]
                                     / ce["flops_per_step_per_device"])
  assert r["time_over_flop_ratio"] == pytest.approx(r["step_time"] / r["flops"])


@pytest.mark.slow
def test_json_is_written_and_table_formats(result):
  """Guards that the JSON holds what run_benchmark returned and the table names both steps."""
  res, path = result
  with open(path) as f:
    assert json.load(f) == json.loads(json.dumps(res))
  table = benchmark.format_table(res)
  assert "mixskd" in table and "cross_entropy" in table and "fraction of peak" in table
  assert "GiB" in table and "time/FLOP" in table


def test_compile_only_allocates_and_runs_nothing(two_stage_small_resnet):
  """Guards steps=0 (what SCALING.md uses for big batches): analyses without timings."""
  del two_stage_small_resnet
  config = _tiny_benchmark_config(method="cross_entropy", **{"model.mixskd": False})
  out = benchmark.measure_step(config, steps=0)
  assert out["flops_per_step_per_device"] > 0 and out["memory"]["peak_bytes"] > 0
  assert "step_s" not in out and out["method"] == "cross_entropy"


def test_matmul_probe():
  """Guards the probe's arithmetic: 2 n^3 FLOPs per matmul, best time no slower than median."""
  p = benchmark.matmul_probe(128, iterations=3, repeats=3)
  assert p["flops"] == 2 * 128 ** 3 * 3
  assert 0 < p["best_s"] <= p["median_s"]
  assert p["gflops"] == pytest.approx(p["flops"] / p["best_s"] / 1e9)
  with pytest.raises(ValueError, match="size"):
    benchmark.matmul_probe(0)


def test_datasheet_peaks():
  """Guards the accelerator table: H100/H200 dense bf16 989 TFLOP/s; CPUs have none."""
  assert benchmark.datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
  assert benchmark.datasheet_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
  assert benchmark.datasheet_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
  assert benchmark.datasheet_peak_tflops("TPU v4") == pytest.approx(275.0)
  assert benchmark.datasheet_peak_tflops("cpu") is None


def test_pipeline_unavailable_is_reported_not_raised(tmp_path):
  """Guards the offline case: an unprepared dataset gives a reason, without a download."""
  config = _tiny_benchmark_config(**{"data.name": "cifar100", "data.data_dir": str(tmp_path)})
  out = benchmark.measure_pipeline(config, batches=2)
  assert "cifar100" in out["unavailable"] and "does not download" in out["unavailable"]


def test_pipeline_on_mock_data_for_a_dataset_not_here(tmp_path):
  """--pipeline_mock_examples times the real CIFAR pipeline on mock images of the real shape."""
  config = _tiny_benchmark_config(**{"data.name": "cifar100", "data.data_dir": str(tmp_path)})
  out = benchmark.measure_pipeline(config, batches=2, mock_examples=64)
  assert out["mock_examples"] == 64 and out["batches"] == 2 and out["images_per_s"] > 0


def test_pipeline_throughput_on_local_files(tmp_path):
  """Guards the measured path: the real train_iterator over local IDX files."""
  idx = tmp_path / "idx"
  idx.mkdir()
  write_idx(str(idx), 64)
  config = _tiny_benchmark_config(**{"data.data_dir": str(tmp_path / "tfds"),
                                     "data.idx_dir": str(idx)})
  out = benchmark.measure_pipeline(config, batches=3)
  assert out["batches"] == 3 and out["images_per_s"] > 0 and out["seconds"] > 0


# ---------------------------------------------------------------- model options, numerics


def _model_config(**fields):
  config = config_lib.base_config().model
  config.update(name="small_resnet", conv_input_barrier=False, cpu_convolutions="xla_default")
  config.update(**fields)
  return config


OUTPUTS = ("loss", "terms", "logits", "features", "batch_stats", "grads")


def _mixskd_outputs(model_config, variables, images, labels, mix):
  """(loss, terms, logits, features, new batch stats, grads) of one MixSKD forward/backward of
  the two-stage small_resnet, compiled with the options the trainer uses for `model_config`."""
  model = build_model("small_resnet", 10, conv_input_barrier=model_config.conv_input_barrier,
                      remat_branches=model_config.remat_branches, **TWO_STAGES)
  config = objective.ObjectiveConfig.for_variant("full")

  def loss_fn(params):
    return objective.apply_mixskd(model, {**variables, "params": params}, images, labels, mix,
                                  config)
  (loss, (terms, outputs, stats)), grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True),
      compiler_options=compiler_options(model_config) or None)(variables["params"])
  return loss, terms, outputs.logits, outputs.features, stats, grads


@pytest.fixture(scope="module")
def plain_mixskd():
  """Inputs, variables and outputs of the two-stage small_resnet without speed options."""
  images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  mix = mixing.sample_mix(jax.random.key(2), 8, alpha=0.4)
  variables = jax.jit(build_model("small_resnet", 10, **TWO_STAGES).init)(
      jax.random.key(1, impl="rbg"), images)
  inputs = (images, labels, mix)
  return inputs, variables, _mixskd_outputs(_model_config(), variables, *inputs)


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    {"conv_input_barrier": True}, {"remat_branches": True}, {"cpu_convolutions": "eigen"},
    {"conv_input_barrier": True, "cpu_convolutions": "eigen", "remat_branches": True}],
                         ids=["barrier", "remat", "eigen", "all"])
def test_speed_options_keep_parameters_and_numerics(option, plain_mixskd):
  """Guards the speed options (`model.conv_input_barrier`, `remat_branches`,
  `cpu_convolutions`): same parameter tree (checkpoints stay interchangeable) and, in float32,
  the same logits, features, loss, terms, BatchNorm statistics and gradients as without them.

  Barrier and remat give bit-identical results here (jax 0.10.2); the tolerance, 1e-6 of the
  largest magnitude among all the gradients (or features, ...), leaves room for another XLA
  to order a sum differently. Eigen convolutions sum in another order than YNNPACK's:
  differences up to 1.3e-6 of the largest magnitude were measured (features after two
  BatchNorms), so they get 1e-5.
  """
  inputs, variables, want = plain_mixskd
  optioned = build_model("small_resnet", 10, conv_input_barrier=option.get(
      "conv_input_barrier", False), remat_branches=option.get("remat_branches", False),
                         **TWO_STAGES)
  assert jax.tree.structure(jax.eval_shape(optioned.init, jax.random.key(1), inputs[0])) == \
      jax.tree.structure(variables)
  got = _mixskd_outputs(_model_config(**option), variables, *inputs)
  tol = 1e-5 if "cpu_convolutions" in option else 1e-6
  for name, w_tree, g_tree in zip(OUTPUTS, want, got):
    scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(w_tree))
    for w, g in zip(jax.tree.leaves(w_tree), jax.tree.leaves(g_tree)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=tol * scale,
                                 err_msg=name)


def test_barriers_survive_compilation_on_cpu():
  """Guards `compiler_options`: XLA:CPU would drop the barriers before fusion without it
  (jax 0.10), which silently undoes `conv_input_barrier`."""
  if jax.default_backend() != "cpu":
    pytest.skip("the compiler options apply to XLA:CPU")
  model = build_model("small_resnet", 10, conv_input_barrier=True, mixskd=False, **TWO_STAGES)
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  loss = lambda v: jnp.sum(model.apply(v, x, train=True, mutable=["batch_stats"])[0].logits[0])
  options = compiler_options(_model_config(conv_input_barrier=True))
  assert options
  compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(variables).compile()
  assert "opt-barrier" in compiled.as_text()


def test_compiler_options_follow_the_config():
  """Guards which XLA options each config gets, and that a bad value names its field."""
  if jax.default_backend() != "cpu":
    pytest.skip("the compiler options apply to XLA:CPU")
  barrier, eigen = dict([xla_options.KEEP_BARRIERS]), dict([xla_options.EIGEN_CONVOLUTIONS])
  assert compiler_options(_model_config(name="small_convnext", conv_input_barrier=True,
                                        cpu_convolutions="auto")) == \
      barrier  # depthwise 7x7 convolutions: YNNPACK measured faster
  for resnet in ("small_resnet", "cifar_resnet18"):
    assert compiler_options(_model_config(name=resnet, conv_input_barrier=True,
                                          cpu_convolutions="auto")) == {**barrier, **eigen}
  assert compiler_options(_model_config(cpu_convolutions="eigen")) == eigen
  assert compiler_options(_model_config()) == {}
  assert compiler_options(_model_config(conv_input_barrier=True), platform="gpu") == {}
  with pytest.raises(ValueError, match="config.model.cpu_convolutions"):
    compiler_options(_model_config(cpu_convolutions="onednn"))
  assert not xla_options._accepted("xla_no_such_option", True)  # left out, not an error


def test_batchnorm_statistics_stay_plain_reductions_with_eigen_convolutions():
  """Guards the Eigen option's value: naming only YNNPACK's dots also took the reductions away
  from it, and XLA:CPU then split each BatchNorm statistic over a 32x32 map into a slow
  32-row `reduce-window`; with YNNPACK keeping the reductions there is none."""
  if jax.default_backend() != "cpu":
    pytest.skip("the compiler options apply to XLA:CPU")
  options = compiler_options(_model_config(cpu_convolutions="eigen"))
  if not options:
    pytest.skip("this jax's XLA:CPU has no YNNPACK fusion option")
  norm = BatchNorm()
  x = jnp.zeros((64, 32, 32, 4))
  variables = norm.init(jax.random.key(0), x, train=False)
  loss = lambda v, x: jnp.sum(norm.apply(v, x, train=True, mutable=["batch_stats"])[0] ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options).lower(
      variables, x).compile()
  assert "reduce-window" not in compiled.as_text()


def _benchmark_command(*args, env=None):
  """`python -m mixskd_jax.benchmark ...` from the repository root, one CPU device."""
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  environment.update(TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  return subprocess.run([sys.executable, "-m", "mixskd_jax.benchmark", *args], cwd=root,
                        env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_side_by_side_with_torch_runs_both_sides_on_the_same_loss(tmp_path):
  """--against=torch: MixSKD (full) and plain CE, ours and PyTorch NCHW/channels_last in
  alternating rounds; both sides compute the same loss from the same weights (float32
  rounding); the JSON holds per-round ratios, peak memory and probe fractions; the table
  prints. Nothing about speed is asserted."""
  pytest.importorskip("torch")
  out = tmp_path / "side.json"
  proc = _benchmark_command("--config=configs/cifar100_resnet18_mixskd.py",
                            "--config.batch_size=4", "--against=torch", "--rounds=2",
                            "--steps=1", "--warmup=1", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result["steps_compared"]) == {"mixskd", "cross_entropy"}
  for name, step in result["steps_compared"].items():
    loss = step["same_batch_loss"]
    assert loss["relative_difference"] < 1e-5, (name, loss)
    assert loss["torch"] > 0
    assert set(step["sides"]) == {"ours", "nchw", "channels_last"}
    for side, s in step["sides"].items():
      assert len(s["all"]) == 2 and 0 < s["min"] <= s["median"] <= s["max"]
      assert s["peak_bytes"] > 0 and 0 < s["fraction_of_matmul_probe"]
      if side != "ours":
        assert len(s["ratio_over_ours"]["rounds"]) == 2
  # MixSKD runs 2B rows through four heads: more FLOPs than the plain step of the backbone.
  assert (result["steps_compared"]["mixskd"]["flops_per_step"]
          > 2 * result["steps_compared"]["cross_entropy"]["flops_per_step"])
  assert "loss on one batch from the same weights" in proc.stdout
  assert "PyTorch channels_last" in proc.stdout


@pytest.mark.slow
def test_side_by_side_refusals_are_one_line(tmp_path):
  """No PyTorch: one line saying how to install its CPU build; a model the PyTorch side does
  not implement: one line naming the models it does. Both exit with status 2."""
  blocked = tmp_path / "no_torch"
  blocked.mkdir()
  (blocked / "torch.py").write_text("raise ImportError('PyTorch is not installed here')\n")
  proc = _benchmark_command("--config=configs/cifar100_resnet18_mixskd.py", "--against=torch",
                            env={"PYTHONPATH": str(blocked)})
  # The last line of stderr (absl and TensorFlow may log before it), and no traceback.
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --against=torch needs PyTorch: pip install torch --index-url "
      "https://download.pytorch.org/whl/cpu")
  proc = _benchmark_command("--config=configs/default.py", "--against=torch")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --against=torch covers config.model.name in ['cifar_resnet18', 'cifar_resnet50', "
      "'imagenet_resnet50'] (the official MixSKD ResNets); got 'small_resnet'.")


@pytest.mark.slow
def test_device_check_script_runs_on_cpu_with_fake_devices(tmp_path):
  """experiments/device_check.sh, as a GPU machine would run it, at CPU size: the bf16 steps
  are measured against a peak, and the 8-device compile is checked for moved activations
  (here on 8 fake CPU devices)."""
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(CONFIG="configs/default.py", BATCH="16", STEPS="1", SKIP_TORCH="1")
  proc = subprocess.run(["bash", "experiments/device_check.sh", str(tmp_path)], cwd=root,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  bf16 = json.loads((tmp_path / "bf16.json").read_text())
  assert bf16["config"]["dtype"] == "bfloat16" and bf16["config"]["batch_size"] == 16
  assert bf16["step"]["fraction_of_peak"] > 0 and bf16["ce_step"]["step_s"]["median"] > 0
  check = (tmp_path / "communication_8_check.txt").read_text()
  assert check.startswith("8 devices, 8 mix groups") and "no activations move" in check
  assert "skipped (SKIP_TORCH=1)" in (tmp_path / "side_by_side.txt").read_text()
