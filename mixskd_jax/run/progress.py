"""What a run shows on the terminal as it goes: the progress line, the evaluation line and the
final summary. (Keeping the libraries' start-up noise off the terminal, and the log format, are
`run.console`; its names are re-exported here.)

The progress line's rate is the steps of a sliding window of recent reports over the wall
time of that window, evaluation and checkpoint time left out:

  step 300/702 (42.7%)  1.02 steps/s  ETA 6m35s  loss 10.12  acc(backbone) 73.9%

The window spans at least `window` reports and at least `min_window_s` seconds, so one slow
stretch (another job on the machine, a stall in the input pipeline) moves the rate by its share
of the window, not to its own momentary value; and the ETA is the remaining steps over that rate.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging

from mixskd_jax.run.console import (ConsoleFormatter, QuietLibraries, configure_console,
                                    print_lines, quiet_tensorflow_startup)

__all__ = [
    "REPORT_EVERY_S", "WINDOW_MIN_S", "WINDOW_REPORTS", "ProgressReporter", "format_duration",
    "format_eval", "format_rate", "heads", "one_line_summary", "summary_lines",
    # Re-exported from run.console (moved there; importable from here as before).
    "ConsoleFormatter", "QuietLibraries", "configure_console", "print_lines",
    "quiet_tensorflow_startup",
]

REPORT_EVERY_S = 60.0  # a progress line at least this often, whatever log_every_steps says
WINDOW_REPORTS = 10
WINDOW_MIN_S = 60.0


# ---------------------------------------------------------------------------------------------
# Numbers as the terminal shows them.

def format_duration(seconds: float) -> str:
  """45s, 6m35s, 1h02m, 2d03h."""
  if seconds is None or not math.isfinite(seconds):
    return "--"
  s = max(0, int(round(seconds)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_rate(steps_per_s: Optional[float]) -> str:
  """1.02 steps/s, 12.3 steps/s, 590 steps/s; -- before there is a rate."""
  if steps_per_s is None:
    return "-- steps/s"
  if steps_per_s < 10:
    return f"{steps_per_s:.2f} steps/s"
  if steps_per_s < 100:
    return f"{steps_per_s:.1f} steps/s"
  return f"{steps_per_s:.0f} steps/s"


def _head_order(head: str) -> tuple:
  """backbone, branch1, branch2, ..., self_teacher, then anything else by name."""
  if head == "backbone":
    return (0, 0, head)
  if head.startswith("branch") and head[6:].isdigit():
    return (1, int(head[6:]), head)
  if head == "self_teacher":
    return (2, 0, head)
  return (3, 0, head)


def heads(metrics: Mapping[str, Any], prefix: str) -> list[tuple[str, float]]:
  """[(head, value)] of the metrics named `<prefix><head>`, backbone first, then the branches,
  then the self-teacher."""
  found = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
  return sorted(found, key=lambda hv: _head_order(hv[0]))


# ---------------------------------------------------------------------------------------------
# The progress line.

class ProgressReporter:
  """Reports `step n/N (p%)  rate  ETA  loss  acc` every `every_steps` steps (and at least
  every `every_s` seconds), with a windowed rate that is stable under load.

  The loop calls `start(step)` once the first step (which compiles) is done, wraps evaluation
  and checkpointing in `excluded()`, asks `due(step)` after each step and calls
  `report(step, metrics)` at the logged steps. There is no rate before two marks (the start
  and the first report).

  Args:
    num_steps: the run's last step.
    every_steps: report when `step % every_steps == 0` (config.log_every_steps).
    every_s: also report when this long passed since the last line.
    window: the rate spans at least this many report intervals ...
    min_window_s: ... and at least this many seconds (of training time).
    clock: seconds, monotonic (a fake one in tests).
    log: where the line goes (absl INFO by default).
    writer: optional clu metric writer; gets `steps_per_sec` at each report.
  """

  def __init__(self, num_steps: int, *, every_steps: int, every_s: float = REPORT_EVERY_S,
               window: int = WINDOW_REPORTS, min_window_s: float = WINDOW_MIN_S,
               clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = logging.info, writer=None):
    self.num_steps, self.every_steps, self.every_s = num_steps, max(1, every_steps), every_s
    self.window, self.min_window_s = max(1, window), min_window_s
    self._clock, self._log, self._writer = clock, log, writer
    self._excluded = 0.0
    self._marks: collections.deque = collections.deque()  # (training time, step)
    self._last_line = None  # clock time of the last line (or of start)

  def _now(self) -> float:
    """Training time: the clock minus the excluded blocks."""
    return self._clock() - self._excluded

  def start(self, step: int) -> None:
    """The first mark: `step` steps are done (the compiling one included)."""
    self._marks.clear()
    self._marks.append((self._now(), step))
    self._last_line = self._clock()

  @contextlib.contextmanager
  def excluded(self):
    """A block whose wall time the rate leaves out (evaluation, checkpointing)."""
    t = self._clock()
    try:
      yield
    finally:
      self._excluded += self._clock() - t

  def due(self, step: int) -> bool:
    """Whether a line is due after `step`: a multiple of every_steps, the last step, or
    every_s seconds since the last line."""
    if step % self.every_steps == 0 or step >= self.num_steps:
      return True
    return self._last_line is not None and self._clock() - self._last_line >= self.every_s

  def mark(self, step: int) -> None:
    """Records that `step` steps are done now, and slides the window."""
    if self._marks and step <= self._marks[-1][1]:
      return
    self._marks.append((self._now(), step))
    # Drop the oldest mark while the window keeps `window` intervals and `min_window_s`.
    while len(self._marks) > self.window + 1 and (
        self._marks[-1][0] - self._marks[1][0] >= self.min_window_s):
      self._marks.popleft()

  def rate(self) -> Optional[float]:
    """Steps per second of training time over the window; None before two marks."""
    if len(self._marks) < 2:
      return None
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    if t1 <= t0:
      return None
    return (s1 - s0) / (t1 - t0)

  def eta(self, step: int) -> Optional[float]:
    """Seconds until num_steps at the windowed rate; None without a rate."""
    rate = self.rate()
    if not rate:
      return None
    return max(0, self.num_steps - step) / rate

  def line(self, step: int, metrics: Optional[Mapping[str, float]] = None) -> str:
    """The progress line for `step` (marks nothing)."""
    percent = 100.0 * step / self.num_steps if self.num_steps else 100.0
    rate = self.rate()
    parts = [f"step {step}/{self.num_steps} ({percent:.1f}%)", format_rate(rate),
             f"ETA {format_duration(self.eta(step)) if rate else '--'}"]
    metrics = metrics or {}
    if "train/loss" in metrics:
      parts.append(f"loss {metrics['train/loss']:.4g}")
    accuracy = heads(metrics, "train/accuracy/")
    if accuracy:
      head, value = accuracy[0]
      parts.append(f"acc({head}) {100 * value:.1f}%")
    return "  ".join(parts)

  def report(self, step: int, metrics: Optional[Mapping[str, float]] = None) -> str:
    """Marks `step`, logs its line and returns it."""
    self.mark(step)
    text = self.line(step, metrics)
    self._log(text)
    self._last_line = self._clock()
    rate = self.rate()
    if self._writer is not None and rate is not None:
      self._writer.write_scalars(step, {"steps_per_sec": rate})
    return text


# ---------------------------------------------------------------------------------------------
# Evaluation line and final summary.

def format_eval(step: int, epoch: float, metrics: Mapping[str, float]) -> str:
  """`eval step 469 (epoch 1.00): top-1 backbone 77.5%  branch1 ...  |  loss 0.61  ECE 3.2`."""
  top1 = "  ".join(f"{h} {v:.2f}%" for h, v in heads(metrics, "eval/top1/"))
  extra = []
  if "eval/loss" in metrics:
    extra.append(f"loss {metrics['eval/loss']:.4g}")
  if "eval/ece/backbone" in metrics:
    extra.append(f"ECE(backbone) {metrics['eval/ece/backbone']:.2f}%")
  text = f"eval step {step} (epoch {epoch:.2f}): top-1 {top1}"
  return text + ("  |  " + "  ".join(extra) if extra else "")


def _join(workdir: str, name: str) -> str:
  return workdir.rstrip("/") + "/" + name if "://" in workdir else os.path.join(workdir, name)


def summary_lines(results: Mapping[str, Any], workdir: str) -> list[str]:
  """The end of a run in a few lines: finished or preempted, steps, wall time, test top-1 of
  every head, the best backbone top-1, and where results.json, the checkpoints and the
  TensorBoard logs are. (Calibration and the history stay in results.json.)"""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  step, total = results.get("step"), results.get("num_steps", results.get("step"))
  took = format_duration(results.get("wall_time_s"))
  step_time = results.get("train_step_time_s")
  speed = f", {1000 * step_time:.1f} ms/step after compilation" if step_time else ""
  if results.get("preempted"):
    lines = [f"Preempted at step {step}/{total} after {took}: rerun the same command to resume "
             "from the latest checkpoint."]
  elif results.get("finished"):
    lines = [f"Finished: {step}/{total} steps in {took} ({results.get('steps_this_run')} "
             f"this run{speed})."]
  else:
    lines = [f"Stopped at step {step}/{total} after {took}."]
  final = results.get("final")
  if final:
    top1 = "  ".join(f"{h} {v:.2f}%" for h, v in heads(final, "eval/top1/"))
    lines.append(f"Test top-1 at step {final.get('step', step)}: {top1}")
    if "best_backbone_top1" in results:
      lines.append(f"Best backbone top-1: {results['best_backbone_top1']:.2f}% at step "
                   f"{results['best_step']}")
  else:
    lines.append("No evaluation yet.")
  lines += [f"Results:      {_join(workdir, 'results.json')}",
            f"Checkpoints:  {_join(workdir, 'checkpoints')}",
            f"TensorBoard:  tensorboard --logdir {workdir}"]
  return lines


def one_line_summary(results: Mapping[str, Any]) -> str:
  """`finished 4/4 steps in 12s: top-1 backbone 5.00% (branch1 7.50%, ...)` for a list of runs."""
  step, total = results.get("step"), results.get("num_steps", results.get("step"))
  state = "preempted" if results.get("preempted") else (
      "finished" if results.get("finished") else "stopped")
  text = f"{state} at step {step}/{total} in {format_duration(results.get('wall_time_s'))}"
  final = results.get("final")
  if final:
    (head, value), *others = heads(final, "eval/top1/")
    text += f": top-1 {head} {value:.2f}%"
    if others:
      text += " (" + ", ".join(f"{h} {v:.2f}%" for h, v in others) + ")"
  return text
