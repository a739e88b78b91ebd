"""What a compiled, sharded program sends between devices, read from its HLO text.

`communication(compiled)` lists every collective of `jax.jit(...).lower(...).compile()`'s
per-device program by kind, with its count and bytes, so that tests can assert that a train
step moves no activations and the benchmark can print "communication per step per device".

Bytes of one collective are the bytes of its result buffers on one device: the reduced
buffer of an all-reduce, the gathered buffer of an all-gather, the scattered piece of a
reduce-scatter, the received buffers of an all-to-all or a collective-permute. Asynchronous
pairs (`*-start` / `*-done`, as GPU compilers emit them) are counted once, at the `-done`,
whose result is the output buffer. Collectives inside loops are counted once per appearance
in the text (the train steps here have no loops around collectives).
"""

from __future__ import annotations

import re
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")
# Kinds that only ever appear when data (not a reduction of it) crosses devices.
DATA_MOVING_KINDS = tuple(k for k in KINDS if k not in ("all-reduce", "reduce-scatter"))

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# `%name = <result shape> <opcode>(operands...)`; tuple shapes may carry /*index=N*/ comments.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
                          r"(?P<opcode>[a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[(?P<dims>[\d,]*)\]")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string: 'f32[4,16]{1,0}' or a tuple '(f32[], bf16[8])'."""
  shape = re.sub(r"/\*.*?\*/", "", shape)
  total = 0
  for match in _ARRAY.finditer(shape):
    dtype = match.group("dtype")
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"Unknown HLO element type {dtype!r} in shape {shape!r}.")
    count = 1
    for d in filter(None, match.group("dims").split(",")):
      count *= int(d)
    total += count * _DTYPE_BYTES[dtype]
  return total


def _kind(opcode: str) -> str | None:
  """The collective kind of an opcode, or None (also for `*-start`, counted at `*-done`)."""
  if opcode.endswith("-start"):
    return None
  base = opcode[:-len("-done")] if opcode.endswith("-done") else opcode
  return base if base in KINDS else None


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective kind present in `hlo_text`: count, total bytes and largest single op.

  Returns:
    {kind: {"count": n, "bytes": total result bytes, "max_bytes": largest op's bytes}},
    only for kinds that occur.
  """
  stats: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    kind = _kind(match.group("opcode"))
    if kind is None:
      continue
    size = shape_bytes(match.group("shape"))
    entry = stats.setdefault(kind, {"count": 0, "bytes": 0, "max_bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
    entry["max_bytes"] = max(entry["max_bytes"], size)
  return stats


def communication(compiled: Any) -> dict[str, Any]:
  """Collectives of a compiled jitted function's per-device program.

  Returns:
    {"by_kind": collective_stats(...), "total_bytes": sum over kinds,
     "data_moving_bytes": bytes of all-gather / all-to-all / collective-permute / broadcast}.
  """
  by_kind = collective_stats(compiled.as_text())
  return {"by_kind": by_kind,
          "total_bytes": sum(v["bytes"] for v in by_kind.values()),
          "data_moving_bytes": sum(v["bytes"] for k, v in by_kind.items()
                                   if k in DATA_MOVING_KINDS)}


# Far below any activation of the configs' steps (one CIFAR image's 32x32x64 stem map is
# 256 kB in float32), above the handful of scalars and per-group index vectors a step may
# exchange.
SMALL_BYTES = 16 * 1024


def activation_check(communication: dict[str, Any], parameter_bytes: int,
                     small_bytes: int = SMALL_BYTES) -> dict[str, Any]:
  """Whether a step's collectives (`communication(...)`) move activations between devices.

  Returns:
    {"largest_data_moving_bytes": the largest all-gather / all-to-all / permute / broadcast,
     "all_reduce_bytes", "parameter_bytes",
     "moves_activations": a data-moving collective over `small_bytes`, or more bytes in all
     than the parameters' (the gradient all-reduce) plus 64 small ones}.
  """
  moving = [v["max_bytes"] for k, v in communication["by_kind"].items()
            if k in DATA_MOVING_KINDS]
  largest = max(moving, default=0)
  return {"largest_data_moving_bytes": largest,
          "all_reduce_bytes": communication["by_kind"].get("all-reduce", {}).get("bytes", 0),
          "parameter_bytes": parameter_bytes,
          "moves_activations": bool(largest > small_bytes or communication["total_bytes"]
                                    > parameter_bytes + 64 * small_bytes)}
