"""Image augmentations as TF functions on single uint8 images, deterministic given a seed.

Every random choice comes from `tf.random.stateless_*` / `tf.image.stateless_random_*`
with an explicit seed (an int64 tensor of shape (2,)), so the same example at the same
place of the same epoch is augmented the same way in every run, resumed or not, on every
host. `example_seed` derives that seed from (seed, epoch, position).

Shapes: images are (H, W, C) uint8 in and out.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import tensorflow as tf

_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 windows, then falls back


def example_seed(seed, epoch, position) -> tf.Tensor:
  """The (2,) int64 stateless seed of one example: fold `position` into (seed, epoch)."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def _split(seed: tf.Tensor, n: int):
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def pad_crop_flip(image: tf.Tensor, seed: tf.Tensor, pad: int) -> tf.Tensor:
  """RandomCrop(size, padding=pad) with zero padding, then RandomHorizontalFlip(0.5).

  Args:
    image: (H, W, C) uint8.
    seed: (2,) int stateless seed.
    pad: zero border added on each side before cropping back to (H, W).

  Returns:
    (H, W, C) uint8: the image shifted by up to `pad` pixels each way, maybe mirrored.
  """
  crop_seed, flip_seed = _split(seed, 2)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
  return tf.image.stateless_random_flip_left_right(cropped, seed=flip_seed)


def random_resized_crop_window(
    image_hw: tf.Tensor, seed: tf.Tensor,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """torchvision's `RandomResizedCrop.get_params`, vectorized over its 10 attempts.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first attempt whose window
  fits is used, else the centered crop with the aspect ratio clamped into `ratio`.

  Args:
    image_hw: (2,) int32 (height, width).
    seed: (2,) int stateless seed.

  Returns:
    (4,) int32 window (top, left, height, width).
  """
  area_seed, ratio_seed, top_seed, left_seed = _split(seed, 4)
  height, width = image_hw[0], image_hw[1]
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target_area = h_f * w_f * tf.random.stateless_uniform(
    [_RRC_ATTEMPTS], area_seed, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
    [_RRC_ATTEMPTS], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  ws = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # Fallback: centered crop, aspect ratio clamped into `ratio`.
  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  h = tf.where(found, hs[first], fb_h)
  w = tf.where(found, ws[first], fb_w)
  top = tf.where(found, tf.random.stateless_uniform(
    [], top_seed, minval=0, maxval=height - h + 1, dtype=tf.int32), (height - h) // 2)
  left = tf.where(found, tf.random.stateless_uniform(
    [], left_seed, minval=0, maxval=width - w + 1, dtype=tf.int32), (width - w) // 2)
  return tf.stack([top, left, h, w])


def resize_uint8(image: tf.Tensor, size: Sequence) -> tf.Tensor:
  """Bilinear resize with antialiasing (as PIL, which torchvision uses), rounded to uint8."""
  return _to_uint8(tf.image.resize(image, size, method="bilinear", antialias=True))


def random_resized_crop_flip(image: tf.Tensor, seed: tf.Tensor, size: int = 224,
                             scale: Tuple[float, float] = (0.08, 1.0),
                             ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """RandomResizedCrop(size, scale, ratio, bilinear) + RandomHorizontalFlip on a decoded image.

  Args:
    image: (H, W, 3) uint8, any H, W.
    seed: (2,) int stateless seed.

  Returns:
    (size, size, 3) uint8.
  """
  window_seed, flip_seed = _split(seed, 2)
  top, left, h, w = tf.unstack(random_resized_crop_window(tf.shape(image)[:2], window_seed,
                                                          scale, ratio))
  crop = image[top:top + h, left:left + w]
  return tf.image.stateless_random_flip_left_right(resize_uint8(crop, (size, size)), flip_seed)


def decode_random_resized_crop_flip(jpeg: tf.Tensor, seed: tf.Tensor, size: int = 224,
                                    scale: Tuple[float, float] = (0.08, 1.0),
                                    ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """`random_resized_crop_flip` on JPEG bytes, decoding only the crop window (faster).

  Args:
    jpeg: () string, a JPEG-encoded RGB image (tfds imagenet2012 stores only JPEGs).
    seed: (2,) int stateless seed; the same window as `random_resized_crop_flip` gets.

  Returns:
    (size, size, 3) uint8.
  """
  window_seed, flip_seed = _split(seed, 2)
  window = random_resized_crop_window(tf.image.extract_jpeg_shape(jpeg)[:2], window_seed,
                                      scale, ratio)
  crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.image.stateless_random_flip_left_right(resize_uint8(crop, (size, size)), flip_seed)


def resize_center_crop(image: tf.Tensor, resize: int = 256, crop: int = 224) -> tf.Tensor:
  """Resize(resize) (shorter side, bilinear) then CenterCrop(crop), as torchvision.

  Args:
    image: (H, W, C) uint8, any H, W.

  Returns:
    (crop, crop, C) uint8.
  """
  hw = tf.shape(image)[:2]
  short = tf.reduce_min(hw)
  new_hw = (resize * hw) // short  # torchvision: long side int(resize * long / short)
  resized = resize_uint8(image, new_hw)
  top = tf.cast(tf.round(tf.cast(new_hw[0] - crop, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_hw[1] - crop, tf.float32) / 2), tf.int32)
  return resized[top:top + crop, left:left + crop]
