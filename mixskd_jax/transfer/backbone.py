"""A pre-trained backbone on the downstream task: loaded, re-normalized, read out.

`downstream_variables` builds the plain network of the source's architecture with a fresh head
for the downstream classes and copies the source's backbone into it (`interop.pretrained`: any
workdir of ours, one checkpoint step, or a converted official checkpoint; a mismatch is a
one-line `PretrainedError`). `reestimate_batch_stats` replaces the BatchNorm running statistics
with the downstream data's own (a pass in train mode that updates nothing else), and
`stage_features` reads the backbone's stage outputs in inference mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mixskd_jax.interop import pretrained
from mixskd_jax.models import build_model
from mixskd_jax.models import pooling as pooling_lib

# (N, H, W, C) uint8 images -> (N, H, W, C) normalized float32 inputs.
Normalize = Callable[[jax.Array], jax.Array]


def plain_model(model_name: str, num_classes: int, *, bn_momentum: float | None = None
                ) -> nn.Module:
  """The registered plain network (`StagedClassifier`); `bn_momentum` overrides its BatchNorm's
  running-statistics momentum (0: the statistics of the last batch alone)."""
  overrides = {} if bn_momentum is None else {"bn_momentum": bn_momentum}
  return build_model(model_name, num_classes, mixskd=False, **overrides)


def downstream_variables(trained: pretrained.Trained, model: nn.Module, sample: jax.Array,
                         seed: int, *, backbone_under: str | None = None) -> tuple[dict, str]:
  """`model`'s variables, initialized from `seed`, with the backbone copied from `trained`.

  Args:
    trained: the source (`pretrained.load_trained`).
    model: the downstream network: the plain classifier, or a network holding it under
      `backbone_under` (the segmentation network's 'backbone').
    sample: one input batch, for `model.init`.
    seed: the fresh parts' (head, decoder) initialization.

  Returns:
    ({'params', 'batch_stats'} as numpy arrays, one line saying what was copied).
  """
  fresh = jax.tree.map(np.asarray, model.init(jax.random.key(seed), sample, train=False))
  fresh = {c: dict(v) for c, v in fresh.items()}
  return pretrained.transfer(fresh, trained, mixskd=backbone_under is not None,
                             model_name=trained.model_name)


def reestimate_batch_stats(model_zero_momentum: nn.Module, variables: dict, inputs: jax.Array,
                           *, chunk: int) -> dict:
  """BatchNorm running statistics of `inputs` in place of `variables['batch_stats']`.

  Each chunk of rows goes once through the network in train mode (normalized with its own
  statistics, as in training); a network built with BatchNorm momentum 0 then holds exactly
  that chunk's mean and unbiased variance per layer, and the result is their average over the
  chunks, weighted by rows. Parameters are not touched.

  Args:
    model_zero_momentum: the network with `bn_momentum=0` (`plain_model`).
    variables: {'params', 'batch_stats'}.
    inputs: (N, ...) normalized inputs.
    chunk: rows per pass (the downstream batch size: statistics as training sees them).
  """
  apply = _train_mode_stats(model_zero_momentum)
  total, rows = None, 0
  for start in range(0, inputs.shape[0], chunk):
    part = inputs[start:start + chunk]
    stats = apply(variables, part)
    weighted = jax.tree.map(lambda s: s * part.shape[0], stats)
    total = weighted if total is None else jax.tree.map(jnp.add, total, weighted)
    rows += part.shape[0]
  return {**variables, "batch_stats": jax.tree.map(lambda s: np.asarray(s / rows), total)}


@functools.lru_cache(maxsize=8)
def _train_mode_stats(model: nn.Module):
  @jax.jit
  def apply(variables, x):
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return state["batch_stats"]
  return apply


def stage_features(model: nn.Module, variables: dict, inputs: jax.Array, *, chunk: int,
                   pooled: bool = False) -> list[np.ndarray]:
  """The backbone's stage outputs in inference mode, per stage (N, h, w, c) (first stage
  first), or with `pooled` the last stage's spatial mean alone, [(N, c)]."""
  apply = _inference_features(model, pooled)
  parts = [apply(variables, inputs[s:s + chunk]) for s in range(0, inputs.shape[0], chunk)]
  return [np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(len(parts[0]))]


@functools.lru_cache(maxsize=8)
def _inference_features(model: nn.Module, pooled: bool):
  @jax.jit
  def apply(variables, x):
    outputs = model.apply(variables, x, train=False)
    if pooled:  # what the head reads
      return [pooling_lib.pool(outputs.features[-1], model.pooling)]
    return list(outputs.stage_features)
  return apply


def apply_training(model: nn.Module, variables: dict, x: jax.Array, batch_norm_trains: bool
                   ) -> tuple[Any, dict]:
  """(outputs, batch_stats) of a training step's forward pass: BatchNorm in train mode (its
  statistics updated) when `batch_norm_trains`, else in inference mode (unchanged)."""
  if batch_norm_trains:
    outputs, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return outputs, state["batch_stats"]
  return model.apply(variables, x, train=False), variables["batch_stats"]
