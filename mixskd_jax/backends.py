"""JAX's backends started without libtpu's start-up noise on a host that has no TPU.

With libtpu installed (the `tpu` extra, which compiles steps for TPU slices on any host:
`mixskd_jax.aot`), JAX tries the TPU plugin whenever its backends start, on a CPU host too.
libtpu then writes five lines to the process's standard error from C++ ("Failed to find host
bounds ...", "WARNING: Logging before InitGoogle() ...", an `INVALID_ARGUMENT` about
`TPU_WORKER_HOSTNAMES` and a source trace) before JAX falls back to the CPU. The same lines come
when a TPU topology is described for an ahead-of-time compile.

`start()` and `libtpu_quiet()` catch file descriptor 2 while that happens and write back every
line that is not one of those. Where the TPU backend did start (a real TPU host) everything is
written back: there libtpu's words may matter. Without libtpu nothing is caught.

libtpu also lets one process at a time load it on a host (a lock file in /tmp): a second
process that describes a TPU slice fails with `ABORTED ... libtpu multi-process lockfile`, so
two test workers, or an ahead-of-time compile beside a CPU run, could not both work. On a host
without TPU chips nothing is there to guard, and `share_libtpu()` lets every process load it
(`ALLOW_MULTIPLE_LIBTPU_LOAD`); on a TPU host the lock stays. There libtpu would also write two
log files per process into /tmp/tpu_logs (that no hardware was found), for every CPU run and
test process; `share_libtpu()` turns them off (`TPU_LOG_DIR=disabled`) unless the caller chose
a log directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

import jax

# The lines libtpu writes when it starts on a host without TPU chips (libtpu 0.0.42).
LIBTPU_NOISE = re.compile(
    r"Failed to find host bounds|Logging before InitGoogle|TPU_WORKER_HOSTNAMES|"
    r"TPU_ACCELERATOR_TYPE|=== Source Location Trace|libtpu_init_utils|tfrc/runtime|"
    # JAX's own INFO line when the TPU plugin finds no chip.
    r"Unable to initialize backend 'tpu'")


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_chips_attached() -> bool:
  """Whether this host has TPU chips, by JAX's own test (PCI devices of Google's TPU IDs); True
  when it cannot tell, which keeps libtpu's defaults."""
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except  (a JAX without it: assume chips may be there)
    return True


def share_libtpu() -> None:
  """On a host without TPU chips, let every process load libtpu and keep it from writing log
  files (see the module docstring). Must run before libtpu starts in this process; values
  already set are kept."""
  if libtpu_installed() and not tpu_chips_attached():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_LOG_DIR", "disabled")


def without_noise(text: str) -> str:
  """`text` less libtpu's start-up lines."""
  return "".join(line for line in text.splitlines(keepends=True)
                 if not LIBTPU_NOISE.search(line))


@contextlib.contextmanager
def libtpu_quiet() -> Iterator[dict]:
  """Within the block, the process's standard error (fd 2, where C++ writes) goes to a
  temporary file; after it, what was written comes back less libtpu's start-up lines, or
  whole if the block sets `outcome["keep_all"] = True`. Yields that `outcome` dict."""
  outcome: dict = {}
  if not libtpu_installed():
    yield outcome
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as caught:
    os.dup2(caught.fileno(), 2)
    try:
      yield outcome
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      text = caught.read().decode(errors="replace")
      text = text if outcome.get("keep_all") else without_noise(text)
      if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def start() -> list:
  """`jax.devices()`, starting JAX's backends (once per process) without libtpu's noise where
  no TPU backend starts. Call it before anything else touches a device."""
  share_libtpu()
  with libtpu_quiet() as outcome:
    devices = jax.devices()
    outcome["keep_all"] = any(d.platform == "tpu" for d in devices)
  return devices
