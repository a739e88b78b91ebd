"""What the benchmark measures besides the step: the machine (device kind, load), its peak
(a float32 matmul probe, or a datasheet for known accelerators) and the host input pipeline.
`mixskd_jax.benchmark` re-exports these."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mixskd_jax.data import datasets

# Dense bfloat16 peak per chip in TFLOP/s, from the vendors' datasheets (no sparsity), matched
# against `device.device_kind` in this order (the first substring found wins).
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0),
)

def usable_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one): the threads
  XLA:CPU and PyTorch each get."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return {"platform": device.platform, "device_kind": device.device_kind,
          "devices": jax.device_count(), "processes": jax.process_count(),
          "host_cpu": cpu, "host_cores": os.cpu_count(), "jax": jax.__version__,
          "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def datasheet_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 datasheet peak of one chip, TFLOP/s; None for CPUs and unknown chips."""
  for name, tflops in DATASHEET_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def matmul_probe(size: int, *, iterations: int = 1, repeats: int = 5,
                 dtype: Any = jnp.float32) -> dict[str, Any]:
  """Best FLOP/s of `iterations` chained (size, size) @ (size, size) matmuls on device 0.

  The right factor is scaled by 1/sqrt(size) so the chain neither overflows nor vanishes.
  The best of `repeats` timed calls (after one compiling call) is the machine's peak: slower
  calls are interference, which a peak should not count.
  """
  if size < 1 or iterations < 1 or repeats < 1:
    raise ValueError(f"matmul_probe needs size, iterations, repeats >= 1; got {size}, "
                     f"{iterations}, {repeats}.")
  ka, kb = jax.random.split(jax.random.key(0))
  device = jax.devices()[0]
  a = jax.device_put(jax.random.normal(ka, (size, size), dtype), device)
  b = jax.device_put(jax.random.normal(kb, (size, size), dtype) / math.sqrt(size), device)
  chain = jax.jit(lambda a, b: jax.lax.fori_loop(0, iterations, lambda _, x: x @ b, a))
  chain(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    chain(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  flops = 2.0 * size ** 3 * iterations
  return {"size": size, "iterations": iterations, "dtype": jnp.dtype(dtype).name,
          "flops": flops, "best_s": min(times), "median_s": statistics.median(times),
          "gflops": flops / min(times) / 1e9}


def _dataset_unavailable(config: ml_collections.ConfigDict) -> str | None:
  """Why the input pipeline cannot run here without a download or a build, or None."""
  from mixskd_jax.data import fashion_mnist_local  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy)
  spec = datasets.get_spec(config.data.name)
  if tfds.builder(spec.tfds_name, data_dir=config.data.data_dir).is_prepared():
    return None
  if spec.name == "fashion_mnist" and fashion_mnist_local.has_idx_files(
      config.data.idx_dir or fashion_mnist_local.DEFAULT_IDX_DIR):
    return None  # prepared from the local IDX files in a few seconds
  return (f"{spec.tfds_name} is not prepared in tfds data_dir "
          f"{config.data.data_dir or '(default)'}; the benchmark does not download or build "
          "datasets (train once, or set config.data.data_dir)")


def measure_pipeline(config: ml_collections.ConfigDict, *, batches: int = 20,
                     mock_examples: int = 0) -> dict[str, Any]:
  """Images/s the host input pipeline (`data.train_iterator`, this process) delivers alone,
  timed over `batches` batches after the first (which loads the dataset). The prefetch queue
  (`config.data.prefetch` batches) may be full when timing starts, which flatters the figure
  by at most prefetch / batches.

  mock_examples > 0: the dataset is replaced by `tfds.testing.mock_data` with that many random
  images of the real shape and encoding, for machines without the data. The per-image work
  (indexing, decoding, augmentation, batching) is the real pipeline's; reading from disk is
  not measured.
  """
  if mock_examples > 0:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy)
    with tfds.testing.mock_data(num_examples=mock_examples):
      result = _time_pipeline(config, batches)
    result["mock_examples"] = mock_examples
    return result
  reason = _dataset_unavailable(config)
  if reason is not None:
    return {"unavailable": reason}
  return _time_pipeline(config, batches)


def _time_pipeline(config: ml_collections.ConfigDict, batches: int) -> dict[str, Any]:
  from mixskd_jax import data  # pylint: disable=import-outside-toplevel  (imports TF)
  try:
    iterator = data.train_iterator(config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
    first = next(iterator)
    t = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - t
  except (FileNotFoundError, ValueError) as e:  # DatasetUnavailableError, bad data fields
    return {"unavailable": f"{type(e).__name__}: {e}"}
  images = batches * len(first["image"])
  return {"batches": batches, "images_per_s": images / elapsed, "seconds": elapsed}
