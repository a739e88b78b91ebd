"""Reading PyTorch/numpy weight files safely, and saving/loading converted models with Orbax."""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from mixskd_jax.models.registry import build_model

METADATA_FILE = "model.json"
VARIABLES_DIR = "variables"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads the state dict of an official `.pth(.tar)` checkpoint or of an `.npz` file.

  `.pth` files are pickles; they are read with `torch.load(weights_only=True)`, which only
  rebuilds tensors and plain containers and never runs code from the file. The official
  files hold `{'net': state_dict, 'acc': ..., 'epoch': ..., 'optimizer': ...}`; a bare state
  dict or `{'state_dict': ...}` is accepted too.

  Args:
    path: a `.pth`, `.pth.tar`, `.pt` or `.npz` file.

  Returns:
    name -> numpy array.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Reading PyTorch checkpoints needs PyTorch (the CPU build is enough): "
                      "`pip install torch`. Or save the state dict as .npz and pass that.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path!r} holds objects other than tensors and plain containers; it is "
                     "refused because loading it could execute code. Re-save its state dict "
                     "with torch.save(model.state_dict(), ...).") from e
  if isinstance(obj, Mapping):
    for wrapper in ("net", "state_dict", "model"):
      if wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} does not hold a state dict (found {type(obj).__name__}).")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def save_converted(directory: str, variables: Mapping[str, Any], *, model_name: str,
                   num_classes: int, mixskd: bool, source: str = "") -> str:
  """Saves variables with Orbax plus a `model.json` that says how to rebuild the model.

  Returns:
    The absolute directory written. An existing directory is never overwritten.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise FileExistsError(f"{directory!r} already holds a converted checkpoint; choose another "
                          "--output or delete it first.")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), dict(variables))
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump({"model": model_name, "num_classes": num_classes, "mixskd": mixskd,
               "source": source}, f, indent=2)
  return directory


def load_converted(directory: str) -> tuple[nn.Module, dict[str, Any]]:
  """Loads what `save_converted` (or `python -m mixskd_jax.interop.convert`) wrote.

  Returns:
    (model, variables): `model.apply(variables, images, train=False)` runs it.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{directory!r} has no {METADATA_FILE}; it is not a converted "
                            "checkpoint directory.")
  with open(meta_path) as f:
    meta = json.load(f)
  model = build_model(meta["model"], meta["num_classes"], mixskd=meta["mixskd"])
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR))
  return model, variables
