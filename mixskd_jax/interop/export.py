"""Export a trained ResNet's Flax variables as a PyTorch state dict (the inverse of the importer).

`torch_state_dict` is pure (variables -> ordered dict of numpy arrays in torch layout);
`save_safetensors` / `save_pt` write it without pickled code. The ImageNet ResNet-50 exports
to exactly `torchvision.models.resnet50()`'s keys; the CIFAR ResNets to the official
Self-KD-Lib layout (plain backbone keys, or the whole MixSKD network with `backbone.*`,
`auxiliary_classifier.*`, `final_aux_classifier.*`). `python -m mixskd_jax.interop export-torch`
is the command.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from mixskd_jax.interop import keymap
from mixskd_jax.interop.convert import ConversionRefused, abstract_variables, export_backbone
from mixskd_jax.models.registry import RESNETS, SPECS, build_model

LAYOUTS = ("auto", "torchvision", "official")
FORMATS = ("safetensors", "pt")
# Our models whose plain backbone has exactly a torchvision model's keys, shapes and numerics.
TORCHVISION_MODELS = {"imagenet_resnet50": "resnet50"}


class ExportRefused(ConversionRefused):
  """The exporter refuses its input before writing anything; the message is one line that
  names the problem and the fix (`python -m mixskd_jax.interop export-torch` exits with 2)."""


def _is_mixskd(variables: Mapping[str, Any]) -> bool:
  # A MixSKD network nests the plain backbone under "backbone"; a plain ResNet starts at "stem".
  return "backbone" in variables["params"]


def check_exportable(model_name: str) -> None:
  """Refuses a model that has no PyTorch layout (ConvNeXt, ViT, a name not registered)."""
  if model_name not in RESNETS:
    kind = type(SPECS[model_name]).__name__ if model_name in SPECS else "unknown model"
    raise ExportRefused(f"{model_name!r} ({kind}) has no PyTorch layout: export-torch writes "
                        f"our ResNets only ({', '.join(RESNETS)}); load other models in JAX "
                        "with mixskd_jax.interop.pretrained.load_trained.")


def resolve_layout(model_name: str, layout: str, *, whole_mixskd: bool) -> str:
  """"auto" -> "torchvision" for a model torchvision has (`TORCHVISION_MODELS`), else
  "official"; refuses a layout the model cannot have.

  Raises:
    ExportRefused: a model with no torch layout, an unknown layout, a CIFAR model asked for
      in torchvision's layout, or the whole MixSKD network in torchvision's (torchvision has
      no auxiliary branches).
  """
  check_exportable(model_name)
  if layout not in LAYOUTS:
    raise ExportRefused(f"--layout {layout!r}: must be one of {', '.join(LAYOUTS)}.")
  if layout == "auto":
    return "torchvision" if model_name in TORCHVISION_MODELS and not whole_mixskd else "official"
  if layout == "torchvision" and whole_mixskd:
    raise ExportRefused("--layout torchvision --whole_mixskd: torchvision has no MixSKD "
                        "branches; use --layout official for the whole network, or drop "
                        "--whole_mixskd to export the backbone.")
  if layout == "torchvision" and model_name not in TORCHVISION_MODELS:
    raise ExportRefused(f"--layout torchvision: {model_name} has a CIFAR stem (3x3 conv, no "
                        "max-pool) that no torchvision ResNet has; use --layout official "
                        f"(torchvision layout: {', '.join(sorted(TORCHVISION_MODELS))}).")
  return layout


def to_torch_layout(array: Any, leaf: str) -> np.ndarray:
  """One Flax leaf as PyTorch stores it, float32 and C-contiguous.

  conv kernel (kh, kw, in, out) -> (out, in, kh, kw); Dense kernel (in, out) -> (out, in);
  biases, BN scale/bias/mean/var (C,) unchanged.
  """
  array = np.asarray(array, np.float32)
  if leaf == "kernel" and array.ndim == 4:
    array = np.transpose(array, (3, 2, 0, 1))
  elif leaf == "kernel" and array.ndim == 2:
    array = array.T
  return np.ascontiguousarray(array)


def _check_architecture(variables: Mapping[str, Any], model_name: str, mixskd: bool) -> int:
  """Returns num_classes; refuses variables whose shapes are not `model_name`'s, so that the
  file's metadata cannot name the wrong model. Discriminators are not compared (their hidden
  width is a training choice and they are not part of the official layout)."""
  head = variables["params"]["backbone"]["fc"] if mixskd else variables["params"]["fc"]
  stem = (variables["params"]["backbone"] if mixskd else variables["params"])["stem"]["conv1"]
  num_classes = int(np.shape(head["kernel"])[-1])
  model = build_model(model_name, num_classes, mixskd=mixskd)
  expected = traverse_util.flatten_dict(
      abstract_variables(model, int(np.shape(stem["kernel"])[2])))
  actual = traverse_util.flatten_dict(variables)
  compared = lambda keys: {k for k in keys if "discriminators" not in k}
  for key in sorted(compared(expected) ^ compared(actual)):
    raise ExportRefused(f"The variables are not those of {model_name}: "
                        f"{'/'.join(key)} is {'missing' if key in expected else 'extra'}; "
                        "check the model name that --from's config.json or model.json gives.")
  for key in sorted(compared(expected)):
    if tuple(np.shape(actual[key])) != tuple(expected[key].shape):
      raise ExportRefused(f"The variables are not those of {model_name} ({num_classes} "
                          f"classes): {'/'.join(key)} is {tuple(np.shape(actual[key]))}, "
                          f"{model_name} has {tuple(expected[key].shape)}; check the model name.")
  return num_classes


def torch_state_dict(variables: Mapping[str, Any], model_name: str, *, layout: str = "auto",
                     head: bool = True, whole_mixskd: bool = False,
                     discriminators: bool = False) -> dict[str, np.ndarray]:
  """Flax variables of one of our ResNets -> a PyTorch state dict, in PyTorch's key order.

  The exact inverse of `convert.convert_state_dict` + `keymap`:
  `convert_state_dict(torch_state_dict(v, name), model)` gives `v` back bit for bit.

  Args:
    variables: {'params', 'batch_stats'} of `build_model(model_name, C, mixskd=...)`, either
      the plain backbone or a MixSKD network (its `backbone` sub-tree is exported unless
      `whole_mixskd`).
    model_name: one of `registry.RESNETS`.
    layout: "torchvision" (ImageNet ResNet-50: exactly `torchvision.models.resnet50()`'s
      keys), "official" (Self-KD-Lib keys; for a plain backbone the same names), or "auto".
    head: keep the classifier `fc` (drop it for detection/segmentation backbones).
    whole_mixskd: export the whole MixSKD network in the official layout (`backbone.*`,
      `auxiliary_classifier.*`, `final_aux_classifier.*`), what `convert_state_dict` reads.
    discriminators: with `whole_mixskd`, add `discriminators.{k}.{0,2}.*` (the official
      model has none, so a strict load into it would refuse them).

  Returns:
    name -> float32 array (conv (out, in, kh, kw), linear (out, in)), plus
    `<bn>.num_batches_tracked` int64 scalars 0 so that `load_state_dict(strict=True)` takes it.

  Raises:
    ExportRefused: a model with no torch layout, a layout it cannot have, or variables that
      are not `model_name`'s.
  """
  check_exportable(model_name)
  mixskd = _is_mixskd(variables)
  if whole_mixskd and not mixskd:
    raise ExportRefused("--whole_mixskd: the checkpoint holds a plain backbone, not a MixSKD "
                        "network (no branches or self-teacher); drop --whole_mixskd.")
  if whole_mixskd and not head:
    raise ExportRefused("--no_head --whole_mixskd: the whole network's heads are part of it; "
                        "use --no_head for the backbone alone, or drop it.")
  resolve_layout(model_name, layout, whole_mixskd=whole_mixskd)
  if mixskd and not whole_mixskd:
    variables, mixskd = export_backbone(variables), False
  _check_architecture(variables, model_name, mixskd)
  state: dict[str, np.ndarray] = {}
  for (collection, *path, leaf), value in traverse_util.flatten_dict(variables).items():
    path = tuple(path)
    if (path[0] == "discriminators" and not discriminators) or (path[0] == "fc" and not head):
      continue
    state[keymap.torch_key(collection, path, leaf, mixskd)] = to_torch_layout(value, leaf)
    if collection == "batch_stats" and leaf == "mean":
      # PyTorch's BatchNorm counts its training batches; 0 = "not counted" (only used when
      # momentum=None, which neither torchvision nor the official models use).
      bn = keymap.torch_key(collection, path, leaf, mixskd).rpartition(".")[0]
      state[f"{bn}.{keymap.IGNORED_SUFFIX}"] = np.zeros((), np.int64)
  return {k: state[k] for k in sorted(state, key=keymap.registration_order)}


def metadata(*, model_name: str, num_classes: int, layout: str, source: str, head: bool,
             whole_mixskd: bool) -> dict[str, str]:
  """The safetensors header's metadata: strings only (the format allows nothing else).
  "format": "pt" is the convention of Hugging Face's loaders for files holding torch tensors."""
  return {"format": "pt", "model": model_name, "num_classes": str(num_classes),
          "layout": layout, "source": source, "head": str(head).lower(),
          "network": "mixskd" if whole_mixskd else "backbone",
          "torchvision_model": TORCHVISION_MODELS.get(model_name, "") if layout == "torchvision"
                               else ""}


def _write_new(path: str, write) -> str:
  """Creates `path` (never overwriting; mode "xb" makes the check and the creation one step)
  and lets `write(file)` fill it; a failed write leaves no partial file."""
  path = os.path.abspath(path)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "xb")
  except FileExistsError as e:
    raise ExportRefused(f"--output {path} already exists; choose another file or delete it "
                        "first (it is never overwritten).") from e
  except OSError as e:
    raise ExportRefused(f"--output {path} cannot be created ({e.strerror}); choose a "
                        "writable place.") from e
  try:
    with f:
      write(f)
  except BaseException:
    os.remove(path)
    raise
  return path


def save_safetensors(path: str, state: Mapping[str, np.ndarray],
                     meta: Mapping[str, str] | None = None) -> str:
  """Writes `state` as a safetensors file (no pickle, no torch needed); returns the path.
  Read it with `safetensors.torch.load_file(path)` (tensors) or `safetensors.numpy.load_file`."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  data = save(dict(state), metadata=dict(meta) if meta else None)
  return _write_new(path, lambda f: f.write(data))


def save_pt(path: str, state: Mapping[str, np.ndarray]) -> str:
  """Writes `torch.save` of a plain dict of tensors (loads with `torch.load(path,
  weights_only=True)`; what mmdetection's `init_cfg=dict(type='Pretrained')` reads)."""
  torch = import_torch_for_pt()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  return _write_new(path, lambda f: torch.save(tensors, f))


def import_torch_for_pt():
  """PyTorch, or an ImportError that says which format needs no PyTorch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("--format pt needs PyTorch (the CPU build is enough): `pip install "
                      "torch`; or use --format safetensors, which needs none.") from e
  return torch


def save(path: str, state: Mapping[str, np.ndarray], *, fmt: str,
         meta: Mapping[str, str] | None = None) -> str:
  """Writes `state` in `fmt` ("safetensors" with `meta` in its header, or "pt")."""
  if fmt == "safetensors":
    return save_safetensors(path, state, meta)
  if fmt == "pt":
    return save_pt(path, state)
  raise ExportRefused(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}.")
