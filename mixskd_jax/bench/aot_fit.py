"""The largest per-chip batch whose train step fits a TPU chip, found by compiling it.

Each candidate batch is compiled for the slice by the TPU compiler (`aot.compile_train`): it
fits when the compile succeeds with a peak no larger than the HBM the compiler may use, and
not when the compiler answers RESOURCE_EXHAUSTED. Memory grows about linearly with the batch
until the compiler starts rematerializing to stay inside the chip; `next_candidate` follows
the line while the measurements agree with it and doubles or bisects where they do not; the
search ends when the largest batch known to fit and the smallest known not to are one
granularity apart. On two otherwise idle CPU cores the ImageNet ResNet-50 MixSKD step
compiled in 3 to 7 minutes at a batch that fits (longest near the limit, where the compiler
rematerializes to fit it) and was refused in under a minute at one that does not; a fit took
8 to 12 compiles. With a `CompileLog` every compile's outcome is appended to a file as it
finishes, and a fit started again with the same file takes them from there instead of
compiling again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import ml_collections

from mixskd_jax.bench import aot
from mixskd_jax.bench.tpu_slice import TpuSlice
from mixskd_jax.method.methods import method_name
from mixskd_jax.train import layout

# Where the compiler rematerializes near the limit the search needs up to 12 (v4, float32).
MAX_COMPILES = 16


def with_per_device_batch(config: ml_collections.ConfigDict, per_device: int, *,
                          dtype: str | None = None, remat: bool | None = None
                          ) -> ml_collections.ConfigDict:
  """`config` with `per_device` clean images per device (the global batch then follows the
  devices, `batch_size = -1`), and `model.dtype`, `model.remat_branches` if given."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.batch_size = -1
  c.per_device_batch_size = per_device
  if dtype is not None:
    c.model.dtype = dtype
  if remat is not None:
    c.model.remat_branches = remat
  return c


def _round_down(value: float, granularity: int) -> int:
  return int(value // granularity) * granularity


def _on_line(p1: tuple[float, float], p2: tuple[float, float], x: float) -> float:
  """y at `x` on the line through the (x, y) points p1 and p2."""
  (x1, y1), (x2, y2) = p1, p2
  return y1 + (x - x1) * (y2 - y1) / (x2 - x1)


def _batch_at(p1: tuple[int, int], p2: tuple[int, int], usable: float) -> float:
  """The batch where the line through the (batch, bytes) points p1 and p2 reaches `usable`."""
  return _on_line(p1[::-1], p2[::-1], usable)


def _linear_guess(measured: dict[int, tuple[bool, int | None]], lo: int, hi: int | None,
                  usable: int) -> float | None:
  """Where memory reaches `usable` on the line through two measured batches, or None where
  the measurements do not support one (then the caller doubles or bisects).

  Until a batch fails: the line through the two largest fits (from a single fit,
  proportionally: memory's fixed part makes that err low); -inf where the largest fit's peak
  is no higher than the one before (memory stopped growing with the batch: the TPU compiler
  rematerializes near the limit). Once bracketed: the line across the bracket (the largest
  fit's peak, the smallest failure's need), trusted only where it also passes within 5% of the
  HBM of the next fit below the bracket."""
  size = lambda b: measured[b][1] if b in measured else None
  fits_below = [(b, m) for b, (fits, m) in sorted(measured.items()) if fits and m and b < lo]
  if hi is None:
    if not size(lo):
      return None
    if not fits_below:
      return lo * usable / size(lo)
    if size(lo) <= fits_below[-1][1]:
      return float("-inf")
    return _batch_at(fits_below[-1], (lo, size(lo)), usable)
  if not size(hi):
    return None
  if not lo or not size(lo):
    return hi * usable / size(hi)
  across = ((lo, size(lo)), (hi, size(hi)))
  if fits_below:
    b, m = fits_below[-1]
    if abs(_on_line(*across, b) - m) > 0.05 * usable:
      return None
  return _batch_at(*across, usable)


def next_candidate(measured: dict[int, tuple[bool, int | None]], usable: int,
                   granularity: int) -> int | None:
  """The next per-device batch to compile, or None when the search is over.

  Until a batch fails, the next is where the line through the two largest fits meets the
  usable HBM, at most 8x the largest fit; where the measurements do not support a line, the
  batch doubles. Overshooting is cheap: a batch that does not fit compiles in a fraction of
  the time of one that does. Once bracketed, the line across the bracket picks the next batch
  where it agrees with the measurements, and bisection where it does not or where the search
  crept one granule from the same side twice.

  Args:
    measured: {batch: (fits, bytes)}: the peak where it fits, the compiler's need where not
      (None if it did not say).
    usable: the HBM bytes the compiler may use.
    granularity: batches are multiples of it.
  """
  fitting = [b for b, (fits, _) in measured.items() if fits]
  failing = [b for b, (fits, _) in measured.items() if not fits]
  lo = max(fitting, default=0)
  hi = min(failing, default=None)
  if hi is not None and (hi - lo <= granularity or hi <= granularity):
    return None  # the boundary is found, or not even the smallest batch fits
  guess = _linear_guess(measured, lo, hi, usable)
  if hi is None:
    candidate = 2 * lo if guess is None or guess < lo else min(guess, 8 * lo)
    return max(_round_down(candidate, granularity), lo + granularity)
  crept = (lo - granularity) in fitting or (hi + granularity) in failing
  candidate = (lo + hi) / 2 if guess is None or crept else guess
  return min(max(_round_down(candidate, granularity), lo + granularity), hi - granularity)


def largest_fitting(compile_at: Callable[[int], tuple[bool, int | None]], start: int,
                    usable: int, granularity: int, max_compiles: int = MAX_COMPILES
                    ) -> tuple[int | None, dict[int, tuple[bool, int | None]]]:
  """(the largest multiple of `granularity` whose step fits, or None; every measurement),
  calling `compile_at(batch) -> (fits, bytes)` from `start` on."""
  measured: dict[int, tuple[bool, int | None]] = {}
  candidate = max(_round_down(start, granularity), granularity)
  while candidate is not None and len(measured) < max_compiles:
    measured[candidate] = compile_at(candidate)
    candidate = next_candidate(measured, usable, granularity)
  fitting = [b for b, (fits, _) in measured.items() if fits]
  return max(fitting, default=None), measured


class CompileLog:
  """Every train-step compile of a fit, one JSON line each, keyed by what decides its outcome:
  the whole resolved config, the slice, the usable HBM and the JAX and libtpu releases. A line
  whose key matches is a compile that need not run again."""

  def __init__(self, path: str):
    self.path = path
    self._entries: dict[str, dict] = {}
    if os.path.exists(path):
      with open(path) as f:
        for number, line in enumerate(f, 1):
          line = line.strip()
          if not line:
            continue
          try:
            entry = json.loads(line)
            self._entries[entry["key"]] = entry["report"]
          except (ValueError, KeyError, TypeError):
            # A line cut short by a kill: that compile runs again.
            print(f"  {path}:{number}: not a complete entry, ignored", flush=True)

  @staticmethod
  def key(config: ml_collections.ConfigDict, tpu: TpuSlice, usable: int) -> str:
    import jax  # pylint: disable=import-outside-toplevel
    what = {"config": config.to_json(sort_keys=True), "topology": tpu.topology,
            "devices": tpu.num_devices, "processes": tpu.num_processes, "usable": usable,
            "jax": jax.__version__, "libtpu": _libtpu_version()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

  def get(self, key: str) -> dict | None:
    return self._entries.get(key)

  def add(self, key: str, report: dict) -> None:
    self._entries[key] = report
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps({"key": key, "report": report}) + "\n")


def _libtpu_version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "unknown"


def _compile_at(config: ml_collections.ConfigDict, tpu: TpuSlice, usable: int,
                reports: dict[int, dict], progress: Callable[[str], None],
                log: CompileLog | None = None) -> Callable[[int], tuple[bool, int | None]]:
  def compile_at(per_device: int) -> tuple[bool, int | None]:
    candidate = with_per_device_batch(config, per_device)
    key = CompileLog.key(candidate, tpu, usable) if log is not None else None
    report = log.get(key) if log is not None else None
    logged = report is not None
    if report is None:
      report, _ = aot.compile_train(candidate, tpu, usable)
      if log is not None:
        log.add(key, report)
    reports[per_device] = report
    fits = report["fits"]
    size = report.get("peak_bytes") if fits else (report.get("out_of_memory") or {}).get(
        "needed_bytes")
    # Each compile takes minutes: say what it found as it goes.
    progress(f"  {config.model.dtype}, remat_branches={bool(config.model.remat_branches)}: "
             f"{per_device} per chip {'fits' if fits else 'does not fit'}"
             f"{'' if size is None else f' ({size / 2 ** 30:.2f} GiB)'}, "
             f"{'from the compile log' if logged else 'compiled in'} "
             f"{report['lower_s'] + report['compile_s']:.0f} s")
    return fits, size
  return compile_at


def fit_row(config: ml_collections.ConfigDict, tpu: TpuSlice, usable: int, *, dtype: str,
            remat: bool, granularity: int,
            progress: Callable[[str], None] = lambda line: None,
            log: CompileLog | None = None) -> dict[str, Any]:
  """The largest per-chip batch for one (dtype, remat), with the global batch and learning
  rate a run at it trains with; `progress` is told of each compile."""
  base = with_per_device_batch(config, 1, dtype=dtype, remat=remat)
  start = layout.resolve(config, tpu.num_devices, log_costs=False).per_device_batch_size
  reports: dict[int, dict] = {}
  t0 = time.perf_counter()
  largest, measured = largest_fitting(
      _compile_at(base, tpu, usable, reports, progress, log), start, usable, granularity)
  row = {"dtype": dtype, "remat_branches": remat, "largest_per_device_batch": largest,
         # False where the search stopped at MAX_COMPILES: `largest` fits, a larger one may too.
         "boundary_found": next_candidate(measured, usable, granularity) is None,
         "compiles": len(measured), "seconds": time.perf_counter() - t0,
         # What the compiles cost, those taken from a compile log included.
         "compile_seconds": sum(r["lower_s"] + r["compile_s"] for r in reports.values()),
         "measured": {str(b): {"fits": f, "bytes": m} for b, (f, m) in sorted(measured.items())}}
  if largest is not None:
    resolved = layout.resolve(with_per_device_batch(base, largest), tpu.num_devices,
                              log_costs=False)
    # The train step's whole report at that batch: its memory, FLOPs and collectives.
    row.update(peak_bytes=reports[largest].get("peak_bytes"), train_step=reports[largest],
               global_batch_size=resolved.batch_size,
               learning_rate=resolved.optimizer.learning_rate)
  return row


def fit_report(config: ml_collections.ConfigDict, tpu: TpuSlice, *, granularity: int = 8,
               dtypes=("float32", "bfloat16"), remats=(False, True),
               progress: Callable[[str], None] = lambda line: None,
               log_path: str | None = None) -> dict[str, Any]:
  """`fit_row` for every dtype and remat setting, with the slice's description; with
  `log_path`, compiles are logged there and a logged one is not compiled again."""
  log = CompileLog(log_path) if log_path else None
  usable = aot.usable_hbm_bytes(tpu)
  return {"topology": tpu.topology, "device_kind": tpu.device_kind, "devices": tpu.num_devices,
          "processes": tpu.num_processes,
          "model": config.model.name, "method": method_name(config),
          "hbm_usable_bytes": usable, "granularity": granularity,
          "rows": [fit_row(config, tpu, usable, dtype=d, remat=r, granularity=granularity,
                           progress=progress, log=log) for d in dtypes for r in remats]}
