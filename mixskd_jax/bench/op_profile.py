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
import re
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections

from mixskd_jax.bench import thread_time
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
OUTSIDE = "outside compiled code"


_FUSED_WORK = (("convolution", " convolution("), ("matmul", " dot("), ("reduction", " reduce("))


def kind_of(op: str, fused: dict[str, str] | None = None) -> str:
  """The kind of an HLO op name, e.g. 'transpose_copy_fusion.2' -> 'transpose'; a fusion named
  for its library, not its work ('ynn_fusion.1': YNNPACK's convolutions, matmuls or reductions),
  takes its kind from `fused` (`fusion_kinds` of the compiled HLO) where given."""
  if fused and op in fused:
    return fused[op]
  name = op.lower()
  for kind, marks in KINDS:
    if any(m in name for m in marks):
      return kind
  return OTHER


def fusion_kinds(hlo_text: str) -> dict[str, str]:
  """{fusion op: kind} for the fusions of a compiled module (`compiled.as_text()`) whose called
  computation holds a convolution, a dot or a reduce (in that order of precedence)."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:%)?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      current = bodies.setdefault(head.group(1), [])
    elif current is not None:
      current.append(line)
  kinds = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? fusion\(.*?calls=%?([\w.\-]+)",
                       hlo_text, flags=re.MULTILINE):
    body = "\n".join(bodies.get(m.group(2), ()))
    for kind, mark in _FUSED_WORK:
      if mark in body:
        kinds[m.group(1)] = kind
        break
  return kinds


def trace_window(threads: dict[str, list[thread_time.Event]]) -> tuple[int, int]:
  """(first event's start, last event's end) over all threads: the span in which the traced
  steps' compiled code ran (the events kept are ops and pool tasks only)."""
  events = [e for evs in threads.values() for e in evs]
  return min(e.start_ns for e in events), max(e.end_ns for e in events)


def profile_calls(fn: Callable[[], Any], calls: int = 3,
                  hlo_text: str | None = None) -> dict[str, Any]:
  """Traces `calls` calls of `fn` (each should run and wait for compiled steps) and accounts
  for every thread-second of them (`bench.thread_time`).

  Returns, all in seconds per call:
    {"calls", "ops": {op: thread time}, "kinds": {kind: thread time}, "total_s": the ops' sum,
    "op_kinds": {op: kind} (`kind_of`, with `fusion_kinds(hlo_text)` where the compiled
    module's text is given), "runtime_s": pool tasks no op scheduled, "idle_s": threads doing nothing while compiled
    code ran, "outside_s": threads x the time no compiled code ran (dispatch, Python),
    "capacity_s": threads x wall, "wall_s", "threads"}. The ops (largest first) and kinds sum
    to total_s, and total + runtime + idle + outside = capacity (less any "overlap_s": busy
    time beyond `threads`, from the calling thread).
  """
  threads_usable = usable_cpus()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      start = time.perf_counter()
      for _ in range(calls):
        fn()
      wall = time.perf_counter() - start
    finally:
      jax.profiler.stop_trace()
    threads: dict[str, list[thread_time.Event]] = collections.defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
      with open(path, "rb") as f:
        for name, events in thread_time.events_from_xspace(f.read()).items():
          threads[name] += events
  lo, hi = trace_window(threads)
  window_s = min((hi - lo) * 1e-9, wall)
  acc = thread_time.account(threads, window=(lo, hi), capacity_threads=threads_usable)
  ops = {op: s / calls for op, s in acc["ops"].items()}
  fused = fusion_kinds(hlo_text) if hlo_text else {}
  op_kinds = {op: kind_of(op, fused) for op in ops}
  kinds = collections.Counter()
  for op, s in ops.items():
    kinds[op_kinds[op]] += s
  return {"calls": calls, "ops": ops, "op_kinds": op_kinds, "kinds": dict(kinds.most_common()),
          "total_s": sum(ops.values()), "runtime_s": acc["runtime_s"] / calls,
          "idle_s": acc["idle_s"] / calls, "overlap_s": acc["overlap_s"] / calls,
          "outside_s": (wall - window_s) * threads_usable / calls,
          "capacity_s": wall * threads_usable / calls, "wall_s": wall / calls,
          "threads": threads_usable}


def profile_step(config: ml_collections.ConfigDict, *, steps: int = 3,
                 warmup: int = 2) -> dict[str, Any]:
  """`config`'s train step compiled as the trainer compiles it, run `warmup` times and then
  traced over `steps` steps (`profile_calls`); adds "step_s", the best of `steps` untraced
  steps after the trace."""
  _, runner = compile_step(config)
  runner.time(steps=1, warmup=warmup)
  profile = profile_calls(lambda: runner.time(steps=1, warmup=0), calls=steps,
                          hlo_text=runner.hlo_text())
  profile["step_s"] = min(runner.time(steps=steps, warmup=0))
  return profile


def breakdown_rows(profile: dict[str, Any]) -> dict[str, float]:
  """{row: thread seconds per step}: the kinds of op, then the runtime, idle threads and the
  time outside compiled code; they sum to `capacity_s` (up to `overlap_s`)."""
  rows = dict(profile["kinds"])
  rows[thread_time.RUNTIME] = profile["runtime_s"]
  rows[thread_time.IDLE] = profile["idle_s"]
  rows[OUTSIDE] = profile["outside_s"]
  return rows


def format_profile(profile: dict[str, Any], *, top: int = 12) -> str:
  """Each row's thread time per step and its share of the capacity, then the `top` ops with
  the most thread time."""
  capacity = profile["capacity_s"]
  step = profile.get("step_s")
  untraced = f"; untraced step {step * 1e3:.1f} ms" if step else ""
  lines = [f"thread time per step: {profile['threads']} threads x "
           f"{profile['wall_s'] * 1e3:.1f} ms traced wall = {capacity * 1e3:.1f} ms{untraced}"]
  lines += [f"  {row:<34} {s * 1e3:9.1f} ms  {s / capacity:6.1%}"
            for row, s in breakdown_rows(profile).items()]
  if profile.get("overlap_s", 0.0) > 0:
    lines.append(f"  (busy beyond {profile['threads']} threads, from the calling thread: "
                 f"{profile['overlap_s'] * 1e3:.1f} ms)")
  lines.append(f"the {top} ops with the most thread time (own events and the pool work they "
               "scheduled)")
  lines += [f"  {op:<40} {s * 1e3:9.2f} ms  {profile['op_kinds'][op]}"
            for op, s in list(profile["ops"].items())[:top]]
  return "\n".join(lines)
