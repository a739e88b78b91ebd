"""bench/thread_time.py: thread-pool tasks followed back to the op that scheduled them, and
every thread-second of a window given to an op, the runtime or idle (hand-built traces with
known answers), then a real trace of a convolution's gradient."""

import jax
import jax.numpy as jnp
import pytest

from mixskd_jax.bench import op_profile, thread_time
from mixskd_jax.bench.thread_time import Event

START, STOP, RECORD = thread_time.START_REGION, thread_time.STOP_REGION, thread_time.RECORD


def _op(name, start, duration):
  return Event(name, start, duration, op=name)


def test_pool_work_belongs_to_the_op_that_scheduled_it():
  # The convolution's event (0-10) only launches: it schedules task 1 at t=5, which the other
  # thread runs from 12 to 40. Window 0-50 on 2 threads = 100 ns of capacity.
  threads = {"a": [_op("convolution.1", 0, 10), Event(RECORD, 5, produces=1)],
             "b": [Event(START, 12, context=1), Event(STOP, 40)]}
  acc = thread_time.account(threads, window=(0, 50), capacity_threads=2)
  assert acc["ops"] == {"convolution.1": pytest.approx((10 + 28) * 1e-9)}
  assert acc["runtime_s"] == 0
  assert acc["busy_s"] == pytest.approx(38e-9)
  assert acc["idle_s"] == pytest.approx(62e-9)
  assert acc["capacity_s"] == pytest.approx(100e-9)


def test_tasks_scheduled_by_tasks_keep_their_root_op_and_ops_inside_tasks_are_their_own():
  # The executor's task 7 (no op scheduled it: runtime) runs a fusion (20-30) and a
  # convolution (30-35) that schedules task 8; task 8 schedules task 9 (Eigen splitting its
  # work); both belong to the convolution.
  threads = {
      "pool0": [Event(START, 10, context=7), _op("fusion.2", 20, 10), _op("convolution.3", 30, 5),
                Event(RECORD, 32, produces=8), Event(STOP, 50)],
      "pool1": [Event(START, 36, context=8), Event(RECORD, 40, produces=9), Event(STOP, 60),
                Event(START, 61, context=9), Event(STOP, 70)],
      "unrelated": [Event(RECORD, 1, produces=7)],
  }
  acc = thread_time.account(threads, window=(0, 100), capacity_threads=2)
  assert acc["ops"]["fusion.2"] == pytest.approx(10e-9)
  assert acc["ops"]["convolution.3"] == pytest.approx((5 + 24 + 9) * 1e-9)
  # Task 7 lasted 40 ns, of which the two ops took 15.
  assert acc["runtime_s"] == pytest.approx(25e-9)
  total = sum(acc["ops"].values()) + acc["runtime_s"] + acc["idle_s"]
  assert total == pytest.approx(acc["capacity_s"])


def test_the_window_clips_and_a_blocking_wait_is_nobodys_work():
  # The caller's thread runs a copy inline, then blocks in the wait until the pool is done.
  threads = {
      "client": [_op("copy.1", 0, 4), Event("ThunkExecutor::Execute (wait for completion)", 5,
                                            100, wait=True)],
      "pool": [Event(START, 90, context=3), _op("add_fusion", 95, 30), Event(STOP, 130)],
  }
  acc = thread_time.account(threads, window=(0, 110), capacity_threads=2)
  assert acc["ops"]["copy.1"] == pytest.approx(4e-9)
  assert acc["ops"]["add_fusion"] == pytest.approx(15e-9)  # 95-110 inside the window
  assert acc["runtime_s"] == pytest.approx(5e-9)  # the task's 90-95
  assert acc["idle_s"] == pytest.approx((220 - 24) * 1e-9)
  assert acc["overlap_s"] == 0


def test_busy_beyond_the_capacity_is_reported_as_overlap():
  threads = {f"t{k}": [_op(f"fusion.{k}", 0, 10)] for k in range(3)}
  acc = thread_time.account(threads, window=(0, 10), capacity_threads=2)
  assert acc["busy_s"] == pytest.approx(30e-9)
  assert acc["idle_s"] == 0 and acc["overlap_s"] == pytest.approx(10e-9)


def test_a_real_trace_adds_up_to_wall_times_threads():
  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) ** 2)

  w, x = jnp.ones((3, 3, 32, 32)), jnp.ones((16, 32, 32, 32))
  grad = jax.jit(jax.grad(loss)).lower(w, x).compile()
  grad(w, x).block_until_ready()
  profile = op_profile.profile_calls(lambda: grad(w, x).block_until_ready(), calls=2,
                                     hlo_text=grad.as_text())
  rows = op_profile.breakdown_rows(profile)
  assert sum(rows.values()) - profile["overlap_s"] == pytest.approx(profile["capacity_s"],
                                                                    rel=1e-6)
  assert profile["capacity_s"] == pytest.approx(profile["wall_s"] * profile["threads"])
  assert sum(profile["kinds"].values()) == pytest.approx(profile["total_s"])
  # The forward and input-gradient convolutions (YNNPACK fusions, by jax's default options,
  # named for the library: their kind comes from the HLO) hold most of the work.
  assert {profile["op_kinds"][op] for op in profile["ops"] if "ynn" in op} == {"convolution"}
  assert rows["convolution"] > 0.3 * sum(profile["kinds"].values())


def test_fusions_take_their_kind_from_the_computation_they_call():
  hlo = """
%fused_computation (p: f32[2,2], q: f32[2,2]) -> f32[2,2] {
  ROOT %dot.1 = f32[2,2]{1,0} dot(%p, %q), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.1 (p: f32[2,2]) -> f32[2] {
  %c = f32[] constant(0)
  ROOT %reduce.3 = f32[2]{0} reduce(%p, %c), dimensions={1}, to_apply=%add
}

ENTRY %main (a: f32[2,2]) -> f32[2] {
  %ynn_fusion = f32[2,2]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_computation
  ROOT %multiply_fusion = f32[2]{0} fusion(%ynn_fusion), kind=kInput, calls=%fused_computation.1
}
"""
  kinds = op_profile.fusion_kinds(hlo)
  assert kinds == {"ynn_fusion": "matmul", "multiply_fusion": "reduction"}
  assert op_profile.kind_of("ynn_fusion", kinds) == "matmul"
  assert op_profile.kind_of("ynn_fusion") == "elementwise fusion"  # by its name alone
