"""One device mesh with a 'data' axis: batches split along it, the train state replicated.

Works the same on one CPU, one GPU, and many hosts: under `jax.distributed` the mesh spans
every process's devices and each process contributes its local slice of the global batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixskd_jax import backends

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """All devices of all processes along one 'data' axis (starting JAX's backends quietly:
  `backends.start`)."""
  return Mesh(np.asarray(backends.start()), (DATA_AXIS,))


def platform(mesh: Mesh) -> str:
  """The platform the mesh's devices belong to ("cpu", "gpu", "tpu"), which names the compiler
  a step on it is built for (a TPU slice described on a CPU host: "tpu")."""
  return mesh.devices.flat[0].platform


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """This process's slice of a batch -> global arrays sharded along 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
