"""The output contract shared by every model: named, ordered, never mode-dependent."""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class ModelOutputs:
  """What a classifier with one or more heads returns, in train and eval mode alike.

  Heads are ordered auxiliary branch 1, 2, ..., backbone last; a plain backbone has one head.

  Attributes:
    logits: per head, (N, num_classes).
    features: per head, the final feature map (N, h, w, c) that the head pools.
    stage_features: the backbone's stage outputs (N, h_s, w_s, c_s), first stage first.
  """
  logits: tuple[jax.Array, ...]
  features: tuple[jax.Array, ...]
  stage_features: tuple[jax.Array, ...] = ()

  @property
  def num_heads(self) -> int:
    return len(self.logits)
