"""What a pre-trained backbone looks like: weight norms, BatchNorm statistics, feature scale.

Behind BatchNorm a convolution's output is normalized, so its weights' norm does not change
what the network computes but does change how far one SGD step moves it (the effective step
shrinks as the norm grows). Large running variances mean large raw activations before
normalization. These numbers, per part of the backbone, are read next to the transfer results
to say why a backbone transfers as it does.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

from mixskd_jax.interop import pretrained
from mixskd_jax.models import pooling as pooling_lib
from mixskd_jax.transfer import backbone
from mixskd_jax.transfer.tasks import Source

STEM = "stem"


def _part(path: tuple[str, ...]) -> str:
  """The backbone part a parameter belongs to: 'stem', 'layer1', ..., or 'fc'."""
  return path[0]


def weight_norms(params: dict) -> dict[str, float]:
  """Per part, the L2 norm of all its convolution kernels together (the head: its kernel)."""
  squares: dict[str, float] = {}
  for path, value in traverse_util.flatten_dict(params).items():
    if path[-1] != "kernel":
      continue
    squares[_part(path)] = squares.get(_part(path), 0.0) + float(np.sum(np.square(value)))
  return {part: float(np.sqrt(total)) for part, total in squares.items()}


def batchnorm_statistics(batch_stats: dict) -> dict[str, dict[str, float]]:
  """Per part: the largest and the mean running variance over its BatchNorm channels, and the
  largest absolute running mean."""
  per_part: dict[str, dict[str, list]] = {}
  for path, value in traverse_util.flatten_dict(batch_stats).items():
    entry = per_part.setdefault(_part(path), {"var": [], "mean": []})
    entry[path[-1]].append(np.ravel(value))
  out = {}
  for part, entry in per_part.items():
    var = np.concatenate(entry["var"])
    mean = np.concatenate(entry["mean"])
    out[part] = {"max_var": float(var.max()), "mean_var": float(var.mean()),
                 "max_abs_mean": float(np.abs(mean).max())}
  return out


def feature_scale(source: Source, images: np.ndarray) -> dict[str, float]:
  """Root mean square of every stage's output (inference mode, the source's statistics) on
  `images`, per stage 'layer1', ...; and of the pooled features the head reads ('pooled')."""
  model = source.classifier()
  variables, _ = backbone.downstream_variables(source.trained, model, images[:1] * 0.0,
                                               source.seed)
  stages = backbone.stage_features(model, variables, source.normalized(images),
                                  chunk=source.chunk)
  # The head reads the last stage's output, pooled (`StagedClassifier`).
  pooled = np.asarray(pooling_lib.pool(stages[-1], model.pooling))
  rms = {f"layer{s + 1}": float(np.sqrt(np.mean(np.square(f)))) for s, f in enumerate(stages)}
  rms["pooled"] = float(np.sqrt(np.mean(np.square(pooled))))
  return rms


def diagnose(source: Source) -> dict:
  """{'weight_norm': per part, 'batchnorm': per part, 'feature_rms': per stage} of the
  source's backbone, features measured on the downstream training images."""
  variables = pretrained.backbone_variables(source.trained)
  return {"weight_norm": weight_norms(variables["params"]),
          "batchnorm": batchnorm_statistics(variables.get("batch_stats", {})),
          "feature_rms": feature_scale(source, source.data.train.images)}
