"""Preemption: on SIGTERM every process stops after the same step, they save one checkpoint
together, and the run exits with `PREEMPTED_EXIT_CODE` so that its supervisor reruns it.

Two mechanisms, because a flag set in one process cannot stop the others:

- several processes (`jax.distributed` initialized): JAX's preemption sync manager. At
  `jax.distributed.initialize` it installs a C++ SIGTERM handler; a signalled process tells
  the coordination service, the service tells every process, and they agree on a step (the
  furthest any of them has reported, plus one) at which `reached_preemption_sync_point`
  returns True in all of them. It is asked after every step with the global step (as Orbax's
  `CheckpointManager.save` asks it, with the step it saves); until a notice comes that costs
  a mutex and an integer compare, no network: 0.2 us a call measured on CPU, Python included.
  A Python `signal.signal(SIGTERM, ...)` would replace the C++ handler (a signal has one
  handler): the signalled process alone would stop, and the others would wait for it in the
  next step's collectives forever (seen in a 2-process gloo run). So none is installed then.
  The C++ listener polls every second: the processes stop a second or so after the signal.
  A gap: a notice before the run tells the manager its start step (`__enter__`, after the
  restore) names step 1; a resumed run never reaches it, goes on until it is killed, and
  resumes again from the checkpoint it had restored: it loses only that time.
- one process: a Python SIGTERM handler that sets a flag the loop reads.

SIGINT (Ctrl-C), one process: inside the loop the first one is a SIGTERM (one line on stderr
says so, and that a second Ctrl-C quits at once); a second one, or one before the first step of
the run is done (its compile: nothing new to save yet), does what Ctrl-C did before the loop.
In the command (`main.py`, from `install_exit_on_interrupt`), that is: one line, then the
process ends at once with `INTERRUPTED_EXIT_CODE` (130) through `os._exit`; rerunning resumes
from the latest checkpoint. At once and without Python's exit, because Ctrl-C as an exception
crashes the process: jaxlib's compile calls Python's signal check while it waits for its compile
thread, so a KeyboardInterrupt leaves that thread compiling; the interpreter's exit then tears
down the client under it (`SingleDeviceSharding::Create` calls through a null pointer:
"Fatal Python error: Segmentation fault", seen with jax 0.10.2). Committed checkpoints are
atomic, so ending mid-save loses only that save. In a notebook (Python's default SIGINT
handler), the second Ctrl-C raises KeyboardInterrupt as usual, and outside the loop nothing
changes. SIGINT left ignored (`nohup`, `cmd &` in a script) stays ignored. Measured on 2 CPU
cores: the command exits 0.05-0.35 s after a Ctrl-C in start-up, data loading or a compile
(jaxlib runs Python's handlers within ~0.1 s while it compiles or waits for results), and a
first Ctrl-C in training stops it after the step, saved, in ~0.2 s plus the exit. `main.run`
installs the handler before JAX is imported (`interrupt.py` imports none).

SIGINT, several processes, inside the loop: the first Ctrl-C to a process sends it a SIGTERM
(`os.kill`), which JAX's C++ handler takes as a preemption notice: every process stops after
the same step, saves, and exits with 75, as for SIGTERM (a terminal's Ctrl-C that reaches all of
them gives notices from each; the manager agrees on one step). A second Ctrl-C ends that
process at once (130 in the command) without a checkpoint; the others then fail at their next
collective, and the distributed service aborts them (SIGABRT) when its heartbeat times out
(about 80 s seen): the run resumes from the latest checkpoint. Outside the loop, and without
the preemption service, Ctrl-C is that immediate exit.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

from mixskd_jax.run.interrupt import (  # noqa: F401  (part of this module's API)
    INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, _write_stderr, install_exit_on_interrupt,
    saved_stderr)


def _sync_manager_running() -> bool:
  """Whether `jax.distributed.initialize` started the preemption sync manager (and so owns
  SIGTERM through its C++ handler)."""
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Preemption:
  """Within a `with` block, `should_stop(step)` says, after each training step, whether to save
  and leave: True once a SIGTERM arrived (or, in one process, a first Ctrl-C after the first
  step), at the same step in every process."""

  def __init__(self, start_step: int):
    self.start_step = start_step  # the step the run starts (or resumes) from
    self.requested = False  # the single-process flag
    self._stepped = False  # whether a step of this run is done (should_stop was called)
    self._synced = _sync_manager_running()
    self._installed, self._previous = False, None
    self._sigint_installed, self._previous_sigint = False, None
    self._sigint_forwarded = False

  def __enter__(self) -> Preemption:
    if self._synced:
      # Tell the sync manager where this run starts: a notice before the first step then
      # names the step after it, not step 1.
      multihost_utils.reached_preemption_sync_point(self.start_step)
      self._install_sigint(self._sigint_to_sync_manager)
      return self
    if jax.process_count() > 1:
      logging.warning("jax_enable_preemption_service is off: SIGTERM ends this multi-process "
                      "run without a checkpoint; it resumes from the latest periodic one.")
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread (some notebook kernels): both signals stay as is
      return self
    self._install_sigint(self._handle_sigint)
    return self

  def _install_sigint(self, handler) -> None:
    try:
      if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # nohup, `cmd &`: leave it so
        return
      self._previous_sigint = signal.signal(signal.SIGINT, handler)
      self._sigint_installed = True
    except ValueError:  # not the main thread: SIGINT stays as it is
      pass

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def _handle_sigint(self, signum, frame) -> None:
    if self.requested or not self._stepped:
      # A second Ctrl-C (or one after SIGTERM), or one before the first step is done (nothing
      # new to save, only its compile to wait for): what Ctrl-C does outside the loop.
      self._interrupt(signum, frame)
      return
    self.requested = True
    _write_stderr(f"Ctrl-C: stopping after this step to save a checkpoint (the command then "
                  f"exits with status {PREEMPTED_EXIT_CODE}: rerun it to continue). Press Ctrl-C "
                  "again to quit at once.\n", saved_stderr())

  def _sigint_to_sync_manager(self, signum, frame) -> None:
    if self._sigint_forwarded:  # the second Ctrl-C: this process alone, at once
      self._interrupt(signum, frame)
      return
    self._sigint_forwarded = True
    _write_stderr(f"Ctrl-C: every process stops after the same step and saves a checkpoint, "
                  f"then exits with status {PREEMPTED_EXIT_CODE}; rerun them all to continue. "
                  "Press Ctrl-C again to quit this process at once, without one.\n", saved_stderr())
    os.kill(os.getpid(), signal.SIGTERM)  # to JAX's C++ handler: a preemption notice

  def _interrupt(self, signum, frame) -> None:
    previous = self._previous_sigint
    if callable(previous):  # the command's _exit_now, or Python's KeyboardInterrupt
      previous(signum, frame)
    elif previous == signal.SIG_DFL:  # the kernel's default: the process ends by the signal
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGINT)
    else:  # a handler set outside Python: Python's own default
      signal.default_int_handler(signum, frame)

  def should_stop(self, step: int) -> bool:
    """Called once after every step, with the number of steps done (the global step)."""
    self._stepped = True
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc) -> None:
    if self._installed:
      # None: the previous handler was not set from Python; the default is the best guess.
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if self._previous is None else self._previous)
    if self._sigint_installed:
      signal.signal(signal.SIGINT, signal.default_int_handler
                    if self._previous_sigint is None else self._previous_sigint)
