"""Turn a PyTorch-layout state dict into Flax variables for our models, and back out the backbone."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mixskd_jax.interop import keymap
from mixskd_jax.models.heads import FeatureDiscriminators
from mixskd_jax.models.staged import MixSKDNetwork, backbone_variables

Variables = dict[str, Any]


class ConversionRefused(ValueError):
  """The converter refuses its input before writing anything; the message is one line
  (`python -m mixskd_jax.interop` prints it and exits with status 2)."""


def check_finite(state_dict: Mapping[str, Any]) -> None:
  """Raises ConversionRefused naming the first tensor (in the file's order) that holds a NaN or
  an infinity: a diverged or corrupted checkpoint would convert into a model that outputs NaN."""
  for name, value in state_dict.items():
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.inexact):
      continue  # integer counters (num_batches_tracked) cannot be non-finite
    bad = ~np.isfinite(array)
    if bad.any():
      nans = int(np.isnan(array).sum())
      raise ConversionRefused(
          f"The checkpoint's tensor {name!r} {tuple(array.shape)} holds {nans} NaN and "
          f"{int(bad.sum()) - nans} infinite of {array.size} values (the first tensor that is "
          "not finite); nothing was converted. Use a checkpoint from before the run diverged.")


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:   # conv (out, in, kh, kw) -> (kh, kw, in, out)
    return np.transpose(array, (2, 3, 1, 0))
  if leaf == "kernel" and array.ndim == 2:   # linear (out, in) -> (in, out)
    return array.T
  return array


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  # DataParallel / DDP wrappers prefix every key with "module.".
  return {(k[len("module."):] if k.startswith("module.") else k): np.asarray(v)
          for k, v in state_dict.items()}


def abstract_variables(model: nn.Module, in_channels: int) -> Variables:
  """Shapes and dtypes of `model.init` for (1, 32, 32, in_channels) images, computed abstractly."""
  x = jnp.zeros((1, 32, 32, in_channels), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _place_tensors(tensors: Mapping[str, np.ndarray], target: Mapping[tuple[str, ...], Any],
                   mixskd: bool) -> tuple[dict[tuple[str, ...], np.ndarray], list[str], list[str]]:
  """Puts every tensor at its flat Flax key, in the Flax layout and float32.

  Returns (filled, unexpected, mismatched): the placed arrays by flat key; the tensor names
  with no place in `target`; one line per tensor whose shape differs from its place's.
  """
  filled: dict[tuple[str, ...], np.ndarray] = {}
  unexpected, mismatched = [], []
  for name, array in tensors.items():
    if name.endswith(keymap.IGNORED_SUFFIX):
      continue
    try:
      collection, path, leaf = keymap.flax_location(name, mixskd)
    except KeyError:
      unexpected.append(name)
      continue
    flat_key = (collection,) + path + (leaf,)
    value = _to_flax_layout(array, leaf)
    if flat_key not in target:
      unexpected.append(name)
    elif value.shape != target[flat_key].shape:
      mismatched.append(f"{name}: {array.shape} -> {value.shape}, model wants "
                        f"{target[flat_key].shape} at {'/'.join(flat_key)}")
    else:
      filled[flat_key] = value.astype(np.float32)
  return filled, unexpected, mismatched


def convert_state_dict(state_dict: Mapping[str, Any], model: nn.Module, *,
                       discriminator_key: jax.Array | None = None) -> Variables:
  """Maps a PyTorch state dict onto `model`'s variables, checking every key and shape.

  Args:
    state_dict: name -> array (numpy, or anything `np.asarray` takes). For a
      MixSKD network (`models.mixskd_resnet`), the official MixSKD keys (`backbone.*`, `auxiliary_classifier.*`,
      `final_aux_classifier.*`, optionally `discriminators.{k}.{0,2}.*`); for a plain
      `ResNet`, the backbone keys without the `backbone.` prefix (torchvision layout).
    model: the Flax module to fill, e.g. `build_model("cifar_resnet18", 100)`.
    discriminator_key: official checkpoints do not hold the discriminators (the reference
      keeps them outside its modules). When they are absent, they are initialized from
      this key, as the reference creates fresh random ones; None makes them an error.

  Returns:
    {'params': ..., 'batch_stats': ...} as float32 jax arrays.

  Raises:
    ConversionRefused: a tensor holds NaN or infinite values (`check_finite`).
    ValueError: listing unexpected keys, shape mismatches and unfilled variables.
  """
  check_finite(state_dict)
  tensors = _strip_prefix(state_dict)
  mixskd = isinstance(model, MixSKDNetwork)
  stem_key = "backbone.conv1.weight" if mixskd else "conv1.weight"
  if stem_key not in tensors:
    raise ValueError(f"The state dict has no {stem_key!r}: it is not a checkpoint of this model "
                     f"({type(model).__name__}). First keys: {sorted(tensors)[:5]}")
  target = traverse_util.flatten_dict(abstract_variables(model, tensors[stem_key].shape[1]))
  filled, unexpected, mismatched = _place_tensors(tensors, target, mixskd)
  missing = [k for k in target if k not in filled]
  if mixskd and discriminator_key is not None and missing and all(
      k[:2] == ("params", "discriminators") for k in missing):
    filled.update(_fresh_discriminators(model, target, discriminator_key))
    missing = []
  if unexpected or mismatched or missing:
    raise ValueError(
        "The state dict does not match the model:\n"
        + (f"  keys with no place in the model: {unexpected}\n" if unexpected else "")
        + (f"  shape mismatches: {mismatched}\n" if mismatched else "")
        + (f"  model variables not in the state dict: {['/'.join(k) for k in missing]}\n"
           if missing else "")
        + "Check the model name, num_classes and that the file is a MixSKD checkpoint.")
  return jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(filled))


def _fresh_discriminators(model: MixSKDNetwork, target: Mapping, key: jax.Array) -> dict:
  # Each discriminator's first layer reads one head's pooled features: (channels, hidden).
  first_layers = sorted((k for k in target if k[:2] == ("params", "discriminators")
                         and k[-2:] == ("fc1", "kernel")), key=lambda k: int(k[2][len("disc"):]))
  channels = [target[k].shape[0] for k in first_layers]
  pooled = [jnp.zeros((1, c), jnp.float32) for c in channels]
  params = FeatureDiscriminators(model.discriminator_hidden).init(key, pooled)["params"]
  flat = traverse_util.flatten_dict(params)
  return {("params", "discriminators") + k: np.asarray(v) for k, v in flat.items()}


def export_backbone(variables: Mapping[str, Any]) -> Variables:
  """The plain backbone of a MixSKD model's variables (no branches, self-teacher, discriminators).

  The result is exactly the variables of `build_model(name, num_classes, mixskd=False)`,
  the network used for inference and transfer (`mixskd_jax.backbone_variables`).
  """
  return backbone_variables(variables)
