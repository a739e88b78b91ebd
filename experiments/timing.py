"""Training cost of each method, measured on its own: the table's "cost vs CE" column.

The runs record their own step time too, but a long comparison shares its machine with
whatever else runs meanwhile; this phase times every method back to back, on the real input
pipeline, in one short window, so the ratios compare like with like.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Sequence

import jax
import numpy as np

from experiments import protocol

TIMING_FILE = "step_timing.json"


def time_method(config, *, steps: int, warmup: int) -> dict[str, float]:
  """Median/min/max wall time of `steps` train steps after `warmup` (the first compiles),
  each step waited for, on the configured pipeline and devices."""
  from mixskd_jax import data  # pylint: disable=import-outside-toplevel
  from mixskd_jax.train import sharding  # pylint: disable=import-outside-toplevel
  from mixskd_jax.run.loop import Trainer  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as workdir:
    trainer = Trainer(config, workdir)
    batches = data.train_iterator(trainer.config)  # resolved for the devices
    batch_sharding = sharding.data_sharding(trainer.mesh)
    state, times = trainer.state, []
    for i in range(warmup + steps):
      batch = sharding.to_global(next(batches), batch_sharding)
      t0 = time.perf_counter()
      state, metrics = trainer.train_step(state, batch, trainer.root_key)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
          "max_s": float(np.max(times)), "steps": steps, "batch_size": trainer.config.batch_size}


def time_methods(runs: Sequence[protocol.Run], workdir: str, *, steps: int, warmup: int,
                 retime: bool = False) -> dict[str, dict]:
  """Times one run (the first seed) of every main-table row; kept in `<workdir>/TIMING_FILE`
  and not measured again unless `retime`."""
  path = os.path.join(workdir, TIMING_FILE)
  timings = {}
  if os.path.exists(path) and not retime:
    with open(path) as f:
      timings = json.load(f)
  for run in runs:
    if run.ablation or run.spec.name in timings:
      continue
    timings[run.spec.name] = time_method(run.config, steps=steps, warmup=warmup)
    timings[run.spec.name]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(path + ".tmp", "w") as f:
      json.dump(timings, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  return timings
