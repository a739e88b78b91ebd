"""The downstream classifier: a linear probe on frozen features, or the whole network tuned.

Losses are built once per model and setting (cached) so that every backbone and seed of a
sweep reuses one compiled program (`sweep.train_sweep`). BatchNorm, by `bn_mode`:

* "source": inference mode with the pre-training's running statistics, never changed;
* "reestimated": inference mode with statistics re-estimated on the downstream training images
  before training (`backbone.reestimate_batch_stats`), never changed after;
* "batch" (fine-tuning only): train mode, each batch normalized with its own statistics and the
  running statistics updated, as in ordinary training.

The two frozen modes differ only in the statistics they start from, so they share a program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mixskd_jax.data import normalize
from mixskd_jax.transfer import backbone, sweep

BN_MODES = ("source", "reestimated", "batch")
FROZEN_BN_MODES = ("source", "reestimated")


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


@functools.lru_cache(maxsize=None)
def linear_probe_loss():
  """loss(head, {}, features (B, c), labels (B,)) for a head {'kernel': (c, k), 'bias': (k,)}."""
  def loss(head, state, features, labels):
    return _cross_entropy(features @ head["kernel"] + head["bias"], labels), state
  return loss


@functools.lru_cache(maxsize=None)
def fine_tune_loss(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                   batch_norm_trains: bool):
  """loss(params, batch_stats, uint8 images (B, H, W, C), labels (B,)) of the whole plain
  classifier; BatchNorm in train mode when `batch_norm_trains` (bn_mode "batch")."""
  def loss(params, batch_stats, images, labels):
    outputs, batch_stats = backbone.apply_training(
        model, {"params": params, "batch_stats": batch_stats}, normalize(images, mean, std),
        batch_norm_trains)
    return _cross_entropy(outputs.logits[-1], labels), batch_stats
  return loss


def linear_logits(heads: dict, features: np.ndarray) -> np.ndarray:
  """(K, N, k) logits of K stacked heads on (N, c) features."""
  return np.asarray(jnp.einsum("nc,kcj->knj", features, heads["kernel"])
                    + heads["bias"][:, None, :])


def classifier_logits(model: nn.Module, mean: Sequence[float], std: Sequence[float],
                      params: dict, batch_stats: dict, images: np.ndarray, *, chunk: int
                      ) -> np.ndarray:
  """(K, N, k) inference-mode logits of K stacked copies of `model` on uint8 images."""
  return sweep.stacked_outputs(_inference(model, tuple(mean), tuple(std)),
                               (params, batch_stats), images, chunk=chunk)


@functools.lru_cache(maxsize=8)
def _inference(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
  def one(params, batch_stats, images):
    outputs = model.apply({"params": params, "batch_stats": batch_stats},
                          normalize(images, mean, std), train=False)
    return outputs.logits[-1]
  return jax.jit(one)


def scores(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(K, N, k) logits, (N,) labels -> ((K,) top-1 in %, (K,) mean cross-entropy)."""
  return top1(logits, labels), mean_cross_entropy(logits, labels)


def top1(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(K, N, k) logits, (N,) labels -> (K,) top-1 accuracy in %."""
  return 100.0 * np.mean(np.argmax(logits, axis=-1) == labels[None], axis=-1)


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(K, N, k) logits, (N,) labels -> (K,) mean cross-entropy."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(axis=-1))
  picked = np.take_along_axis(shifted, labels[None, :, None], axis=-1)[..., 0]
  return np.mean(log_z - picked, axis=-1)
