"""One run's lifecycle: `train_and_evaluate(config, workdir)` and what keeps a run alive
(preflight, workdir lock, preemption, divergence guard, progress lines, multi-host start-up).

    from mixskd_jax.run import train_and_evaluate

Importing this package loads nothing else; `train_and_evaluate` loads the trainer (JAX,
TensorFlow) on first use, so the command line's checks import `run.preflight` without them.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name == "train_and_evaluate":
    from mixskd_jax.run.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
    return train_and_evaluate
  raise AttributeError(f"module 'mixskd_jax.run' has no attribute {name!r}")
