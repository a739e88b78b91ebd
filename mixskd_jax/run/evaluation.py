"""A run's evaluations: every test example (or training example) exactly once, sharded over
the mesh like training, the last batch padded and masked."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixskd_jax import data
from mixskd_jax.train import sharding, steps

TRAIN_SET_PREFIX = "train_set/"  # config.eval_on_train_set's keys in the eval history


def eval_sums(eval_step, mesh, state, iterator) -> dict[str, Any]:
  """`eval_step`'s sums over every batch of `iterator` (padded, masked), on the host."""
  batch_sharding = sharding.data_sharding(mesh)
  totals = None
  for local in iterator:
    sums = eval_step(state, sharding.to_global(local, batch_sharding))
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  return jax.device_get(totals)


def evaluate(config: ml_collections.ConfigDict, mesh, eval_step, state
             ) -> tuple[dict[str, float], dict[str, list]]:
  """(the metrics over every test example exactly once, the backbone's reliability diagram
  for results.json)."""
  totals = eval_sums(eval_step, mesh, state, data.eval_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count()))
  calibration = {k.split("/", 1)[1]: np.asarray(v).tolist()
                 for k, v in totals.items() if k.startswith("calibration/")}
  return steps.summarize_eval(totals), calibration


def evaluate_train_set(config: ml_collections.ConfigDict, mesh, eval_step, state
                       ) -> dict[str, float]:
  """`evaluate` on the training examples the run trains on (unaugmented, each once), its keys
  under `train_set/` instead of `eval/` (`config.eval_on_train_set`)."""
  totals = eval_sums(eval_step, mesh, state, data.train_eval_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count()))
  return {TRAIN_SET_PREFIX + key.split("/", 1)[1]: value
          for key, value in steps.summarize_eval(totals).items()}
