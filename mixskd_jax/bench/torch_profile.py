"""Where PyTorch's step spends its thread time, in the same rows as ours (`op_profile`), for the
side-by-side breakdown (`side_by_side.profile_both`).

PyTorch's profiler gives each op's self time (its time less its children's) on the thread that
called it. A CPU op parallelizes inside itself (OpenMP) over all of PyTorch's threads and
returns when they are done, so it holds every thread for its duration: its thread time is its
self time x threads, whatever part of that its workers spent waiting (PyTorch's idle threads
are inside its ops' rows; ours are a row of their own). Time in no op (Python, the autograd
engine between ops) holds the threads too: x threads, in the row "outside ops". The rows sum to
the traced steps' wall time x threads.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from mixskd_jax.bench.torch_side import TorchSide, stderr_silenced

# (row, substrings of an aten op name), first match wins. The rows are the ones both sides
# share (`SHARED_ROWS`), so the table compares like with like.
CONVOLUTION = "convolution"
MATMUL = "matmul"
ELEMENTWISE = "BatchNorm, elementwise, reductions"
LAYOUT = "layout copies and transposes"
OTHER = "other ops (allocation, views...)"
RUNTIME = "runtime between ops"
IDLE = "idle threads"
OUTSIDE = "outside ops (Python, dispatch)"
SHARED_ROWS = (CONVOLUTION, MATMUL, ELEMENTWISE, LAYOUT, OTHER, RUNTIME, IDLE, OUTSIDE)

_TORCH_KINDS = (
    (RUNTIME, ("autograd::", "backward0", "backward1", "optimizer.", "#sgd.")),
    (CONVOLUTION, ("conv",)),
    (MATMUL, ("::mm", "::addmm", "::bmm", "::matmul", "::linear")),
    (LAYOUT, ("copy", "contiguous", "clone", "::cat", "::stack", "transpose", "permute")),
)
# aten ops that only allocate or make views (base names, or their prefixes).
_OTHER_PREFIXES = ("empty", "zeros", "ones", "full", "resize", "as_strided", "view", "reshape",
                   "expand", "select", "slice", "squeeze", "unsqueeze", "detach", "alias",
                   "narrow", "lift", "set_", "scalar_tensor", "unbind", "split")


def torch_row(op: str) -> str:
  """The shared row of an aten op, e.g. 'aten::mkldnn_convolution' -> convolution; an op no
  rule names is elementwise (aten's pointwise ops, BatchNorm, losses, the SGD update)."""
  name = op.lower()
  for row, marks in _TORCH_KINDS:
    if any(m in name for m in marks):
      return row
  base = name.removeprefix("aten::")
  if base == "t" or base.startswith(_OTHER_PREFIXES):
    return OTHER
  return ELEMENTWISE


def profile_torch_side(side: TorchSide, *, steps: int = 2, warmup: int = 1) -> dict[str, Any]:
  """Profiles `steps` steps of `side` after `warmup` untraced ones.

  Returns, in seconds per step: {"ops": {aten op: thread time}, "rows": {shared row: thread
  time}, "capacity_s": wall x threads, "wall_s", "threads"}; the rows sum to capacity_s.
  """
  torch = side.torch
  threads = torch.get_num_threads()
  for _ in range(warmup):
    side.step()
  profiler = torch.profiler
  with stderr_silenced(), profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      side.step()
    side._sync()  # pylint: disable=protected-access
    wall = time.perf_counter() - start
  ops = collections.Counter()
  for e in prof.events():
    ops[e.name] += e.self_cpu_time_total * 1e-6 * threads / steps
  rows = dict.fromkeys(SHARED_ROWS, 0.0)
  for op, s in ops.items():
    rows[torch_row(op)] += s
  capacity = wall * threads / steps
  rows[OUTSIDE] = max(capacity - sum(rows.values()), 0.0)
  return {"ops": dict(ops.most_common()), "rows": rows, "capacity_s": capacity,
          "wall_s": wall / steps, "threads": threads}
