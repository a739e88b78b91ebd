"""`tests/train_runner.py`, killed with SIGKILL at a chosen point of the run: the harness of
tests/test_reliability.py. Usage: python tests/kill_runner.py SITE:K:DELAY <train_runner args>.

SITE is where the kill lands, on the K-th time (1-based) the run gets there:
  step     when the training loop asks for its K-th batch (between steps)
  save     DELAY seconds into the K-th checkpoint save (inside Orbax's writes, or just after)
  digest   after Orbax committed the K-th checkpoint, before its digest is written
  eval     DELAY seconds into the K-th evaluation
  history  before the K-th history record is appended
  restore  DELAY seconds into the restore of a resumed run (K is ignored)
The kill comes from the process itself (a thread for the delayed sites), so where it lands
does not depend on how fast a test polls. The run never prints RESULTS; the exit status is
-SIGKILL. When the point is never reached (the run was shorter), the run ends normally.
"""

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

SITES = ("step", "save", "digest", "eval", "history", "restore")


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_in(delay: float) -> None:
  timer = threading.Timer(delay, _kill)
  timer.daemon = True
  timer.start()


def _on_kth_call(owner, name: str, k: int, action) -> None:
  """Wraps `owner.name` so that `action()` runs at its k-th call, before the call."""
  original = getattr(owner, name)
  calls = [0]

  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == k:
      action()
    return original(*args, **kwargs)

  setattr(owner, name, wrapped)


def install(site: str, k: int, delay: float) -> None:
  # pylint: disable=import-outside-toplevel
  from mixskd_jax.store import checkpoint, checkpoint_digest, workdir
  from mixskd_jax.run import loop
  if site == "step":
    prefetch = loop.prefetch_to_device

    def counted(*args, **kwargs):
      for n, batch in enumerate(prefetch(*args, **kwargs), start=1):
        if n == k:
          _kill()
        yield batch

    loop.prefetch_to_device = counted
  elif site == "save":
    _on_kth_call(checkpoint.Checkpoints, "save", k, lambda: _kill_in(delay))
  elif site == "digest":
    _on_kth_call(checkpoint_digest, "write", k, _kill)
  elif site == "eval":
    _on_kth_call(loop.Trainer, "evaluate", k, lambda: _kill_in(delay))
  elif site == "history":
    _on_kth_call(workdir.JsonlHistory, "append", k, _kill)
  elif site == "restore":
    _on_kth_call(checkpoint.Checkpoints, "restore_or_keep", 1, lambda: _kill_in(delay))
  else:
    raise ValueError(f"unknown kill site {site!r}; one of {SITES}")


def main():
  site, k, delay = sys.argv.pop(1).split(":")
  # train_runner sets the fake device count before it imports JAX; install() imports JAX first.
  devices = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "1"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  import train_runner  # pylint: disable=import-outside-toplevel  (tests/ is sys.path[0])
  install(site, int(k), float(delay))
  train_runner.main()


if __name__ == "__main__":
  main()
