"""The command's Ctrl-C: `install_exit_on_interrupt` makes SIGINT end the process at once with
one line and status 130 (why at once, and how the training loop makes the first Ctrl-C a
SIGTERM: `preemption.py`), and the exit statuses a run ends with. Imports no JAX, so the command
installs it before anything heavy loads."""

from __future__ import annotations

import os
import signal
import sys
import threading

# EX_TEMPFAIL (sysexits.h): "temporary failure, retry". A run stopped by SIGTERM after saving
# its checkpoint exits with this status, so a supervisor that restarts on a non-zero status
# restarts it, and the same command resumes it.
PREEMPTED_EXIT_CODE = 75
# 128 + SIGINT, the shell's status for a command ended by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130

# Where `_exit_now` writes: a duplicate of file descriptor 2 taken at install time, so the line
# is seen even while fd 2 is captured (progress.quiet_tensorflow_startup captures it around
# the TensorFlow import).
_stderr_fd = None


def _write_stderr(text: str, fd: int | None = None) -> None:
  """Writes straight to the file descriptor: no Python buffer, which a signal handler could
  find in the middle of a write of the interrupted code (RuntimeError: reentrant call)."""
  try:
    os.write(2 if fd is None else fd, text.encode(errors="replace"))
  except OSError:
    pass


def _exit_now(signum, frame) -> None:
  """The command's SIGINT handler: one line, then the process ends at once, skipping Python's
  exit (see the module docstring: it crashes under a running compile)."""
  del signum, frame
  for stream in (sys.stdout, sys.stderr):  # what was printed before, not what is half written
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except  (reentrant, closed or redirected streams)
      pass
  _write_stderr(f"Interrupted (Ctrl-C): exiting now with status {INTERRUPTED_EXIT_CODE}; the "
                "same command resumes the run from its latest checkpoint.\n", _stderr_fd)
  os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access


def install_exit_on_interrupt() -> bool:
  """For commands, not libraries: from now on Ctrl-C (SIGINT) ends the process at once with
  `INTERRUPTED_EXIT_CODE` and one line on stderr, whatever it is doing (importing, loading data,
  compiling); inside the training loop `Preemption` turns the first Ctrl-C into a SIGTERM and
  leaves the second to this handler. Does nothing, and returns False, outside the main thread or
  when SIGINT is ignored (`nohup`, `cmd &` in a script)."""
  global _stderr_fd  # pylint: disable=global-statement
  if threading.current_thread() is not threading.main_thread():
    return False
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    return False
  if _stderr_fd is None:
    try:
      _stderr_fd = os.dup(2)  # not inherited by child processes (os.dup's default)
    except OSError:
      _stderr_fd = None
  signal.signal(signal.SIGINT, _exit_now)
  return True


def saved_stderr() -> int | None:
  """The duplicate of stderr's file descriptor taken by `install_exit_on_interrupt`, or None:
  where a signal handler's line goes, so it is seen while fd 2 is captured."""
  return _stderr_fd
