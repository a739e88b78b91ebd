"""bench/breakdown.py and bench/torch_profile.py: PyTorch's ops sorted into the rows both sides
share, each side's rows adding up to its wall time x threads, the printed difference per row,
and `benchmark --against=torch --profile` end to end (slow; PyTorch is test-only)."""

import json
import os
import subprocess
import sys

import pytest

from mixskd_jax.bench import breakdown, op_profile, thread_time, torch_profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_ops_fall_into_the_shared_rows():
  row = torch_profile.torch_row
  assert row("aten::mkldnn_convolution") == torch_profile.CONVOLUTION
  assert row("aten::convolution_backward") == torch_profile.CONVOLUTION
  assert row("aten::addmm") == row("aten::mm") == torch_profile.MATMUL
  assert row("aten::copy_") == row("aten::_to_copy") == torch_profile.LAYOUT
  assert row("aten::empty") == row("aten::t") == row("aten::view") == torch_profile.OTHER
  for op in ("aten::native_batch_norm", "aten::threshold_backward", "aten::add_",
             "aten::log_softmax", "aten::sum", "aten::tanh"):
    assert row(op) == torch_profile.ELEMENTWISE, op
  assert row("autograd::engine::evaluate_function: ReluBackward0") == torch_profile.RUNTIME
  assert row("Optimizer.step#SGD.step") == torch_profile.RUNTIME


def test_every_one_of_our_rows_has_a_shared_row():
  kinds = [k for k, _ in op_profile.KINDS] + [op_profile.OTHER]
  extra = [thread_time.RUNTIME, thread_time.IDLE, op_profile.OUTSIDE]
  assert set(breakdown.OUR_ROWS) == set(kinds + extra)
  assert set(breakdown.OUR_ROWS.values()) <= set(torch_profile.SHARED_ROWS)
  profile = {"kinds": {"convolution": 3.0, "transpose": 0.5, "copy": 0.25, "reduction": 0.125},
             "runtime_s": 0.1, "idle_s": 0.2, "outside_s": 0.05}
  rows = breakdown.our_rows(profile)
  assert rows[torch_profile.LAYOUT] == 0.75 and rows[torch_profile.ELEMENTWISE] == 0.125
  assert sum(rows.values()) == pytest.approx(3.0 + 0.75 + 0.125 + 0.35)


def _side(rows, capacity, step):
  return {"rows": rows, "capacity_s": capacity, "untraced_step_s": step}


def test_the_table_prints_each_row_and_the_difference():
  shared = torch_profile.SHARED_ROWS
  ours = dict.fromkeys(shared, 0.0) | {torch_profile.CONVOLUTION: 2.0, torch_profile.IDLE: 0.5}
  nchw = dict.fromkeys(shared, 0.0) | {torch_profile.CONVOLUTION: 2.25,
                                       torch_profile.OUTSIDE: 0.125}
  result = {"label": "x", "threads": 2, "torch": "2.x", "jax": "0.x", "steps": 2,
            "config": {"model": "cifar_resnet18", "data": "cifar100", "variant": "full",
                       "batch_size": 64},
            "machine": {"host_cpu": "CPU", "host_cores": 2, "load_average_1min": 0.5,
                        "load_average_1min_end": 0.6},
            "probe": {"gflops": 100.0},
            "steps_profiled": {"mixskd": {"ours": _side(ours, 2.5, 1.25),
                                          "nchw": _side(nchw, 2.375, 1.2),
                                          "channels_last": _side(nchw, 2.375, 1.1)}}}
  text = breakdown.format_breakdown(result)
  lines = {line[:38].strip(): line[38:].split() for line in text.splitlines()
           if line.startswith("  ")}
  assert lines[torch_profile.CONVOLUTION] == ["2000.0", "2250.0", "2250.0", "-250.0"]
  assert lines[torch_profile.IDLE] == ["500.0", "0.0", "0.0", "+500.0"]
  assert lines["total: wall x threads"] == ["2500.0", "2375.0", "2375.0", "+125.0"]
  assert lines["untraced step (wall, best of steps)"] == ["1250.0", "1200.0", "1100.0", "+50.0"]


@pytest.mark.slow
def test_benchmark_profile_against_torch_accounts_for_both_sides(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "breakdown.json"
  proc = subprocess.run(
      [sys.executable, "-m", "mixskd_jax.benchmark",
       "--config=configs/cifar100_resnet18_mixskd.py", "--config.batch_size=4", "--against=torch",
       "--profile", "--steps=1", "--warmup=1", "--skip_ce", f"--json_out={out}"], cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result["steps_profiled"]) == {"mixskd"}  # --skip_ce
  for name, sides in result["steps_profiled"].items():
    assert set(sides) == {"ours", "nchw", "channels_last"}
    for side, s in sides.items():
      assert set(s["rows"]) == set(torch_profile.SHARED_ROWS)
      # Every side's rows add up to its traced wall time x threads (ours: up to the caller's
      # thread working beyond the capacity, which the rows then exceed it by).
      assert sum(s["rows"].values()) >= s["capacity_s"] * (1 - 1e-6), (name, side)
      assert sum(s["rows"].values()) <= s["capacity_s"] * 1.05, (name, side)
      assert s["rows"][torch_profile.CONVOLUTION] > 0 and s["untraced_step_s"] > 0
  assert "mixskd step, ms" in proc.stdout and "cross_entropy step" not in proc.stdout
  assert "total: wall x threads" in proc.stdout
