"""The three downstream tasks of the fair protocol, each as `fit(setting, train) -> scorer`.

A task trains K copies at K learning rates under one BatchNorm mode (`sweep.train_sweep`) and
returns a function that scores them on another split. `protocol.evaluate` calls `fit` once per
BatchNorm mode on the training split, scores validation, picks the best setting and scores
that copy alone on test.

* `LinearProbe`: the backbone frozen in inference mode; a linear head on its pooled
  features (computed once per BatchNorm mode). BatchNorm: "source" or "reestimated".
* `FineTune`: the whole classifier trains. BatchNorm: "source", "reestimated" or "batch".
* `Segmentation`: canvases of pasted items (`scenes`), an FPN decoder on the backbone's
  stage features (`segmentation`), with the backbone fine-tuned (`frozen_backbone=False`) or
  frozen and read once (`frozen_backbone=True`, a dense probe). Scored by mean IoU.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixskd_jax.data import normalize
from mixskd_jax.interop import pretrained
from mixskd_jax.transfer import backbone, classification, scenes, segmentation, sweep
from mixskd_jax.transfer.data import Downstream, Split

# scorer(split, copy=None) -> (K,) metric values (higher is better) and (K,) losses (lower is
# better) of every copy, or with `copy` of that copy alone, as (1,) arrays.
Scorer = Callable[..., tuple[np.ndarray, np.ndarray]]


def _only(tree, copy: int | None):
  """The stacked copies, or copy `copy` alone (still stacked, K = 1)."""
  return tree if copy is None else jax.tree.map(lambda x: x[copy:copy + 1], tree)


@dataclasses.dataclass(frozen=True)
class Source:
  """A loaded pre-trained backbone and the downstream data it is evaluated on."""
  trained: pretrained.Trained
  data: Downstream
  seed: int
  chunk: int  # rows per inference call

  def normalized(self, images: np.ndarray) -> jax.Array:
    return normalize(images, self.data.mean, self.data.std)

  def classifier(self, bn_momentum: float | None = None):
    return backbone.plain_model(self.trained.model_name, self.data.num_classes,
                                bn_momentum=bn_momentum)


def with_bn_mode(source: Source, model_zero_momentum, variables: dict, bn_mode: str,
                 train_images: np.ndarray, batch_size: int) -> dict:
  """`variables` with the statistics of `bn_mode`: re-estimated on `train_images` for
  "reestimated", the source's otherwise ("batch" re-estimates them as it trains)."""
  if bn_mode not in classification.BN_MODES:
    raise ValueError(f"BatchNorm mode {bn_mode!r} is unknown; use one of "
                     f"{classification.BN_MODES}.")
  if bn_mode != "reestimated":
    return variables
  return backbone.reestimate_batch_stats(model_zero_momentum, variables,
                                         source.normalized(train_images), chunk=batch_size)


SPLIT_NAMES = ("train", "validation", "test")


def _train_copies(loss, variables: dict, train: Split, learning_rates: np.ndarray,
                  recipe: sweep.Recipe, seed: int) -> tuple[dict, dict]:
  """The whole network's {params, batch_stats} trained once per learning rate (stacked)."""
  k = len(learning_rates)
  params, stats, _ = sweep.train_sweep(
      loss, sweep.stack_copies(variables["params"], k),
      sweep.stack_copies(variables["batch_stats"], k), jnp.asarray(train.images),
      jnp.asarray(train.labels), learning_rates=learning_rates, recipe=recipe, seed=seed)
  return params, stats


def _plain_classifier(source: Source, bn_mode: str, train: Split, batch_size: int
                      ) -> tuple[object, dict]:
  """The downstream classifier and its variables: the source's backbone, a fresh head, and
  the BatchNorm statistics of `bn_mode`."""
  model = source.classifier()
  variables, _ = backbone.downstream_variables(source.trained, model, train.images[:1] * 0.0,
                                               source.seed)
  return model, with_bn_mode(source, source.classifier(0.0), variables, bn_mode, train.images,
                             batch_size)


class _Classification:
  metric = "top1"

  def prepare(self, split: Split, name: str, seed: int) -> Split:
    del name, seed
    return split


@dataclasses.dataclass(frozen=True)
class LinearProbe(_Classification):
  recipe: sweep.Recipe

  def fit(self, source: Source, bn_mode: str, train: Split,
          learning_rates: np.ndarray) -> Scorer:
    if bn_mode == "batch":
      raise ValueError("The linear probe keeps the backbone in inference mode: its BatchNorm "
                       "modes are 'source' and 'reestimated', not 'batch'.")
    model, variables = _plain_classifier(source, bn_mode, train, self.recipe.batch_size)
    features = lambda s: backbone.stage_features(model, variables, source.normalized(s.images),
                                                 chunk=source.chunk, pooled=True)[0]
    k = len(learning_rates)
    heads = sweep.stack_copies(variables["params"][pretrained.HEAD], k)
    heads, _, _ = sweep.train_sweep(classification.linear_probe_loss(), heads, {},
                                    jnp.asarray(features(train)), jnp.asarray(train.labels),
                                    learning_rates=learning_rates, recipe=self.recipe,
                                    seed=source.seed)

    def score(split: Split, copy: int | None = None):
      logits = classification.linear_logits(_only(heads, copy), features(split))
      return classification.scores(logits, split.labels)
    return score


@dataclasses.dataclass(frozen=True)
class FineTune(_Classification):
  recipe: sweep.Recipe

  def fit(self, source: Source, bn_mode: str, train: Split,
          learning_rates: np.ndarray) -> Scorer:
    model, variables = _plain_classifier(source, bn_mode, train, self.recipe.batch_size)
    loss = classification.fine_tune_loss(model, source.data.mean, source.data.std,
                                         bn_mode == "batch")
    params, stats = _train_copies(loss, variables, train, learning_rates, self.recipe,
                                  source.seed)

    def score(split: Split, copy: int | None = None):
      logits = classification.classifier_logits(model, source.data.mean, source.data.std,
                                                 _only(params, copy), _only(stats, copy),
                                                 split.images, chunk=source.chunk)
      return classification.scores(logits, split.labels)
    return score


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """Canvases of each split are composed from that split's items alone (the validation
  canvases from the validation items, ...), each split with its own seeds.

  Attributes:
    canvases: canvases per split name ("train", "validation", "test").
  """
  recipe: sweep.Recipe
  scene: scenes.SceneSpec
  canvases: dict
  decoder_width: int
  frozen_backbone: bool
  metric: str = "miou"

  def prepare(self, split: Split, name: str, seed: int) -> Split:
    """The canvases of split `name` ("train", "validation", "test"), composed from `split`'s
    items: (count, size, size, 1) uint8 images and (count, size, size) per-pixel labels."""
    offset = SPLIT_NAMES.index(name)
    images, masks = scenes.compose(split.images, split.labels, count=self.canvases[name],
                                   spec=self.scene, seed=seed * len(SPLIT_NAMES) + offset)
    return Split(images, masks)

  def fit(self, source: Source, bn_mode: str, train: Split,
          learning_rates: np.ndarray) -> Scorer:
    if self.frozen_backbone and bn_mode == "batch":
      raise ValueError("A frozen backbone runs in inference mode: its BatchNorm modes are "
                       "'source' and 'reestimated', not 'batch'.")
    classes = source.data.num_classes + 1
    net = segmentation.SegmentationNetwork(source.classifier(), classes, self.decoder_width)
    net_zero = segmentation.SegmentationNetwork(source.classifier(0.0), classes,
                                                self.decoder_width)
    variables, _ = backbone.downstream_variables(source.trained, net, train.images[:1] * 0.0,
                                                 source.seed, backbone_under="backbone")
    variables = with_bn_mode(source, net_zero, variables, bn_mode, train.images,
                             self.recipe.batch_size)
    if self.frozen_backbone:
      return self._fit_decoder(source, net, variables, train, learning_rates)
    loss = segmentation.segmentation_loss(net, source.data.mean, source.data.std,
                                          bn_mode == "batch")
    params, stats = _train_copies(loss, variables, train, learning_rates, self.recipe,
                                  source.seed)

    def score(split: Split, copy: int | None = None):
      predicted = segmentation.predicted_masks(net, source.data.mean, source.data.std,
                                               _only(params, copy), _only(stats, copy),
                                               split.images, chunk=source.chunk)
      return _miou_scores(predicted, split.labels, classes)
    return score

  def _fit_decoder(self, source, net, variables, train, learning_rates) -> Scorer:
    classifier = net.backbone
    backbone_variables = {c: v["backbone"] for c, v in variables.items()}
    features = lambda s: [jnp.asarray(f) for f in backbone.stage_features(
        classifier, backbone_variables, source.normalized(s.images), chunk=source.chunk)]
    decoder = segmentation.FPNDecoder(source.data.num_classes + 1, self.decoder_width)
    size = tuple(train.images.shape[1:3])
    loss = segmentation.decoder_loss(decoder, size)
    heads = sweep.stack_copies(variables["params"]["decoder"], len(learning_rates))
    heads, _, _ = sweep.train_sweep(loss, heads, {}, features(train),
                                    jnp.asarray(train.labels), learning_rates=learning_rates,
                                    recipe=self.recipe, seed=source.seed)

    def score(split: Split, copy: int | None = None):
      predicted = segmentation.decoder_masks(decoder, size, _only(heads, copy), features(split),
                                             chunk=source.chunk)
      return _miou_scores(predicted, split.labels, source.data.num_classes + 1)
    return score


def _miou_scores(predicted: np.ndarray, masks: np.ndarray,
                 classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(K,) mean IoU and (K,) pixel error rate (the loss used to break ties)."""
  miou = np.array([segmentation.mean_iou(p, masks, classes) for p in predicted])
  error = np.array([np.mean(p != masks) for p in predicted])
  return miou, error
