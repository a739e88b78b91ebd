"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment asks."""

from __future__ import annotations

import os

import jax
import ml_collections

# Environment variables that mean "this process is one of several".
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_in_environment() -> bool:
  if any(os.environ.get(v) for v in _CLUSTER_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize(dist: ml_collections.ConfigDict) -> bool:
  """Calls `jax.distributed.initialize` once, before any device is used.

  `config.distributed.initialize`: "always", "never", or "auto" when a coordinator
  address is configured or the environment describes a cluster (SLURM with several tasks,
  a multi-host Cloud TPU, JAX_COORDINATOR_ADDRESS). Unset address / process fields are
  auto-detected by JAX. `cpu_collectives` (e.g. "gloo") enables cross-process collectives
  for CPU devices.

  `jax.distributed.initialize` also starts JAX's preemption sync manager, whose C++ handler
  owns SIGTERM from then on: `run/preemption.py` relies on it and installs no Python one.

  Returns:
    Whether this call initialized the distributed runtime.
  """
  mode = dist.initialize
  if mode not in ("always", "never", "auto"):
    raise ValueError(f"config.distributed.initialize={mode!r} must be 'always', 'never' or "
                     "'auto'.")
  wanted = mode == "always" or (mode == "auto" and (dist.coordinator_address is not None
                                                     or _cluster_in_environment()))
  if not wanted or jax.distributed.is_initialized():
    return False
  if dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                             num_processes=dist.num_processes, process_id=dist.process_id,
                             local_device_ids=dist.get("local_device_ids"))
  return True
