"""Official PyTorch parameter names -> our Flax variable paths (spec §10).

A MixSKD state dict holds `backbone.*`, `auxiliary_classifier.block_extractor{k}.{j}.{b}.*`,
`auxiliary_classifier.fc{k}.*` and `final_aux_classifier.*`. A plain backbone (ours exported,
or torchvision's ResNet) has the backbone keys without the `backbone.` prefix. The
discriminators are not in official checkpoints; we name them `discriminators.{k}.{0,2}.*`
after the `nn.Sequential(Linear, ReLU, Linear)` they are in PyTorch.
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
