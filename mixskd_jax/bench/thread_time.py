"""Every thread-second of a traced XLA:CPU step, given to the op that caused it, to the runtime
between ops, or to idle threads.

JAX's profiler times each executed HLO op (an event carrying `hlo_op`) on the thread that ran
it, but an op that hands work to Eigen's thread pool (XLA:CPU's Eigen convolutions do) returns
before that work is done, so the op's event holds only its launch. The pool's own trace events
close the gap: TSL's `ThreadpoolListener` marks where each pool task starts and stops
(`StartRegion` with a context id `_c`, `StopRegion`) and, on the thread that schedules a task,
a `Record` whose `_p` is that task's context id. Following a task back to the event that
scheduled it (an op, or a pool task that some op scheduled) names the op that owns the task.

`account(threads, window=...)` splits the threads' capacity (window length x threads) into:
each op's thread time (its own events plus the pool tasks it scheduled, minus any ops that ran
inside those), the runtime's (pool tasks no op scheduled: the thunk executor launching the next
ops), and idle (no event on the thread: waiting, or spinning in the pool before it sleeps).
They add up to the capacity exactly, when as many threads as the capacity counts do the work;
a third thread (the caller's, which runs a few copies before it waits) can push the busy sum
past it, and `overlap_s` says by how much.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Mapping

START_REGION = "ThreadpoolListener::StartRegion"
STOP_REGION = "ThreadpoolListener::StopRegion"
RECORD = "ThreadpoolListener::Record"
# The PjRt client's thread launches a step, runs a few ops inline, then blocks in this event
# until the pool has run the rest: blocked time, not work.
WAIT_SUFFIX = "(wait for completion)"
RUNTIME = "runtime between ops"
IDLE = "idle threads"


@dataclasses.dataclass(frozen=True)
class Event:
  """One trace event on one thread: nanoseconds, and the stats the accounting reads."""
  name: str
  start_ns: int
  duration_ns: int = 0
  op: str | None = None       # the HLO op it executes (its `hlo_op` stat), if any
  context: int | None = None  # `_c` of a StartRegion: the id of the task that starts
  produces: int | None = None  # `_p` of a Record: the id of the task being scheduled
  wait: bool = False  # a blocking wait: its time is nobody's work

  @property
  def end_ns(self) -> int:
    return self.start_ns + self.duration_ns


def events_from_xspace(xspace_bytes: bytes) -> dict[str, list[Event]]:
  """{thread (trace line) name: its events} from a serialized XSpace, read with
  `jax.profiler.ProfileData`; only the events the accounting uses are kept."""
  import jax  # pylint: disable=import-outside-toplevel
  threads: dict[str, list[Event]] = collections.defaultdict(list)
  for plane in jax.profiler.ProfileData.from_serialized_xspace(xspace_bytes).planes:
    for line in plane.lines:
      key = f"{plane.name}/{line.name}"
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
          threads[key].append(Event(e.name, int(e.start_ns), int(e.duration_ns), op=e.name))
        elif e.name == START_REGION and "_c" in stats:
          threads[key].append(Event(e.name, int(e.start_ns), context=int(stats["_c"])))
        elif e.name == STOP_REGION:
          threads[key].append(Event(e.name, int(e.start_ns)))
        elif e.name.endswith(WAIT_SUFFIX):
          threads[key].append(Event(e.name, int(e.start_ns), int(e.duration_ns), wait=True))
        elif e.name == RECORD and "_p" in stats:
          threads[key].append(Event(e.name, int(e.start_ns), produces=int(stats["_p"])))
  return dict(threads)


@dataclasses.dataclass
class _Span:
  """An op's event or a pool task on one thread, with the time of what ran inside it."""
  start: int
  end: int
  op: str | None = None
  task: int | None = None
  wait: bool = False
  inner_ns: int = 0


def _spans(events: list[Event], window: tuple[int, int]):
  """A thread's ops and pool tasks, each with its own time (less what ran inside it), clipped
  to the window, and the records scheduled from within each: (spans, {task id: span})."""
  lo, hi = window
  spans: list[_Span] = []
  scheduled_from: dict[int, _Span | None] = {}
  stack: list[_Span] = []

  def close(span: _Span, at: int) -> None:
    span.end = max(span.start, min(at, span.end))
    if stack:
      stack[-1].inner_ns += _clipped(span, lo, hi)
    spans.append(span)

  events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
  task_open: _Span | None = None
  for e in events:
    while stack and stack[-1].task is None and stack[-1].end <= e.start_ns:
      span = stack.pop()
      close(span, span.end)
    if e.op is not None or e.wait:
      stack.append(_Span(e.start_ns, e.end_ns, op=e.op, wait=e.wait))
    elif e.name == START_REGION:
      if task_open is not None:  # a lost stop: the new task ends the old one
        _close_task(stack, task_open, e.start_ns, close)
      task_open = _Span(e.start_ns, max(e.start_ns, hi), task=e.context)
      stack.append(task_open)
    elif e.name == STOP_REGION and task_open is not None:
      _close_task(stack, task_open, e.start_ns, close)
      task_open = None
    elif e.name == RECORD:
      scheduled_from[e.produces] = stack[-1] if stack else None
  while stack:
    span = stack.pop()
    close(span, span.end)
  return spans, scheduled_from


def _close_task(stack: list[_Span], task: _Span, at: int, close) -> None:
  """Ends pool task `task` at `at`, with any op still open inside it."""
  while stack:
    span = stack.pop()
    close(span, at)
    if span is task:
      return


def _clipped(span: _Span, lo: int, hi: int) -> int:
  return max(0, min(span.end, hi) - max(span.start, lo))


def account(threads: Mapping[str, Iterable[Event]], *, window: tuple[int, int],
            capacity_threads: int) -> dict:
  """Thread time per op, the runtime's and idle time within `window` (ns, trace clock).

  Args:
    threads: {thread name: its events}, e.g. from `events_from_xspace`.
    window: (start, end) in the events' clock; time outside it is left out.
    capacity_threads: the threads the step may keep busy (the CPUs JAX uses).

  Returns:
    {"ops": {op: seconds}, "runtime_s", "idle_s", "busy_s", "capacity_s", "overlap_s"}:
    busy = sum(ops) + runtime, capacity = window x capacity_threads, idle = capacity - busy
    (>= 0; `overlap_s` is what busy exceeds capacity by, from a thread beyond the capacity).
  """
  lo, hi = window
  all_spans: list[_Span] = []
  scheduled_from: dict[int, _Span | None] = {}
  for events in threads.values():
    spans, records = _spans(list(events), window)
    all_spans += spans
    scheduled_from.update(records)

  owners: dict[int, str | None] = {}

  def owner_of_task(task: int, depth: int = 0) -> str | None:
    if task in owners:
      return owners[task]
    parent = scheduled_from.get(task)
    if parent is None or depth > 10_000:
      owner = None
    elif parent.op is not None:
      owner = parent.op
    else:
      owner = owner_of_task(parent.task, depth + 1)
    owners[task] = owner
    return owner

  ops: dict[str, float] = collections.Counter()
  runtime_ns = 0
  for span in all_spans:
    if span.wait:
      continue
    own = max(0, _clipped(span, lo, hi) - span.inner_ns)
    name = span.op if span.op is not None else owner_of_task(span.task)
    if name is None:
      runtime_ns += own
    else:
      ops[name] += own * 1e-9
  busy = sum(ops.values()) + runtime_ns * 1e-9
  capacity = (hi - lo) * 1e-9 * capacity_threads
  return {"ops": dict(ops.most_common()), "runtime_s": runtime_ns * 1e-9,
          "idle_s": max(capacity - busy, 0.0), "busy_s": busy, "capacity_s": capacity,
          "overlap_s": max(busy - capacity, 0.0)}
