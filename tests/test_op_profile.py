"""bench/op_profile.py: op names sorted into kinds, the executed ops read from a real JAX trace
(a jitted convolution's gradient), and the command's --profile flag."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from mixskd_jax.bench import op_profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kinds_of_op_names():
  assert op_profile.kind_of("convolution.3") == "convolution"
  assert op_profile.kind_of("conv_general_dilated.2") == "convolution"
  assert op_profile.kind_of("transpose_copy_fusion.2") == "transpose"  # before copy and fusion
  assert op_profile.kind_of("dot.7") == "matmul"
  assert op_profile.kind_of("input_reduce_fusion") == "reduction"
  assert op_profile.kind_of("copy.1") == "copy"
  assert op_profile.kind_of("loop_multiply_fusion.4") == "elementwise fusion"
  assert op_profile.kind_of("custom-call.1") == op_profile.OTHER


def test_a_traced_gradient_shows_its_convolutions():
  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) ** 2)

  grad = jax.jit(jax.grad(loss))
  w, x = jnp.ones((3, 3, 8, 8)), jnp.ones((4, 16, 16, 8))
  grad(w, x).block_until_ready()  # compiled before the trace
  profile = op_profile.profile_calls(lambda: grad(w, x).block_until_ready(), calls=2)
  assert profile["calls"] == 2 and profile["total_s"] > 0
  assert "convolution" in profile["kinds"]  # the weight gradient is a convolution
  assert abs(sum(profile["kinds"].values()) - profile["total_s"]) < 1e-9
  assert profile["wall_s"] > 0 and profile["threads"] >= 1
  assert list(profile["ops"].values()) == sorted(profile["ops"].values(), reverse=True)
  text = op_profile.format_profile(profile, top=3)
  assert text.splitlines()[0].startswith("thread time per step")
  # One line per row, each with its thread time and share of the capacity.
  printed = {line[2:36].strip(): float(line[36:].split()[0]) for line in text.splitlines()[1:]
             if line.startswith("  ") and line[36:].strip().endswith("%")}
  rows = op_profile.breakdown_rows(profile)
  assert set(printed) == set(rows)
  for row, s in rows.items():
    assert printed[row] == pytest.approx(s * 1e3, abs=0.051)
  top_ops = text.split("they scheduled)\n")[1].splitlines()
  assert len(top_ops) == min(3, len(profile["ops"]))


def test_benchmark_command_prints_the_profile():
  out = subprocess.run(
      [sys.executable, "-m", "mixskd_jax.benchmark", "--config=configs/default.py:smoke",
       "--profile", "--steps=1", "--warmup=1"], cwd=REPO, capture_output=True, text=True,
      timeout=600, env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith("thread time per step") and "untraced step" in lines[0]
  assert any(line.strip().startswith("convolution") for line in lines)
