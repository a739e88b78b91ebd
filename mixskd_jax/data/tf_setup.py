"""Keeps TensorFlow (used only for tfds and tf.data on the host) off the accelerators."""

from __future__ import annotations

import logging

_done = False


def hide_accelerators_from_tf() -> None:
  """Makes every GPU invisible to TF, once per process, before any pipeline is built.

  JAX owns the accelerators; a TF that saw them would reserve their memory. If TF already
  initialized its devices (someone ran a TF op first), this can no longer be changed, and
  a warning says so.
  """
  global _done
  if _done:
    return
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialized
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow initialized its GPUs before mixskd_jax.data could hide them; "
                      "it may hold accelerator memory that JAX needs.")
  _done = True
