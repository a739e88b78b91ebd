"""A TPU slice described on any host, for compiling a step ahead of time: its devices, as many
processes as it has hosts, and each chip's HBM.

libtpu (the `tpu` extra) describes a named topology without owning it:
`jax.experimental.topologies.get_topology_desc` gives compile-only devices that build a `Mesh`,
and `jit(...).lower(...).compile()` on that mesh runs the TPU compiler. Nothing is allocated.

Topology names are libtpu's, `GENERATION:SHAPE`: `v5e:2x2`, `v5e:16x16` (256 chips on 64
hosts), `v4:2x2x4`, `v5p:4x4x4`, `v6e:8x8`, `v2:4x4`, `v3:4x4`. Shapes count chips (v2 and v3
chips hold two TensorCores, each its own JAX device). v4 and v5p chips are described in
megacore mode, one JAX device per chip, as JAX runs them on a Cloud TPU VM.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from jax.sharding import Mesh

from mixskd_jax import backends
from mixskd_jax.train.sharding import DATA_AXIS

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation.

  Attributes:
    name: as in topology names ("v5e").
    hbm_gib_per_device: HBM of one JAX device (a chip; a TensorCore on v2 and v3), datasheet.
    dims: the topology shape's rank (2: AxB; 3: AxBxC).
    megacore: one device per chip (the two TensorCores act as one).
  """
  name: str
  hbm_gib_per_device: float
  dims: int
  megacore: bool = False


GENERATIONS = {g.name: g for g in (
    Generation("v2", 8, 2), Generation("v3", 16, 2), Generation("v4", 32, 3, megacore=True),
    Generation("v5e", 16, 2), Generation("v5p", 95, 3, megacore=True), Generation("v6e", 32, 2),
)}
ACCEPTED = ("GENERATION:SHAPE with GENERATION one of " + ", ".join(GENERATIONS) +
            " and SHAPE AxB (v2, v3, v5e, v6e) or AxBxC (v4, v5p) chips, "
            "e.g. v5e:2x2, v5e:16x16, v4:2x2x4, v5p:4x4x8, v6e:8x8")
_NAME = re.compile(r"^(?P<gen>v\d+[a-z]?):(?P<shape>\d+(?:x\d+)*)$")


class TopologyError(ValueError):
  """A topology that cannot be described: the command prints it in one line, exit 2."""


class LibtpuMissingError(RuntimeError):
  """libtpu is not installed: the command prints the install line, exit 2."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """A described slice: `mesh` over all its devices along the data axis."""
  topology: str
  generation: Generation
  mesh: Mesh
  device_kind: str
  num_processes: int
  num_slices: int

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def hbm_bytes_per_device(self) -> int:
    return int(self.generation.hbm_gib_per_device * GIB)


def parse(topology: str) -> tuple[Generation, tuple[int, ...]]:
  """(generation, chip shape) of a topology name; TopologyError naming the accepted forms."""
  match = _NAME.match(topology.strip())
  if not match:
    raise TopologyError(f"--topology={topology!r} is not a TPU topology; use {ACCEPTED}.")
  generation = GENERATIONS.get(match.group("gen"))
  if generation is None:
    raise TopologyError(f"--topology={topology!r}: unknown generation "
                        f"{match.group('gen')!r}; use {ACCEPTED}.")
  shape = tuple(int(d) for d in match.group("shape").split("x"))
  if len(shape) != generation.dims or min(shape) < 1:
    raise TopologyError(f"--topology={topology!r}: a {generation.name} shape has "
                        f"{generation.dims} positive dimensions; use {ACCEPTED}.")
  return generation, shape


def describe(topology: str, *, num_slices: int = 1) -> TpuSlice:
  """The slice `topology` names (`num_slices` of them joined over the data-center network),
  described by libtpu on this host.

  Raises:
    TopologyError: a name libtpu or this module does not accept.
    LibtpuMissingError: libtpu is not installed.
  """
  generation, _ = parse(topology)
  if num_slices < 1:
    raise TopologyError(f"--num_slices={num_slices} must be >= 1.")
  if not backends.libtpu_installed():
    raise LibtpuMissingError(
        "compiling for a TPU slice needs libtpu, which is not installed: "
        "pip install -e \".[tpu]\" (or pip install -r requirements-tpu.txt).")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  options = {"chip_config_name": "megacore"} if generation.megacore else {}
  if num_slices > 1:
    options["num_slices"] = num_slices
  backends.share_libtpu()
  try:
    with backends.libtpu_quiet():
      devices = topologies.get_topology_desc(topology_name=topology.strip(), platform="tpu",
                                             **options).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu's INVALID_ARGUMENT)
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise TopologyError(f"--topology={topology!r} was refused by libtpu ({reason}); use "
                        f"{ACCEPTED}.") from e
  return TpuSlice(topology=topology.strip(), generation=generation,
                  mesh=Mesh(np.asarray(devices), (DATA_AXIS,)),
                  device_kind=devices[0].device_kind,
                  num_processes=len({d.process_index for d in devices}),
                  num_slices=num_slices)
