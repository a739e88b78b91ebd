"""The exporter: our Flax ResNets -> PyTorch state dicts (safetensors / .pt), the exact inverse of
the importer, loadable with strict=True into torchvision's ResNet-50 and into the independent
PyTorch reference model (tests/torch_reference.py), and the `export-torch` command."""

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mixskd_jax.interop import ExportRefused, convert_state_dict, export_backbone
from mixskd_jax.interop import __main__ as cli
from mixskd_jax.interop.export import save_pt, save_safetensors, torch_state_dict
from mixskd_jax.models.registry import RESNETS, build_model
from mixskd_jax.store.checkpoint import Checkpoints
from mixskd_jax.train.state import TrainState

# Eval-mode logits on the same weights and images differ only by float32 rounding (the two
# frameworks sum the convolutions in different orders): |ours - theirs| <= TOL * max|theirs|
# (rtol=0). Measured on 3 seeds: ResNet-50 (64x64, logits up to ~17) max|diff| 1.3e-5..2.1e-5,
# i.e. 0.8e-6..1.5e-6 of the largest logit; CIFAR ResNet-18 (32x32, logits up to ~5) 2.2e-6..3.3e-6,
# i.e. 4.7e-7..6.4e-7. (In float64 on both sides the ResNet-50's logits agree to 3e-14 of their
# largest: the mapping itself is exact.)
TOL = 1e-5


def assert_logits_close(ours, theirs):
  theirs = np.asarray(theirs)
  assert 0.5 < np.abs(theirs).max() < 100  # a real output, neither vanished nor exploded
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL * np.abs(theirs).max())


def random_variables(model, seed, size=32):
  """Variables with the model's shapes, random but well scaled: He-scaled kernels, and BN
  scales, biases, running means and variances far from their identity initialization (so a
  swapped mean/var, a dropped leaf or a transposition error changes every output)."""
  rng = np.random.default_rng(seed)
  def leaf(path, shape):
    names = [p.key for p in path]
    if names[-1] == "kernel":
      fan_in = int(np.prod(shape.shape[:-1]))
      return rng.normal(0, np.sqrt(2 / fan_in), shape.shape).astype(np.float32)
    if names[-1] in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape.shape).astype(np.float32)
    return rng.normal(0, 0.2, shape.shape).astype(np.float32)  # biases, running means
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, size, size, 3))))
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def damped_residuals(variables, seed):
  """`variables` with each residual block's last BN scale in U(0.05, 0.25) (torchvision's
  zero_init_residual, but not zero): with random running statistics a block's output is not
  renormalized, and undamped residuals grow the activations ~10x per stage (logits ~8000 for
  the ResNet-50); damped they stay below ~20, while every layer still moves the logits by far
  more than the tolerance."""
  flat = dict(traverse_util.flatten_dict(variables))
  last = {}
  for key in flat:
    if key[0] == "params" and key[-1] == "scale" and key[-3].startswith("block"):
      last[key[:-2]] = max(last.get(key[:-2], key[-2]), key[-2])
  rng = np.random.default_rng(seed)
  for block, bn in last.items():
    flat[block + (bn, "scale")] = rng.uniform(0.05, 0.25, flat[block + (bn, "scale")].shape
                                              ).astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def assert_bit_identical(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(flat_a) == set(flat_b)
  for key, value in flat_a.items():
    assert np.asarray(flat_b[key]).dtype == np.float32, key
    np.testing.assert_array_equal(np.asarray(flat_b[key]), value, err_msg="/".join(key))


# ---------------------------------------------------------------------------------------------
# The inverse of the importer (no PyTorch needed).


@pytest.mark.parametrize("name,mixskd,size", [
    ("cifar_resnet18", False, 32), ("cifar_resnet18", True, 32),
    ("imagenet_resnet50", False, 64), ("small_resnet", False, 32), ("small_resnet", True, 32)])
def test_round_trip_is_bit_exact(name, mixskd, size):
  """JAX -> torch layout -> JAX (the existing importer) gives every leaf back bit for bit:
  the plain backbone, and the whole MixSKD network in the official layout (discriminators
  included, under the names the importer reads)."""
  assert name in RESNETS
  model = build_model(name, 7, mixskd=mixskd)
  variables = random_variables(model, seed=len(name) + mixskd, size=size)
  state = torch_state_dict(variables, name, whole_mixskd=mixskd, discriminators=mixskd)
  assert_bit_identical(variables, convert_state_dict(state, model))
  counters = [k for k in state if k.endswith("num_batches_tracked")]
  assert counters and all(state[k].dtype == np.int64 and state[k].shape == () for k in counters)
  assert len(counters) == len(traverse_util.flatten_dict(variables["batch_stats"])) // 2


def test_backbone_of_mixskd_network_and_layouts():
  """A MixSKD network exports its backbone (= export_backbone's variables); conv and linear
  kernels are transposed to (out, in, kh, kw) and (out, in); --no_head drops exactly fc.*."""
  model = build_model("cifar_resnet18", 5, mixskd=True)
  variables = random_variables(model, seed=3)
  state = torch_state_dict(variables, "cifar_resnet18")
  backbone = export_backbone(variables)
  assert_bit_identical(backbone, convert_state_dict(
      state, build_model("cifar_resnet18", 5, mixskd=False)))
  kernel = backbone["params"]["layer2"]["block0"]["conv1"]["kernel"]  # (3, 3, 64, 128)
  assert state["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
  assert state["layer2.0.conv1.weight"][17, 5, 2, 0] == kernel[2, 0, 5, 17]
  assert state["fc.weight"].shape == (5, 512)
  np.testing.assert_array_equal(state["fc.weight"], backbone["params"]["fc"]["kernel"].T)
  headless = torch_state_dict(variables, "cifar_resnet18", head=False)
  assert set(state) - set(headless) == {"fc.weight", "fc.bias"}
  whole = torch_state_dict(variables, "cifar_resnet18", whole_mixskd=True)
  assert not any(k.startswith("discriminators.") for k in whole)  # the official model has none
  assert {k.split(".")[0] for k in whole} == {"backbone", "auxiliary_classifier",
                                              "final_aux_classifier"}


def test_refusals_name_the_problem():
  """No torch layout (ConvNeXt, ViT, unknown), a layout the model cannot have, and variables
  that are not the named model's: one line each, before anything is written."""
  small = random_variables(build_model("small_resnet", 3, mixskd=False), seed=0)
  cases = [
      (dict(model_name="small_convnext"), "small_convnext.*ConvNeXtSpec.*has no PyTorch"),
      (dict(model_name="small_vit"), "has no PyTorch layout"),
      (dict(model_name="resnet9000"), "unknown model"),
      (dict(model_name="small_resnet", layout="torchvision"), "CIFAR stem"),
      (dict(model_name="small_resnet", whole_mixskd=True), "holds a plain backbone"),
      (dict(model_name="cifar_resnet18"), "not those of cifar_resnet18"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ExportRefused, match=message) as info:
      torch_state_dict(small, **kwargs)
    assert "\n" not in str(info.value)
  mixskd = random_variables(build_model("small_resnet", 3), seed=0)
  with pytest.raises(ExportRefused, match="--no_head --whole_mixskd"):
    torch_state_dict(mixskd, "small_resnet", whole_mixskd=True, head=False)


def test_safetensors_file_and_no_overwrite(tmp_path):
  """safetensors holds the arrays bit for bit and the metadata; an existing file is refused
  and left as it was."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  state = torch_state_dict(random_variables(build_model("small_resnet", 3, mixskd=False), 1),
                           "small_resnet")
  path = save_safetensors(str(tmp_path / "sub" / "r.safetensors"), state, {"model": "x"})
  loaded = load_file(path)
  assert set(loaded) == set(state)  # safetensors stores its own order; load_state_dict ignores it
  for k, v in state.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
    np.testing.assert_array_equal(loaded[k], v)
  with safe_open(path, "np") as f:
    assert f.metadata() == {"model": "x"}
  before = open(path, "rb").read()
  with pytest.raises(ExportRefused, match="already exists"):
    save_safetensors(path, {"a": np.zeros(2, np.float32)})
  assert open(path, "rb").read() == before


def test_pt_without_torch_is_explained(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="--format pt needs PyTorch.*--format safetensors"):
    save_pt(str(tmp_path / "x.pt"), {"a": np.zeros(2, np.float32)})
  assert not os.path.exists(tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------
# The command.


def write_workdir(workdir, name, mixskd, num_classes=3):
  """A training workdir as the trainer leaves it: config.json, and a TrainState saved by
  `Checkpoints` (Orbax StandardSave + digest) at steps 1 and 2 (step 2 the newest)."""
  model = build_model(name, num_classes, mixskd=mixskd)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"model": {"name": name, "mixskd": mixskd}}, f)
  checkpoints = Checkpoints(workdir, keep=3)
  states = []
  for step in (1, 2):
    variables = random_variables(model, seed=step, size=28)
    states.append(TrainState.create(variables, optax.sgd(0.1)))
    checkpoints.save(step, states[-1])
  checkpoints.close()
  return states[-1].variables


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A small_resnet MixSKD workdir and the variables of its newest step."""
  path = str(tmp_path_factory.mktemp("export") / "run")
  return path, write_workdir(path, "small_resnet", mixskd=True)


def run_cli(argv, monkeypatch, capsys):
  """`python -m mixskd_jax.interop ARGV` in this process: (exit status, stdout, stderr)."""
  monkeypatch.setattr(sys, "argv", ["python -m mixskd_jax.interop", *argv])
  try:
    status = cli.run()
  except SystemExit as e:  # argparse's usage errors
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def test_command_exports_newest_step(workdir, tmp_path, monkeypatch, capsys):
  """`export-torch --from WORKDIR` writes the newest step's backbone (its head included) with
  its metadata; --whole_mixskd the official MixSKD layout; --no_head without fc."""
  from safetensors import safe_open
  from safetensors.numpy import load_file
  path, variables = workdir
  out = str(tmp_path / "backbone.safetensors")
  status, stdout, _ = run_cli(["export-torch", "--from", path, "--output", out],
                              monkeypatch, capsys)
  assert status == 0 and out in stdout
  expected = torch_state_dict(variables, "small_resnet")
  loaded = load_file(out)
  assert set(loaded) == set(expected) and "fc.weight" in loaded
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k], v)
  with safe_open(out, "np") as f:
    meta = f.metadata()
  assert meta["model"] == "small_resnet" and meta["num_classes"] == "3"
  assert meta["layout"] == "official" and meta["network"] == "backbone"
  assert meta["source"] == os.path.join(path, "checkpoints", "2")

  whole = str(tmp_path / "whole.safetensors")
  assert run_cli(["export-torch", "--from", os.path.join(path, "checkpoints", "2"),
                  "--output", whole, "--whole_mixskd"], monkeypatch, capsys)[0] == 0
  assert set(load_file(whole)) == set(torch_state_dict(variables, "small_resnet",
                                                       whole_mixskd=True))
  headless = str(tmp_path / "headless.safetensors")
  assert run_cli(["export-torch", "--from", path, "--output", headless, "--no_head"],
                 monkeypatch, capsys)[0] == 0
  assert set(expected) - set(load_file(headless)) == {"fc.weight", "fc.bias"}


def test_command_reads_a_converted_directory(tmp_path, monkeypatch, capsys):
  """--from a directory the import wrote (model.json + variables/): the plain backbone it
  holds, exported as it was saved."""
  from safetensors.numpy import load_file
  from mixskd_jax.interop import save_converted
  variables = random_variables(build_model("small_resnet", 4, mixskd=False), seed=9)
  converted = save_converted(str(tmp_path / "converted"), variables, model_name="small_resnet",
                             num_classes=4, mixskd=False)
  out = str(tmp_path / "r.safetensors")
  assert run_cli(["export-torch", "--from", converted, "--output", out], monkeypatch,
                 capsys)[0] == 0
  loaded = load_file(out)
  for k, v in torch_state_dict(variables, "small_resnet").items():
    np.testing.assert_array_equal(loaded[k], v)


def test_command_refusals(workdir, tmp_path, monkeypatch, capsys):
  """Missing --from, a model with no torch layout, a layout it cannot have, an existing
  output, a missing flag: exit status 2, one line on stderr, nothing written."""
  path, _ = workdir
  convnext = str(tmp_path / "convnext")
  write_workdir(convnext, "small_convnext", mixskd=False)
  existing = tmp_path / "existing.safetensors"
  existing.write_bytes(b"keep me")
  out = str(tmp_path / "out.safetensors")
  cases = [
      (["--from", str(tmp_path / "nowhere"), "--output", out], "does not exist"),
      (["--from", convnext, "--output", out], "'small_convnext' (ConvNeXtSpec) has no PyTorch"),
      (["--from", path, "--output", out, "--layout", "torchvision"], "CIFAR stem"),
      (["--from", convnext, "--output", out, "--layout", "torchvision"], "no PyTorch layout"),
      (["--from", path, "--output", str(existing)], "already exists"),
      (["--output", out], "the following arguments are required: --from"),
      (["--from", path, "--output", out, "--format", "onnx"], "invalid choice: 'onnx'"),
  ]
  for argv, message in cases:
    status, _, err = run_cli(["export-torch", *argv], monkeypatch, capsys)
    assert status == 2, argv
    assert message in err and err.count("\n") == 1, err
  assert not os.path.exists(out)
  assert existing.read_bytes() == b"keep me"


def test_import_subcommand_is_the_old_command(monkeypatch, capsys):
  """`import-torch` and no subcommand parse the same flags (the old command line)."""
  argv = ["--checkpoint", "x.pth", "--model", "cifar_resnet18", "--num_classes", "0",
          "--output", "o"]
  for prefix in ([], ["import-torch"]):
    status, _, err = run_cli(prefix + argv, monkeypatch, capsys)
    assert status == 2 and "--num_classes 0" in err


def test_documented_export_commands_parse():
  """docs/checkpoints.md's export-torch commands use flags the command has (they run in
  test_command_exports_newest_step's way; here only their flags are checked, cheaply)."""
  from tests.doc_blocks import doc_block
  lines = doc_block("docs/checkpoints.md", "export-torch").strip().splitlines()
  assert len(lines) == 3
  for line in lines:
    words = line.split()
    assert words[:4] == ["python", "-m", "mixskd_jax.interop", "export-torch"]
    args = cli.parse_export_args(words[4:])
    assert args.output.endswith({"safetensors": ".safetensors", "pt": ".pth"}[args.format])


# ---------------------------------------------------------------------------------------------
# Loading into PyTorch (the slow tier, with PyTorch installed).


def import_torchvision():
  """torchvision, or a skip where it is not installed (CI requires it: MIXSKD_REQUIRE_TORCH).

  PyPI's Linux torchvision wheel links the CUDA build of torch; next to torch+cpu (when the
  PyTorch CPU index is unreachable) its compiled ops fail to load and `import torchvision`
  then fails registering fake kernels for `nms` and `qnms`. The models used here are pure
  Python: defining those two ops' schemas (never called) lets the import finish."""
  torch = pytest.importorskip("torch")
  try:
    return importlib.import_module("torchvision")
  except ImportError:
    if os.environ.get("MIXSKD_REQUIRE_TORCH"):
      raise
    pytest.skip("torchvision is not installed (requirements-dev.txt)")
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for op in ("nms", "qnms"):
    try:
      getattr(torch.ops.torchvision, op)
    except (AttributeError, RuntimeError):
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[module]
  return importlib.import_module("torchvision")


def our_logits(name, variables, images):
  """Eval-mode logits (N, C) of the plain backbone for NHWC images."""
  model = build_model(name, variables["params"]["fc"]["kernel"].shape[-1], mixskd=False)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False).logits[0])(
      variables, images))


@pytest.mark.slow
def test_resnet50_loads_into_torchvision(tmp_path):
  """The ImageNet ResNet-50 exports to exactly torchvision.models.resnet50()'s state dict
  (keys in its order, shapes), loads with strict=True from the safetensors file, and gives
  our eval-mode logits on the same images (NCHW there, NHWC here)."""
  torch = pytest.importorskip("torch")
  torchvision = import_torchvision()
  from safetensors.torch import load_file
  variables = damped_residuals(random_variables(
      build_model("imagenet_resnet50", 10, mixskd=False), 5, 64), 5)
  state = torch_state_dict(variables, "imagenet_resnet50", layout="torchvision")
  net = torchvision.models.resnet50(num_classes=10).eval()
  assert list(state) == list(net.state_dict())
  net.load_state_dict(load_file(save_safetensors(str(tmp_path / "r50.safetensors"), state)),
                      strict=True)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert_logits_close(our_logits("imagenet_resnet50", variables, images), theirs)


@pytest.mark.slow
def test_cifar_backbone_loads_into_reference(tmp_path):
  """The CIFAR ResNet-18 backbone loads with strict=True into the independent reference's
  ResNetBackbone (official layout) from safetensors, and gives our eval-mode logits."""
  torch = pytest.importorskip("torch")
  from safetensors.torch import load_file
  from tests import torch_reference as tr
  variables = damped_residuals(random_variables(
      build_model("cifar_resnet18", 10, mixskd=False), 6), 6)
  state = torch_state_dict(variables, "cifar_resnet18")
  net = tr.ResNetBackbone(tr.BasicBlock, [2, 2, 2, 2], 10, stem="cifar").eval()
  assert list(state) == list(net.state_dict())
  net.load_state_dict(load_file(save_safetensors(str(tmp_path / "r18.safetensors"), state)),
                      strict=True)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()
  assert_logits_close(our_logits("cifar_resnet18", variables, images), theirs)


@pytest.mark.slow
def test_whole_mixskd_pt_loads_into_reference(tmp_path):
  """The whole CIFAR MixSKD network as --format pt: torch.load(weights_only=True) reads it,
  and it is exactly the reference MixSKDResNet's state dict (keys, order, shapes, dtypes):
  strict=True loads it and gives back the same tensors."""
  torch = pytest.importorskip("torch")
  from tests import torch_reference as tr
  variables = random_variables(build_model("cifar_resnet18", 10), 7)
  state = torch_state_dict(variables, "cifar_resnet18", whole_mixskd=True)
  loaded = torch.load(save_pt(str(tmp_path / "whole.pt"), state), weights_only=True)
  net = tr.build_cifar_mixskd(18, 10)
  reference = net.state_dict()
  assert list(loaded) == list(reference)
  assert all(loaded[k].dtype == reference[k].dtype for k in reference)
  net.load_state_dict(loaded, strict=True)
  for k, v in net.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), state[k])


@pytest.mark.slow
def test_command_pt_format(workdir, tmp_path, monkeypatch, capsys):
  """`--format pt` writes a plain dict of tensors that torch.load(weights_only=True) reads,
  equal to the safetensors export."""
  torch = pytest.importorskip("torch")
  path, variables = workdir
  out = str(tmp_path / "backbone.pt")
  assert run_cli(["export-torch", "--from", path, "--output", out, "--format", "pt",
                  "--no_head"], monkeypatch, capsys)[0] == 0
  loaded = torch.load(out, weights_only=True)
  expected = torch_state_dict(variables, "small_resnet", head=False)
  assert list(loaded) == list(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k].numpy(), v)


# ---------------------------------------------------------------------------------------------
# docs/checkpoints.md's PyTorch snippets, run on files exported as its commands write them.

GUIDE = "docs/checkpoints.md"


@pytest.fixture(scope="module")
def exported_resnet50(tmp_path_factory):
  """A folder holding r50_mixskd.safetensors (with the head) and r50_backbone.safetensors
  (without), a random ImageNet ResNet-50 of 1000 classes exported in torchvision's layout."""
  folder = tmp_path_factory.mktemp("r50")
  variables = random_variables(build_model("imagenet_resnet50", 1000, mixskd=False), 8, 64)
  for name, head in (("r50_mixskd", True), ("r50_backbone", False)):
    save_safetensors(str(folder / f"{name}.safetensors"),
                     torch_state_dict(variables, "imagenet_resnet50", head=head))
  return folder


def run_guide_snippets(names, folder, monkeypatch):
  """Runs the guide's blocks `names` in order, in one namespace (later blocks use earlier
  blocks' imports, as a reader's session would), in `folder`."""
  from tests.doc_blocks import doc_block  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(folder)
  namespace = {}
  for name in names:
    exec(compile(doc_block(GUIDE, name), f"{GUIDE} {name}", "exec"), namespace)
  return namespace


@pytest.mark.slow
def test_guide_torchvision_snippets_load_the_exported_files(exported_resnet50, monkeypatch):
  """Classification (strict), Faster R-CNN's backbone body (nothing missing or unexpected),
  the frozen-BatchNorm FPN backbone (strict) and DeepLabV3's backbone (strict) all take the
  exported files, and end up holding the exported weights."""
  torch = pytest.importorskip("torch")
  import_torchvision()
  from safetensors.torch import load_file
  backbone = load_file(str(exported_resnet50 / "r50_backbone.safetensors"))
  namespace = run_guide_snippets(["torchvision-classify", "torchvision-detection"],
                                 exported_resnet50, monkeypatch)
  assert namespace["missing"] == [] and namespace["unexpected"] == []
  body = namespace["model"].backbone.body.state_dict()
  torch.testing.assert_close(body["layer4.2.conv3.weight"], backbone["layer4.2.conv3.weight"])
  for name in ("torchvision-frozen-backbone", "torchvision-deeplab"):
    namespace = run_guide_snippets(["torchvision-classify", name], exported_resnet50, monkeypatch)
    loaded = (namespace["backbone"].body if name == "torchvision-frozen-backbone"
              else namespace["model"].backbone).state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], backbone["conv1.weight"])
    torch.testing.assert_close(loaded["layer1.0.bn1.running_var"],
                               backbone["layer1.0.bn1.running_var"])
