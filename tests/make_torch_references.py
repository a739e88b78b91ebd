"""Stores outputs of the PyTorch reference (tests/torch_reference.py) once, for checks without torch.

The live comparisons with PyTorch (tests/test_interop.py, the `*_matches_torch` tests of
tests/test_models.py, ...) need torch and belong to the slow tier. This script runs the same
reference on small fixed inputs and writes `tests/data/torch_references.npz`, which
tests/test_torch_references.py compares our JAX port with, in the default tier, without
importing torch:

- `objective/*`: one train-mode MixSKD step of the CIFAR ResNet-18 (100 classes) with its four
  discriminators, on 4 fixed 16x16 images, lam = 0.3 and a fixed permutation: the 4 heads'
  logits and features, every loss term, `loss_cifar` / `loss_imagenet` and every BatchNorm
  running statistic after the step. Its ~42 M parameters are too big to store, so they are not
  drawn by torch: `synthetic_state_dict` computes them from the key names and shapes with an
  integer hash (bit-identical on every machine and numpy version); only the key list is stored.
- `basic/*`, `bottleneck/*`: a stride-2 BasicBlock(16 -> 32) and Bottleneck(32 -> 16 x 4) on a
  17x17 input (odd size: guards the symmetric padding), eval mode, train mode and the updated
  running statistics; parameters stored.
- `stem/*`: the ImageNet stem (7x7/2 pad-3 conv, BN, ReLU, 3x3/2 pad-1 max-pool) on a 33x33
  input, same three outputs; parameters stored. `maxpool/*`: its max-pool alone on negative
  inputs (guards the -inf padding, which the stem's ReLU hides).

All arrays are NCHW / OIHW as PyTorch has them; the test transposes.

Regenerate (needs torch; see requirements-dev.txt), from the repository root:

    python3 -m tests.make_torch_references            # writes tests/data/torch_references.npz

then run `python3 -m pytest -q tests/test_torch_references.py` and commit the .npz. Regenerate
only when the reference itself (tests/torch_reference.py) or the stored cases change: the file
pins what PyTorch computed, so a change to mixskd_jax must never be "fixed" by regenerating.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from typing import Dict, List, Tuple

import numpy as np

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torch_references.npz")

# The objective case (same lam / permutation as tests/test_interop.py's official_r18).
OBJ_CLASSES = 100
OBJ_LABELS = (3, 97, 3, 41)
OBJ_PERM = (2, 0, 3, 1)
OBJ_LAM = 0.3
OBJ_HW = 16
OBJ_T = 3.0
REF_SCALARS = ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
               "feature_mse", "discriminator", "loss_cifar", "loss_imagenet")
_MASK64 = (1 << 64) - 1


def _uniform01(name: str, size: int) -> np.ndarray:
  """`size` float64 values in [0, 1) from splitmix64 of (crc32(name), index): exact everywhere."""
  seed = np.uint64((zlib.crc32(name.encode()) * 0x9E3779B97F4A7C15) & _MASK64)
  with np.errstate(over="ignore"):
    z = np.arange(1, size + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + seed
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def synthetic_state_dict(shapes: List[Tuple[str, Tuple[int, ...]]]) -> Dict[str, np.ndarray]:
  """Deterministic float32 values for state-dict keys, scaled like a trained network's.

  Conv / Linear weights U(+-sqrt(3 / fan_in)) (unit-variance outputs), biases U(+-0.1),
  BatchNorm scale U(0.5, 1.5), shift U(+-0.25), running mean U(+-0.1), running var U(0.5, 1.5),
  num_batches_tracked 0.
  """
  out = {}
  for name, shape in shapes:
    shape = tuple(int(s) for s in shape)
    if name.endswith("num_batches_tracked"):
      out[name] = np.zeros(shape, np.int64)
      continue
    u = _uniform01(name, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
      fan_in = int(np.prod(shape[1:]))
      v = (2.0 * u - 1.0) * np.sqrt(3.0 / fan_in)
    elif leaf == "weight":  # BatchNorm scale
      v = 0.5 + u
    elif leaf == "running_var":
      v = 0.5 + u
    elif leaf == "running_mean":
      v = 0.2 * u - 0.1
    elif leaf == "bias" and (".bn" in name or ".downsample.1." in name):  # BatchNorm shift
      v = 0.5 * u - 0.25
    else:  # Linear bias
      v = 0.2 * u - 0.1
    out[name] = v.astype(np.float32)
  return out


def _module_case(prefix: str, module, x: np.ndarray, torch) -> Dict[str, np.ndarray]:
  """Parameters, eval output, train output and updated running statistics of `module`."""
  out = {f"{prefix}/x": x}
  for name, value in module.state_dict().items():
    if not name.endswith("num_batches_tracked"):
      out[f"{prefix}/param/{name}"] = value.detach().numpy().copy()
  xt = torch.from_numpy(x)
  with torch.no_grad():
    module.eval()
    out[f"{prefix}/eval"] = module(xt).numpy()
    module.train()
    out[f"{prefix}/train"] = module(xt).numpy()
  for name, value in module.state_dict().items():
    if name.endswith("running_mean") or name.endswith("running_var"):
      out[f"{prefix}/stats/{name}"] = value.numpy().copy()
  return out


def _objective_case(R, torch) -> Dict[str, np.ndarray]:
  net = R.build_cifar_mixskd(18, OBJ_CLASSES)
  discs = R.make_discriminators(512)
  shapes = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
  shapes += [(f"discriminators.{i}.{k}", tuple(v.shape))
             for i, d in enumerate(discs) for k, v in d.state_dict().items()]
  sd = synthetic_state_dict(shapes)
  net.load_state_dict({k: torch.from_numpy(sd[k]) for k in net.state_dict()}, strict=True)
  for i, d in enumerate(discs):
    d.load_state_dict({k: torch.from_numpy(sd[f"discriminators.{i}.{k}"])
                       for k in d.state_dict()}, strict=True)
  x = (2.0 * _uniform01("objective/x", 4 * 3 * OBJ_HW * OBJ_HW) - 1.0) * np.sqrt(3.0)
  x = x.reshape(4, 3, OBJ_HW, OBJ_HW).astype(np.float32)
  y = torch.tensor(OBJ_LABELS)
  perm = torch.tensor(OBJ_PERM)
  ref = R.reference_terms(net, discs, torch.from_numpy(x), y, OBJ_LAM, perm, T=OBJ_T)
  out = {
      "objective/keys": np.asarray(json.dumps(shapes)),
      "objective/x": x,
      "objective/labels": np.asarray(OBJ_LABELS, np.int32),
      "objective/perm": np.asarray(OBJ_PERM, np.int32),
      "objective/lam": np.asarray(OBJ_LAM, np.float32),
  }
  for k in range(4):
    out[f"objective/logits{k}"] = ref["logits"][k].detach().numpy()
    out[f"objective/features{k}"] = ref["features"][k].detach().numpy()
  for name in REF_SCALARS:
    out[f"objective/term/{name}"] = np.asarray(ref[name].item(), np.float64)
  for name, value in net.state_dict().items():
    if name.endswith("running_mean") or name.endswith("running_var"):
      out[f"objective/stats/{name}"] = value.numpy().copy()
  return out


def build() -> Dict[str, np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel
  from tests import torch_reference as R  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(2)
  torch.manual_seed(0)
  out = {"meta/torch_version": np.asarray(torch.__version__)}
  out.update(_objective_case(R, torch))

  gen = torch.Generator().manual_seed(17)
  rng = np.random.default_rng(17)
  basic = R.BasicBlock(16, 32, stride=2)
  R.randomize_batchnorm(basic, gen)
  out.update(_module_case("basic", basic,
                          rng.standard_normal((2, 16, 17, 17)).astype(np.float32), torch))
  bottleneck = R.Bottleneck(32, 16, stride=2)
  R.randomize_batchnorm(bottleneck, gen)
  out.update(_module_case("bottleneck", bottleneck,
                          rng.standard_normal((2, 32, 17, 17)).astype(np.float32), torch))

  conv = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
  bn = torch.nn.BatchNorm2d(64)
  stem = torch.nn.Sequential(conv, bn, torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
  R.randomize_batchnorm(stem, gen)
  out.update(_module_case("stem", stem,
                          rng.standard_normal((2, 3, 33, 33)).astype(np.float32), torch))
  # The max-pool alone on negative inputs: its padding must be -inf, never a winner.
  pool_x = (-np.abs(rng.standard_normal((2, 3, 9, 9))) - 1.0).astype(np.float32)
  out["maxpool/x"] = pool_x
  out["maxpool/out"] = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(pool_x)).numpy()
  return out


def main(argv=None) -> int:
  path = (argv or sys.argv[1:] or [PATH])[0]
  arrays = build()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, **arrays)
  print(f"wrote {path}: {len(arrays)} arrays, {os.path.getsize(path) / 1024:.0f} KiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
