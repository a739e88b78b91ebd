"""Official PyTorch parameter names <-> our Flax variable paths (spec §10).

A MixSKD state dict holds `backbone.*`, `auxiliary_classifier.block_extractor{k}.{j}.{b}.*`,
`auxiliary_classifier.fc{k}.*` and `final_aux_classifier.*`. A plain backbone (ours exported,
or torchvision's ResNet) has the backbone keys without the `backbone.` prefix. The
discriminators are not in official checkpoints; we name them `discriminators.{k}.{0,2}.*`
after the `nn.Sequential(Linear, ReLU, Linear)` they are in PyTorch.

`flax_location` reads a torch name (the importer); `torch_key` writes one (the exporter) and is
checked against `flax_location`, so the two directions cannot drift apart.
"""

from __future__ import annotations

import re

Path = tuple[str, ...]

# (torch parameter name) -> (flax collection, leaf name)
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
IGNORED_SUFFIX = "num_batches_tracked"  # no Flax counterpart; the step count is not needed


def _module_path(torch_module: str, mixskd: bool) -> Path:
  """Dotted torch module name (no parameter name) -> tuple of Flax module names."""
  parts = torch_module.split(".")
  if mixskd:
    head, rest = parts[0], parts[1:]
    if head == "backbone":
      return ("backbone",) + _backbone_path(rest)
    if head == "auxiliary_classifier":
      m = re.fullmatch(r"block_extractor(\d+)", rest[0])
      if m:
        branch = f"branches_{int(m.group(1)) - 1}"
        return (branch, f"stage{rest[1]}", f"block{rest[2]}") + _block_path(rest[3:])
      m = re.fullmatch(r"fc(\d+)", rest[0])
      if m and len(rest) == 1:
        return (f"branches_{int(m.group(1)) - 1}", "fc")
    if head == "final_aux_classifier" and rest in (["conv"], ["fc"]):
      return ("self_teacher", rest[0])
    if head == "discriminators" and len(rest) == 2 and rest[1] in ("0", "2"):
      return ("discriminators", f"disc{rest[0]}", "fc1" if rest[1] == "0" else "fc2")
    raise KeyError(torch_module)
  return _backbone_path(parts)


def _backbone_path(parts: list[str]) -> Path:
  if parts in (["conv1"], ["bn1"]):
    return ("stem", parts[0])
  if parts == ["fc"]:
    return ("fc",)
  m = re.fullmatch(r"layer(\d+)", parts[0])
  if m and len(parts) >= 3:
    return (parts[0], f"block{parts[1]}") + _block_path(parts[2:])
  raise KeyError(".".join(parts))


def _block_path(parts: list[str]) -> Path:
  if len(parts) == 1 and re.fullmatch(r"(conv|bn)\d", parts[0]):
    return (parts[0],)
  if len(parts) == 2 and parts[0] == "downsample" and parts[1] in ("0", "1"):
    return ("downsample_conv" if parts[1] == "0" else "downsample_bn",)
  raise KeyError(".".join(parts))


def flax_location(torch_key: str, mixskd: bool) -> tuple[str, Path, str]:
  """Where a torch tensor goes: (collection, module path, leaf name).

  Raises:
    KeyError: for a name that has no place in our model.
  """
  module, _, leaf = torch_key.rpartition(".")
  path = _module_path(module, mixskd)
  last = path[-1]
  if last.startswith("bn") or last == "downsample_bn":
    if leaf not in _BN_LEAVES:
      raise KeyError(torch_key)
    collection, name = _BN_LEAVES[leaf]
    return collection, path, name
  if leaf == "weight":
    return "params", path, "kernel"
  if leaf == "bias":
    return "params", path, "bias"
  raise KeyError(torch_key)


_BN_TORCH_LEAVES = {flax: torch for torch, flax in _BN_LEAVES.items()}


def _torch_module(path: Path, mixskd: bool) -> str:
  """Tuple of Flax module names -> dotted torch module name (the inverse of `_module_path`)."""
  if not mixskd:
    return _torch_backbone_module(path)
  head, rest = path[0], path[1:]
  if head == "backbone":
    return "backbone." + _torch_backbone_module(rest)
  m = re.fullmatch(r"branches_(\d+)", head)
  if m:
    k = int(m.group(1)) + 1
    if rest == ("fc",):
      return f"auxiliary_classifier.fc{k}"
    stage = re.fullmatch(r"stage(\d+)", rest[0]) if rest else None
    block = re.fullmatch(r"block(\d+)", rest[1]) if len(rest) > 1 else None
    if stage and block:
      return (f"auxiliary_classifier.block_extractor{k}.{stage.group(1)}.{block.group(1)}."
              + _torch_block_module(rest[2:]))
  if head == "self_teacher" and rest in (("conv",), ("fc",)):
    return f"final_aux_classifier.{rest[0]}"
  m = re.fullmatch(r"disc(\d+)", rest[0]) if head == "discriminators" and len(rest) == 2 else None
  if m and rest[1] in ("fc1", "fc2"):
    return f"discriminators.{m.group(1)}.{0 if rest[1] == 'fc1' else 2}"
  raise KeyError("/".join(path))


def _torch_backbone_module(path: Path) -> str:
  if len(path) == 2 and path[0] == "stem" and path[1] in ("conv1", "bn1"):
    return path[1]
  if path == ("fc",):
    return "fc"
  layer = re.fullmatch(r"layer\d+", path[0]) if path else None
  block = re.fullmatch(r"block(\d+)", path[1]) if len(path) > 1 else None
  if layer and block:
    return f"{path[0]}.{block.group(1)}." + _torch_block_module(path[2:])
  raise KeyError("/".join(path))


def _torch_block_module(path: Path) -> str:
  if len(path) == 1 and re.fullmatch(r"(conv|bn)\d", path[0]):
    return path[0]
  if path in (("downsample_conv",), ("downsample_bn",)):
    return "downsample.0" if path[0] == "downsample_conv" else "downsample.1"
  raise KeyError("/".join(path))


def torch_key(collection: str, path: Path, leaf: str, mixskd: bool) -> str:
  """The torch name of one Flax variable: the exact inverse of `flax_location`.

  Args:
    collection: "params" or "batch_stats".
    path: module names, e.g. ("layer1", "block0", "bn1").
    leaf: "kernel", "bias", "scale", "mean" or "var".
    mixskd: the variable belongs to a whole MixSKD network (official `backbone.*` prefixes).

  Raises:
    KeyError: for a variable that has no torch name (not a ResNet part we know).
  """
  module = _torch_module(tuple(path), mixskd)
  if path[-1].startswith("bn") or path[-1] == "downsample_bn":
    name = _BN_TORCH_LEAVES.get((collection, leaf))
  else:
    name = {"kernel": "weight", "bias": "bias"}.get(leaf) if collection == "params" else None
  if name is None:
    raise KeyError("/".join((collection,) + tuple(path) + (leaf,)))
  key = f"{module}.{name}"
  # Guarantees the exact inverse: a name the importer would place elsewhere is no name at all.
  if flax_location(key, mixskd) != (collection, tuple(path), leaf):
    raise KeyError("/".join((collection,) + tuple(path) + (leaf,)))
  return key


# PyTorch registers a ResNet's submodules in this order (torchvision's and the official
# code's `__init__`s), and a state dict lists them so; sorting by it reproduces that order.
_REGISTRATION = {name: rank for rank, name in enumerate((
    "backbone", "auxiliary_classifier", "final_aux_classifier", "discriminators",
    "conv", "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample",
    "layer1", "layer2", "layer3", "layer4", "layer5", "fc",
    "weight", "bias", "running_mean", "running_var", IGNORED_SUFFIX))}


def registration_order(key: str) -> tuple[int, ...]:
  """Sort key giving PyTorch's state dict order: `sorted(keys, key=registration_order)`."""
  ranks = []
  for part in key.split("."):
    m = re.fullmatch(r"(block_extractor|fc)(\d+)", part)
    if part.isdigit():
      ranks.append(int(part))
    elif m and part not in _REGISTRATION:  # auxiliary_classifier: block_extractor1, fc1, ...
      ranks.append(100 + 2 * int(m.group(2)) + (m.group(1) == "fc"))
    else:
      ranks.append(_REGISTRATION[part])
  return tuple(ranks)
