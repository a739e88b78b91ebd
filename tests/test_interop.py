"""The importer: official PyTorch MixSKD checkpoints -> our Flax variables, checked against an
independent PyTorch implementation of the official model (tests/torch_reference.py)."""

import copy
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mixskd_jax.method import mixing, objective  # noqa: E402
from mixskd_jax.interop import (convert_state_dict, export_backbone, load_converted,  # noqa: E402
                                read_state_dict)
from mixskd_jax.interop.__main__ import main as convert_main  # noqa: E402
from mixskd_jax.method.optimizer import reference_sgd
from mixskd_jax.method.trainable import partitioned  # noqa: E402
from mixskd_jax.models import build_model  # noqa: E402
from tests import torch_reference as tr  # noqa: E402

RTOL = 1e-4  # the definition of done: float32, relative difference at most 1e-4


def nhwc(x):
  return jnp.asarray(x.detach().permute(0, 2, 3, 1).numpy())


def assert_close(ours, theirs, rtol=RTOL):
  """Max abs difference, relative to the reference's largest magnitude."""
  theirs = np.asarray(theirs, np.float64)
  ours = np.asarray(ours, np.float64)
  assert ours.shape == theirs.shape
  scale = max(np.abs(theirs).max(), 1e-12)
  assert np.abs(ours - theirs).max() / scale <= rtol, np.abs(ours - theirs).max() / scale


def with_discriminators(net, discs):
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  for k, d in enumerate(discs):
    sd.update({f"discriminators.{k}.{n}": v.numpy() for n, v in d.state_dict().items()})
  return sd


@pytest.fixture(scope="module")
def official_r18():
  """A CIFAR ResNet-18 MixSKD in PyTorch (random init), its discriminators and a batch."""
  torch.manual_seed(0)
  net = tr.build_cifar_mixskd(18, 100)
  discs = tr.make_discriminators(512)
  x = torch.randn(4, 3, 32, 32)
  y = torch.tensor([3, 97, 3, 41])
  perm = torch.tensor([2, 0, 3, 1])
  return net, discs, x, y, 0.3, perm


def test_every_key_consumed_and_every_variable_filled(official_r18):
  """311 official keys (minus num_batches_tracked) fill exactly our variables."""
  net, discs, *_ = official_r18
  sd = with_discriminators(net, discs)
  variables = convert_state_dict(sd, build_model("cifar_resnet18", 100))
  leaves = jax.tree_util.tree_leaves(variables)
  tensors = [k for k in sd if not k.endswith("num_batches_tracked")]
  assert len(net.state_dict()) == 311
  assert len(leaves) == len(tensors)
  assert sum(l.size for l in leaves) == sum(sd[k].size for k in tensors)


def test_conv_transpose_is_right(official_r18):
  """The converted stem conv computes what torch's conv computes (layout and padding)."""
  net, discs, x, *_ = official_r18
  variables = convert_state_dict(with_discriminators(net, discs),
                                 build_model("cifar_resnet18", 100))
  kernel = variables["params"]["backbone"]["stem"]["conv1"]["kernel"]
  ours = jax.lax.conv_general_dilated(nhwc(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with torch.no_grad():
    theirs = net.backbone.conv1(x).permute(0, 2, 3, 1).numpy()
  assert_close(ours, theirs, 1e-5)


def jax_step(net, discs, x, y, lam, perm, variant, dtype=jnp.float32):
  """Our loss, terms, outputs, BN statistics and gradients for the official batch."""
  model = build_model("cifar_resnet18", 100, dtype=dtype)
  variables = convert_state_dict(with_discriminators(net, discs), model)
  variables = jax.tree_util.tree_map(lambda v: v.astype(dtype), variables)
  mix = mixing.MixParams(lam=jnp.asarray(lam, dtype), perm=jnp.asarray(perm.numpy(), jnp.int32))
  config = objective.ObjectiveConfig.for_variant(variant)
  images = nhwc(x).astype(dtype)
  def loss_fn(params):
    return objective.apply_mixskd(model, {**variables, "params": params}, images,
                                  jnp.asarray(y.numpy()), mix, config)
  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  return model, variables, loss, aux, grads


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reference_cifar", "full"])
def test_converted_model_reproduces_official_step(official_r18, variant):
  """Definition of done: logits, features, every loss term, the loss and the BN updates of one
  train-mode step on the same input, lam and permutation match the official computation
  (float32, relative difference <= 1e-4)."""
  net, discs, x, y, lam, perm = official_r18
  net = _clone(net)
  _, _, loss, (terms, outputs, batch_stats), _ = jax_step(net, discs, x, y, lam, perm, variant)
  ref = tr.reference_terms(net, discs, x, y, lam, perm, T=3.0)
  for k in range(4):
    assert_close(outputs.logits[k], ref["logits"][k].detach().numpy())
    assert_close(outputs.features[k], ref["features"][k].detach().permute(0, 2, 3, 1).numpy())
  for name in objective.TERMS:
    assert_close(terms[name], ref[name].item())
  assert_close(loss, ref["loss_cifar" if variant == "reference_cifar" else "loss_imagenet"].item())
  # Running statistics after the step (PyTorch stores the unbiased variance).
  assert_close(batch_stats["backbone"]["stem"]["bn1"]["var"], net.backbone.bn1.running_var)
  assert_close(batch_stats["branches_0"]["stage0"]["block0"]["downsample_bn"]["mean"],
               net.auxiliary_classifier.block_extractor1[0][0].downsample[1].running_mean)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reference_cifar", "full"])
def test_gradients_match_pytorch(official_r18, variant):
  """Every parameter's gradient equals PyTorch autograd's (stop-gradients = .detach(), and a
  None .grad is our exact zero). In float64 on both sides: in float32 a pre-activation within
  rounding of 0 can flip a ReLU in one framework and not the other, which moves single
  gradients of this tiny batch by percents although the formulas are the same."""
  net, discs, x, y, lam, perm = official_r18
  net = _clone(net).double()
  discs64 = [copy.deepcopy(d).double() for d in discs]
  with jax.enable_x64(True):
    model, _, _, _, grads = jax_step(net, discs64, x.double(), y, lam, perm, variant,
                                     jnp.float64)
    ref = tr.reference_terms(net, discs64, x.double(), y, lam, perm, T=3.0)
    net.zero_grad()
    ref["loss_cifar" if variant == "reference_cifar" else "loss_imagenet"].backward()
    expected = dict(jax.tree_util.tree_leaves_with_path(
        convert_state_dict(_grads_as_state_dict(net, discs64), model)["params"]))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      if path[0].key != "discriminators":  # not parameters of the reference's graph
        assert_close(g, expected[path], 1e-6)
  st_untouched = all(p.grad is None for p in net.final_aux_classifier.parameters())
  assert st_untouched == (variant == "reference_cifar")


def _clone(net):
  copy = tr.build_cifar_mixskd(18, 100)
  copy.load_state_dict(net.state_dict())
  return copy


def _grads_as_state_dict(net, discs):
  """The torch .grad of every tensor in the state dict layout; None -> zeros, buffers as is."""
  grads = {}
  params = dict(net.named_parameters())
  for name, value in net.state_dict().items():
    p = params.get(name)
    if p is None:
      grads[name] = value.numpy()
    else:
      grads[name] = np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
  for k, d in enumerate(discs):
    grads.update({f"discriminators.{k}.{n}": v.numpy() for n, v in d.state_dict().items()})
  return grads


@pytest.mark.slow
def test_one_sgd_step_matches_pytorch(official_r18):
  """reference_cifar: one Nesterov SGD step with coupled decay gives PyTorch's parameters
  (float64, see above), and the never-updated self-teacher stays bit-identical (PyTorch skips
  parameters whose grad is None: no decay, no momentum)."""
  net, discs, x, y, lam, perm = official_r18
  net = _clone(net).double()
  discs64 = [copy.deepcopy(d).double() for d in discs]
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  with jax.enable_x64(True):
    model, variables, _, _, grads = jax_step(net, discs64, x.double(), y, lam, perm,
                                             "reference_cifar", jnp.float64)
    config = objective.ObjectiveConfig.for_variant("reference_cifar")
    params = variables["params"]
    tx = partitioned(reference_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                     objective.parameter_partition(params, config))
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    ref = tr.reference_terms(net, discs64, x.double(), y, lam, perm, T=3.0)
    opt.zero_grad()
    ref["loss_cifar"].backward()
    opt.step()
    expected = dict(jax.tree_util.tree_leaves_with_path(
        convert_state_dict(with_discriminators(net, discs64), model)["params"]))
    for path, value in jax.tree_util.tree_leaves_with_path(new_params):
      assert_close(value, expected[path], 1e-6)
    np.testing.assert_array_equal(new_params["self_teacher"]["conv"]["kernel"],
                                  params["self_teacher"]["conv"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("name,builder,size", [
    ("cifar_resnet50", lambda: tr.build_cifar_mixskd(50, 10), 32),
    ("imagenet_resnet50", lambda: tr.build_imagenet_mixskd_resnet50(10), 64),
])
def test_resnet50_models_convert(name, builder, size):
  """CIFAR and ImageNet ResNet-50 MixSKD checkpoints give the official eval-mode outputs."""
  torch.manual_seed(1)
  net = builder().eval()
  # Non-trivial running statistics, so eval mode really tests their mapping.
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  x = torch.randn(2, 3, size, size)
  model = build_model(name, 10)
  variables = convert_state_dict(net.state_dict(), model, discriminator_key=jax.random.key(0))
  outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
  with torch.no_grad():
    logits, feats = net(x)
    teacher = net.self_teacher(feats)
  for k in range(4):
    assert_close(outputs.logits[k], logits[k].numpy())
  ours_teacher = model.apply(variables, outputs.features, method="teach")
  assert_close(ours_teacher, teacher.numpy())


def test_errors_name_the_problem(official_r18):
  """Unexpected keys, wrong shapes and absent discriminators are reported, not guessed."""
  net, discs, *_ = official_r18
  sd = with_discriminators(net, discs)
  model = build_model("cifar_resnet18", 100)
  with pytest.raises(ValueError, match="backbone.extra.weight"):
    convert_state_dict({**sd, "backbone.extra.weight": np.zeros(3)}, model)
  with pytest.raises(ValueError, match="shape mismatches"):
    convert_state_dict(sd, build_model("cifar_resnet18", 10))
  bare = {k: v.numpy() for k, v in net.state_dict().items()}
  with pytest.raises(ValueError, match="discriminators"):
    convert_state_dict(bare, model)
  filled = convert_state_dict(bare, model, discriminator_key=jax.random.key(3))
  assert filled["params"]["discriminators"]["disc3"]["fc1"]["kernel"].shape == (512, 128)
  with pytest.raises(ValueError, match="not a checkpoint of this model"):
    convert_state_dict(bare, build_model("cifar_resnet18", 100, mixskd=False))


def test_reads_official_file_and_module_prefix(official_r18, tmp_path):
  """The official {'net': ...} .pth.tar, DataParallel's 'module.' prefix, and .npz all load."""
  net, *_ = official_r18
  path = str(tmp_path / "resnet18.pth.tar")
  tr.save_official_checkpoint(net, path)
  sd = read_state_dict(path)
  assert set(sd) == set(net.state_dict())
  np.testing.assert_array_equal(sd["backbone.fc.weight"], net.backbone.fc.weight.detach().numpy())
  prefixed = str(tmp_path / "ddp.pth")
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, prefixed)
  model = build_model("cifar_resnet18", 100)
  a = convert_state_dict(read_state_dict(prefixed), model, discriminator_key=jax.random.key(0))
  npz = str(tmp_path / "sd.npz")
  np.savez(npz, **sd)
  b = convert_state_dict(read_state_dict(npz), model, discriminator_key=jax.random.key(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


class _Payload:
  """A pickle that would create a file if unpickled by plain pickle."""
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_refuses_pickles_that_run_code(tmp_path):
  """A .pth whose unpickling would execute code is rejected and the code never runs."""
  marker = str(tmp_path / "pwned")
  path = str(tmp_path / "evil.pth")
  with open(path, "wb") as f:
    pickle.dump({"net": _Payload(marker)}, f, protocol=2)
  with pytest.raises(ValueError, match="could execute code"):
    read_state_dict(path)
  assert not os.path.exists(marker)


def test_missing_torch_is_explained(tmp_path, monkeypatch):
  """Without PyTorch, reading a .pth says how to install it."""
  path = tmp_path / "x.pth"
  path.write_bytes(b"0")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  with pytest.raises(ImportError, match="pip install torch"):
    read_state_dict(str(path))


@pytest.mark.slow
def test_command_converts_saves_and_loads(official_r18, tmp_path):
  """`python -m mixskd_jax.interop` writes an Orbax checkpoint that loads back to the same
  model; --backbone_only exports the plain inference network with the backbone head's logits."""
  net, discs, x, *_ = official_r18
  path = str(tmp_path / "resnet18.pth.tar")
  tr.save_official_checkpoint(net, path)
  full_dir = convert_main(["--checkpoint", path, "--model", "cifar_resnet18",
                           "--num_classes", "100", "--output", str(tmp_path / "full")])
  plain_dir = convert_main(["--checkpoint", path, "--model", "cifar_resnet18",
                            "--num_classes", "100", "--output", str(tmp_path / "plain"),
                            "--backbone_only"])
  model, variables = load_converted(full_dir)
  plain, plain_vars = load_converted(plain_dir)
  assert jax.tree_util.tree_structure(plain_vars) == jax.tree_util.tree_structure(
      export_backbone(variables))
  images = nhwc(x)
  out = model.apply(variables, images, train=False)
  plain_out = plain.apply(plain_vars, images, train=False)
  np.testing.assert_allclose(plain_out.logits[0], out.logits[-1], rtol=1e-5, atol=1e-5)
  with torch.no_grad():
    assert_close(out.logits[-1], net.eval()(x)[0][-1].numpy())
  with pytest.raises(FileExistsError):
    convert_main(["--checkpoint", path, "--model", "cifar_resnet18", "--num_classes", "100",
                  "--output", full_dir])


@pytest.mark.slow
def test_plain_torchvision_layout(official_r18):
  """A plain backbone state dict (no 'backbone.' prefix) converts into the plain ResNet."""
  net, _, x, *_ = official_r18
  sd = {k: v.numpy() for k, v in net.backbone.state_dict().items()}
  plain = build_model("cifar_resnet18", 100, mixskd=False)
  variables = convert_state_dict(sd, plain)
  with torch.no_grad():
    expected = net.backbone.eval()(x)[0].numpy()
  assert_close(plain.apply(variables, nhwc(x), train=False).logits[0], expected)
