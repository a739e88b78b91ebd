"""The terminal a command-line run writes to: the libraries' start-up notices and routine INFO
lines kept off it, the short log format, and plain lines printed after the log.

Only the command-line entry points (mixskd_jax.main, experiments.run, the transfer command)
call these; importing this module changes nothing. `mixskd_jax.run.progress` re-exports them.
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import sys
import tempfile
import time
from typing import Iterable

from absl import logging

# TensorFlow's C++ notices at import, dropped by quiet_tensorflow_startup.
_TF_STARTUP_NOISE = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog() is called",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)


def quiet_tensorflow_startup() -> None:
  """Sets TF_CPP_MIN_LOG_LEVEL=2 (if unset) and imports TensorFlow with its start-up notices
  dropped. TensorFlow >= 2.17 prints its oneDNN notice from C++ before its logging reads that
  variable, so the import runs with file descriptor 2 captured; every other line it printed is
  written back. Call before anything imports TensorFlow (clu and tfds do)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "tensorflow" in sys.modules:
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError, AttributeError):  # no usable fd 2: import it plainly
    importlib.import_module("tensorflow")
    return
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      importlib.import_module("tensorflow")
    finally:
      try:
        sys.stderr.flush()
      finally:
        os.dup2(saved, 2)
        os.close(saved)
      capture.seek(0)
      text = capture.read().decode(errors="replace")
      kept = [line for line in text.splitlines()
              if line.strip() and not any(n in line for n in _TF_STARTUP_NOISE)]
      if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()


# INFO (and below) lines of the libraries that say nothing a user acts on.
_QUIET_INFO = (
    # (path fragment of the logging module, message fragment or None for all)
    ("/orbax/", None),  # every checkpoint's internals
    ("/jax/_src/xla_bridge", "Unable to initialize backend"),  # e.g. no libtpu on a CPU host
    ("/tensorflow_datasets/", "differ on disk and in the code"),
    ("/tensorflow_datasets/", "Load dataset info from"),
    ("/tensorflow_datasets/", "Reusing dataset"),
    ("/tensorflow_datasets/", "Creating a tf.data.Dataset reading"),
    ("/tensorflow_datasets/", "Constructing tf.data.Dataset"),
)
# Warnings that are expected steps, not problems: a tfds folder that is about to be prepared.
_QUIET_WARNING = (
    ("/tensorflow_datasets/", "has no dataset_info.json"),
)


class QuietLibraries:
  """A logging filter dropping the routine INFO lines of Orbax, JAX's backend probing and tfds
  (and tfds's warning about a folder it is about to prepare). Our own lines, and every other
  WARNING or ERROR, pass."""

  def filter(self, record) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if record.levelno <= std_logging.INFO:
      rules = _QUIET_INFO
    elif record.levelno == std_logging.WARNING:
      rules = _QUIET_WARNING
    else:
      return True
    for fragment, message in rules:
      if fragment in path and (message is None or message in record.getMessage()):
        return False
    return True


class ConsoleFormatter(std_logging.Formatter):
  """`HH:MM:SS message` for INFO; `HH:MM:SS WARNING [module:line] message` above it."""

  def format(self, record) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    if record.levelno >= std_logging.WARNING:
      return f"{stamp} {record.levelname} [{record.module}:{record.lineno}] {text}"
    return f"{stamp} {text}"


def configure_console() -> None:
  """INFO verbosity, the short console format and the library filters on absl's handler (the
  one `app.run` installs). Idempotent."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
  handler.setFormatter(ConsoleFormatter())


def print_lines(lines: Iterable[str]) -> None:
  """Lines to stdout, flushed (after whatever the log wrote to stderr)."""
  sys.stderr.flush()
  print("\n".join(lines), flush=True)
