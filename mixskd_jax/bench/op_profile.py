"""Where a compiled step's time goes on XLA:CPU: each executed HLO op (a thunk: a convolution,
a fusion, a transpose...) timed by JAX's profiler, summed per op and per kind of op.

    python -m mixskd_jax.benchmark --config=configs/cifar100_resnet18_mixskd.py --profile

`profile_calls(fn, calls)` traces `calls` calls of a function that runs compiled steps, reads
the trace (the XSpace protobuf, parsed with TensorFlow's copy of its schema) and keeps the
events that carry an `hlo_op`: the ops as executed, on whichever thread ran them. Ops that run
concurrently on the two cores both count, so the kinds' sum can exceed the step's wall time;
the fractions say which kinds of op dominate, the first lever for closing a gap.

What the trace does not time: work an op hands to a thread pool and returns from, as XLA:CPU's
Eigen convolutions do, counts only for the op's launch. `format_profile` therefore also prints
the traced steps' wall time times the threads less the ops' sum: that asynchronous work plus
idle time. On the CIFAR ResNet-18 MixSKD step with Eigen convolutions it is most of the step.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections

from mixskd_jax.bench.host import usable_cpus
from mixskd_jax.bench.step import compile_step

# (kind, substrings of an HLO op name), first match wins: XLA names an op after what it does
# ("convolution.3", "transpose_copy_fusion.2", "loop_multiply_fusion", "reduce-window").
KINDS = (
    ("convolution", ("conv",)),
    ("transpose", ("transpose",)),
    ("matmul", ("dot", "matmul", "gemm")),
    ("reduction", ("reduce",)),
    ("copy", ("copy",)),
    ("elementwise fusion", ("fusion",)),
)
OTHER = "other"


def kind_of(op: str) -> str:
  """The kind of an HLO op name, e.g. 'transpose_copy_fusion.2' -> 'transpose'."""
  name = op.lower()
  for kind, marks in KINDS:
    if any(m in name for m in marks):
      return kind
  return OTHER


def op_times(xspace_bytes: bytes) -> dict[str, float]:
  """{HLO op name: seconds summed over its executions} from a serialized XSpace (read with
  JAX's own `jax.profiler.ProfileData`)."""
  seconds = collections.Counter()
  for plane in jax.profiler.ProfileData.from_serialized_xspace(xspace_bytes).planes:
    for line in plane.lines:
      for event in line.events:
        if any(name == "hlo_op" for name, _ in event.stats):
          seconds[event.name] += event.duration_ns * 1e-9
  return dict(seconds)


def profile_calls(fn: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
  """Traces `calls` calls of `fn` (each should run and wait for compiled steps).

  Returns:
    {"calls", "ops": {op: seconds per call}, "kinds": {kind: seconds per call}, "total_s",
    "wall_s": seconds per traced call, "threads": the CPUs this process may run on}: the ops'
    times summed per call, largest first.
  """
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      wall = (time.perf_counter() - start) / calls
    finally:
      jax.profiler.stop_trace()
    times = collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
      with open(path, "rb") as f:
        times.update(op_times(f.read()))
  ops = {op: s / calls for op, s in times.most_common()}
  kinds = collections.Counter()
  for op, s in ops.items():
    kinds[kind_of(op)] += s
  return {"calls": calls, "ops": ops, "kinds": dict(kinds.most_common()),
          "total_s": sum(ops.values()), "wall_s": wall, "threads": usable_cpus()}


def profile_step(config: ml_collections.ConfigDict, *, steps: int = 3,
                 warmup: int = 2) -> dict[str, Any]:
  """`config`'s train step compiled as the trainer compiles it, run `warmup` times and then
  traced over `steps` steps (`profile_calls`); adds "step_s", the last untraced step's time."""
  _, runner = compile_step(config)
  step_s = runner.time(steps=1, warmup=warmup)[0]
  profile = profile_calls(lambda: runner.time(steps=1, warmup=0), calls=steps)
  profile["step_s"] = step_s
  return profile


def format_profile(profile: dict[str, Any], *, top: int = 12) -> str:
  """The kinds' time per call and share, then the `top` slowest ops."""
  total = profile["total_s"] or float("nan")
  step = profile.get("step_s")
  wall = f"; the step's wall time untraced: {step * 1e3:.1f} ms" if step else ""
  lines = [f"ops' time per step by kind (summed over threads: {total * 1e3:.1f} ms{wall})"]
  lines += [f"  {kind:<20} {s * 1e3:9.1f} ms  {s / total:6.1%}"
            for kind, s in profile["kinds"].items()]
  if profile.get("wall_s") and profile.get("threads"):
    capacity = profile["wall_s"] * profile["threads"]
    lines.append(f"not in any op's time: {max(capacity - total, 0.0) * 1e3:.1f} ms of "
                 f"{profile['threads']} threads x {profile['wall_s'] * 1e3:.1f} ms traced wall "
                 "(work handed to a thread pool, as Eigen's convolutions are, and idle time)")
  lines.append(f"the {top} slowest ops")
  lines += [f"  {op:<40} {s * 1e3:9.2f} ms  {kind_of(op)}"
            for op, s in list(profile["ops"].items())[:top]]
  return "\n".join(lines)
