"""A dense-prediction task composed offline from real images: segmentation of canvases.

Each canvas is a black square on which a few real images (Fashion-MNIST items of the
downstream classes) are pasted at random positions and scales; later ones cover earlier ones.
A pixel's label is the class of the item whose own foreground (its resized pixels at or above
`foreground_threshold`) covers it last, plus one; 0 is the background. The scenes are
synthetic compositions of real images, not photographs: they test whether a backbone's stage
features locate and tell apart objects, at a scale a 2-core machine trains in seconds.

Everything is a pure function of its arguments: canvas i draws from
`np.random.default_rng([seed, i])`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BACKGROUND = 0


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """How canvases are composed.

  Attributes:
    size: canvas height and width in pixels.
    min_items, max_items: items per canvas, drawn uniformly from this range (inclusive).
    min_scale, max_scale: an item's side is its image's side times a factor drawn uniformly
      from this range (clipped to the canvas).
    foreground_threshold: resized pixel values (0-255) at or above it are the item's mask.
  """
  size: int
  min_items: int
  max_items: int
  min_scale: float
  max_scale: float
  foreground_threshold: int

  def __post_init__(self):
    if not 1 <= self.min_items <= self.max_items:
      raise ValueError(f"scenes: need 1 <= min_items <= max_items, got {self.min_items}, "
                       f"{self.max_items}.")
    if not 0 < self.min_scale <= self.max_scale:
      raise ValueError(f"scenes: need 0 < min_scale <= max_scale, got {self.min_scale}, "
                       f"{self.max_scale}.")
    if not 0 < self.foreground_threshold <= 255:
      raise ValueError("scenes: foreground_threshold must be in 1..255, got "
                       f"{self.foreground_threshold}.")


def resize_bilinear(image: np.ndarray, side: int) -> np.ndarray:
  """(h, w) image -> (side, side) float64, bilinear with half-pixel centres (as
  `jax.image.resize(..., "bilinear")` when enlarging)."""
  h, w = image.shape

  def axis(n_in):
    centre = np.clip((np.arange(side) + 0.5) * n_in / side - 0.5, 0, n_in - 1)
    low = np.floor(centre).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    return low, high, centre - low

  r0, r1, fr = axis(h)
  c0, c1, fc = axis(w)
  img = image.astype(np.float64)
  top = img[r0][:, c0] * (1 - fc) + img[r0][:, c1] * fc
  bottom = img[r1][:, c0] * (1 - fc) + img[r1][:, c1] * fc
  return top * (1 - fr[:, None]) + bottom * fr[:, None]


def compose(images: np.ndarray, labels: np.ndarray, *, count: int, spec: SceneSpec,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Canvases and their per-pixel labels.

  Args:
    images: (N, h, w) or (N, h, w, 1) uint8 items to draw from (with replacement).
    labels: (N,) their classes 0..k-1.
    count: canvases to make.
    spec: sizes, counts and scales (`SceneSpec`).
    seed: canvas i draws from `np.random.default_rng([seed, i])`.

  Returns:
    (canvases (count, size, size, 1) uint8, masks (count, size, size) int32 in 0..k, 0 the
    background and c + 1 an item of class c).
  """
  items = images.reshape(images.shape[0], images.shape[1], images.shape[2])
  if items.shape[0] == 0 or items.shape[0] != labels.shape[0]:
    raise ValueError(f"scenes.compose needs as many labels as images (at least one); got "
                     f"{items.shape[0]} images and {labels.shape[0]} labels.")
  canvases = np.zeros((count, spec.size, spec.size), np.uint8)
  masks = np.full((count, spec.size, spec.size), BACKGROUND, np.int32)
  for i in range(count):
    rng = np.random.default_rng([seed, i])
    for _ in range(rng.integers(spec.min_items, spec.max_items + 1)):
      j = rng.integers(items.shape[0])
      scale = rng.uniform(spec.min_scale, spec.max_scale)
      side = int(min(spec.size, max(1, round(items.shape[1] * scale))))
      item = np.clip(np.rint(resize_bilinear(items[j], side)), 0, 255).astype(np.uint8)
      top, left = rng.integers(0, spec.size - side + 1, size=2)
      foreground = item >= spec.foreground_threshold
      window = (slice(top, top + side), slice(left, left + side))
      canvases[i][window][foreground] = item[foreground]
      masks[i][window][foreground] = labels[j] + 1
  return canvases[..., None], masks
