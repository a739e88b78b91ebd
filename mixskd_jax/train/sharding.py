"""One device mesh with a 'data' axis: batches split along it, the train state replicated.

Works the same on one CPU, one GPU, and many hosts: under `jax.distributed` the mesh spans
every process's devices and each process contributes its local slice of the global batch.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """All devices of all processes along one 'data' axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
  """This process's slice of a batch -> global arrays sharded along 'data'."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
