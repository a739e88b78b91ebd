"""Semantic segmentation on a classifier's backbone: an FPN-style decoder and mean IoU.

`SegmentationNetwork` runs the plain backbone (`StagedClassifier`, held as the child
`backbone`, so a pre-trained backbone copies into it as into the classifier) and decodes its
stage outputs: each stage is projected to `width` channels by a 1x1 convolution, resized to
the finest stage's resolution and summed (the top-down sum of an FPN, in one step); a 3x3
convolution with ReLU mixes them and a 1x1 convolution gives per-pixel logits, resized to the
input's resolution. The decoder has no normalization, so BatchNorm lives in the backbone
alone and the transfer protocol's BatchNorm modes mean the same as for classification.
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


class FPNDecoder(nn.Module):
  """Stage features -> per-pixel logits.

  Attributes:
    num_classes: output channels (background included).
    width: channels of the lateral projections and of the fused map.
  """
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, stage_features: Sequence[jax.Array], out_hw: tuple[int, int]) -> jax.Array:
    """stage_features: per stage (N, h_s, w_s, c_s), finest first -> (N, *out_hw, classes)."""
    n, h, w = stage_features[0].shape[:3]
    fused = 0.0
    for s, features in enumerate(stage_features):
      lateral = nn.Conv(self.width, (1, 1), name=f"lateral{s}")(features)
      fused = fused + jax.image.resize(lateral, (n, h, w, self.width), "bilinear")
    fused = nn.relu(nn.Conv(self.width, (3, 3), padding=1, name="fuse")(fused))
    logits = nn.Conv(self.num_classes, (1, 1), name="classifier")(fused)
    if (h, w) != tuple(out_hw):
      logits = jax.image.resize(logits, (n, *out_hw, self.num_classes), "bilinear")
    return logits


class SegmentationNetwork(nn.Module):
  """backbone (a `StagedClassifier`; its head is unused) + `FPNDecoder`."""
  backbone: nn.Module
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: (N, H, W, C) normalized -> (N, H, W, num_classes) logits."""
    outputs = self.backbone(x, train=train)
    return FPNDecoder(self.num_classes, self.width, name="decoder")(
        outputs.stage_features, x.shape[1:3])


def pixel_cross_entropy(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """(N, H, W, k) logits, (N, H, W) labels -> the mean over every pixel."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), masks))


@functools.lru_cache(maxsize=None)
def segmentation_loss(model: SegmentationNetwork, mean: tuple[float, ...],
                      std: tuple[float, ...], batch_norm_trains: bool):
  """loss(params, batch_stats, uint8 canvases (B, H, W, C), masks (B, H, W))."""
  def loss(params, batch_stats, images, masks):
    logits, batch_stats = backbone.apply_training(
        model, {"params": params, "batch_stats": batch_stats}, normalize(images, mean, std),
        batch_norm_trains)
    return pixel_cross_entropy(logits, masks), batch_stats
  return loss


@functools.lru_cache(maxsize=None)
def decoder_loss(decoder: FPNDecoder, out_hw: tuple[int, int]):
  """loss(decoder params, {}, stage features [(B, h_s, w_s, c_s)], masks (B, H, W)): the
  decoder alone on a frozen backbone's features."""
  def loss(params, state, features, masks):
    return pixel_cross_entropy(decoder.apply({"params": params}, features, out_hw), masks), state
  return loss


def decoder_masks(decoder: FPNDecoder, out_hw: tuple[int, int], params: dict,
                  features: Sequence[jax.Array], *, chunk: int) -> np.ndarray:
  """(K, N, H, W) per-pixel argmax of K stacked decoders on a frozen backbone's features."""
  return sweep.stacked_outputs(_decoder_argmax(decoder, tuple(out_hw)), (params,),
                               list(features), chunk=chunk)


@functools.lru_cache(maxsize=8)
def _decoder_argmax(decoder: FPNDecoder, out_hw: tuple[int, int]):
  def one(params, features):
    return jnp.argmax(decoder.apply({"params": params}, features, out_hw),
                      axis=-1).astype(jnp.int32)
  return jax.jit(one)


def predicted_masks(model: SegmentationNetwork, mean: Sequence[float], std: Sequence[float],
                    params: dict, batch_stats: dict, images: np.ndarray, *, chunk: int
                    ) -> np.ndarray:
  """(K, N, H, W) per-pixel argmax of K stacked copies of `model` (inference mode)."""
  return sweep.stacked_outputs(_argmax(model, tuple(mean), tuple(std)), (params, batch_stats),
                               images, chunk=chunk)


@functools.lru_cache(maxsize=8)
def _argmax(model: SegmentationNetwork, mean: tuple[float, ...], std: tuple[float, ...]):
  def one(params, batch_stats, images):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         normalize(images, mean, std), train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.jit(one)


def confusion_matrix(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) pixel counts, rows the target class, columns the prediction."""
  index = target.astype(np.int64).ravel() * num_classes + predicted.astype(np.int64).ravel()
  return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """IoU = TP / (TP + FP + FN) per class, in %; NaN for a class absent from both sides."""
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, 100.0 * tp / union, np.nan)


def mean_iou(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> float:
  """Mean over classes (background included) of the IoU over all pixels of the set, in %:
  the standard semantic-segmentation mIoU (classes absent from prediction and target are
  left out of the mean)."""
  return float(np.nanmean(iou_per_class(confusion_matrix(predicted, target, num_classes))))
