"""Our JAX port against outputs the PyTorch reference stored once (no torch needed).

tests/data/torch_references.npz was written by tests/make_torch_references.py from
tests/torch_reference.py (see its docstring for what each case holds and how to regenerate
it). These checks keep the PyTorch equivalence guarded in the default tier and on machines
without torch; the live comparisons (tests/test_interop.py, the `*_matches_torch` tests) run
in the slow tier and in CI. Tolerances are those of the live tests.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax.interop import convert_state_dict
from mixskd_jax.method import mixing, objective
from mixskd_jax.models import SPECS, build_model, layers
from mixskd_jax.models.resnet import ResidualBlock, Stem
from tests.make_torch_references import OBJ_CLASSES, OBJ_T, PATH, synthetic_state_dict

RTOL = 1e-4  # as tests/test_interop.py: relative to the reference's largest magnitude


@pytest.fixture(scope="module")
def refs():
  assert os.path.exists(PATH), f"{PATH} is missing: run python3 -m tests.make_torch_references"
  with np.load(PATH) as data:
    return {k: data[k] for k in data.files}


def _case(refs, prefix):
  return {k[len(prefix) + 1:]: v for k, v in refs.items() if k.startswith(prefix + "/")}


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_close(ours, theirs, rtol=RTOL, what=""):
  """Max abs difference, relative to the reference's largest magnitude (as test_interop)."""
  theirs = np.asarray(theirs, np.float64)
  ours = np.asarray(ours, np.float64)
  assert ours.shape == theirs.shape, what
  scale = max(np.abs(theirs).max(), 1e-12)
  err = np.abs(ours - theirs).max() / scale
  assert err <= rtol, (what, err)


@pytest.fixture(scope="module")
def objective_case(refs):
  """The stored step's inputs and the (synthetic, recomputed) parameters as our variables."""
  case = _case(refs, "objective")
  shapes = [(k, tuple(s)) for k, s in json.loads(str(case["keys"]))]
  state_dict = synthetic_state_dict(shapes)
  model = build_model("cifar_resnet18", OBJ_CLASSES)
  return case, state_dict, model, convert_state_dict(state_dict, model)


@pytest.mark.parametrize("variant", ["reference_cifar", "full"])
def test_objective_step_matches_stored_pytorch(objective_case, variant):
  """One train-mode MixSKD step (CIFAR ResNet-18 + discriminators, given lam and permutation):
  the four heads' logits and features, every loss term, the loss and every BatchNorm running
  statistic afterwards equal the PyTorch reference's (float32, relative difference <= 1e-4).
  The stored twin of tests/test_interop.py::test_converted_model_reproduces_official_step."""
  case, state_dict, model, variables = objective_case
  mix = mixing.MixParams(lam=jnp.asarray(case["lam"], jnp.float32),
                         perm=jnp.asarray(case["perm"], jnp.int32))
  config = objective.ObjectiveConfig.for_variant(variant, temperature=OBJ_T)
  # Eager, not jitted: compiling the whole network costs more than running it op by op.
  loss, (terms, outputs, batch_stats) = objective.apply_mixskd(
      model, variables, jnp.asarray(nhwc(case["x"])), jnp.asarray(case["labels"]), mix, config)
  for k in range(4):
    assert_close(outputs.logits[k], case[f"logits{k}"], what=f"logits{k}")
    assert_close(outputs.features[k], nhwc(case[f"features{k}"]), what=f"features{k}")
  for name in objective.TERMS:
    assert_close(terms[name], case[f"term/{name}"], what=name)
  assert_close(loss, case["term/loss_cifar" if variant == "reference_cifar" else
                          "term/loss_imagenet"], what="loss")
  # Every running statistic after the step (PyTorch stores the unbiased variance).
  after = dict(state_dict)
  after.update({k[len("stats/"):]: v for k, v in case.items() if k.startswith("stats/")})
  expected = convert_state_dict(after, model)["batch_stats"]
  assert jax.tree.structure(batch_stats) == jax.tree.structure(expected)
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(batch_stats),
                                  jax.tree.leaves(expected)):
    assert_close(ours, theirs, what=jax.tree_util.keystr(path))


_RENAME = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn",
           "0": "conv1", "1": "bn1"}  # torch module name -> Flax name (blocks, the stem)


def _flax_variables(params, stats):
  """Stored torch Conv2d / BatchNorm2d tensors -> Flax variables (OIHW -> HWIO)."""
  out = {"params": {}, "batch_stats": {}}
  for name, value in params.items():
    module, leaf = name.rsplit(".", 1)
    module = _RENAME.get(module, module)
    if value.ndim == 4:
      out["params"].setdefault(module, {})["kernel"] = jnp.asarray(value.transpose(2, 3, 1, 0))
    elif leaf in ("weight", "bias"):
      out["params"].setdefault(module, {})["scale" if leaf == "weight" else "bias"] = (
          jnp.asarray(value))
    else:  # running_mean / running_var
      out["batch_stats"].setdefault(module, {})[leaf[len("running_"):]] = jnp.asarray(value)
  if stats is not None:
    out["batch_stats"] = _flax_variables(stats, None)["batch_stats"]
  return out


@pytest.mark.parametrize("case_name", ["basic", "bottleneck", "stem"])
def test_block_and_stem_match_stored_pytorch(refs, case_name):
  """Stride-2 BasicBlock / Bottleneck (V1.5 stride, symmetric padding, projection shortcut) and
  the ImageNet stem (7x7/2 pad 3, BN, ReLU, 3x3/2 pad-1 max-pool) on odd-sized inputs: eval
  output, train output and updated running statistics equal PyTorch's (the tolerances of
  tests/test_models.py::test_stride2_block_matches_torch / test_imagenet_stem_matches_torch)."""
  case = _case(refs, case_name)
  params = {k[len("param/"):]: v for k, v in case.items() if k.startswith("param/")}
  stats = {k[len("stats/"):]: v for k, v in case.items() if k.startswith("stats/")}
  variables = _flax_variables(params, None)
  if case_name == "basic":
    module = ResidualBlock(SPECS["cifar_resnet18"], 32, 2)
  elif case_name == "bottleneck":
    module = ResidualBlock(SPECS["cifar_resnet50"], 16, 2)
  else:
    module = Stem(SPECS["imagenet_resnet50"])
  x = jnp.asarray(nhwc(case["x"]))
  own = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(own) == shapes(variables)  # the stored tensors fill exactly our variables
  np.testing.assert_allclose(module.apply(variables, x, train=False), nhwc(case["eval"]),
                             atol=2e-5, rtol=1e-5)
  got, upd = module.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, nhwc(case["train"]), atol=2e-5, rtol=1e-5)
  expected = _flax_variables(params, stats)["batch_stats"]
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               upd["batch_stats"], expected)


def test_max_pool_matches_stored_pytorch_on_negative_inputs(refs):
  """3x3/2 pad-1 max-pool: -inf padding (a zero pad would win on these negative inputs)."""
  got = layers.max_pool_3x3_s2(jnp.asarray(nhwc(refs["maxpool/x"])))
  np.testing.assert_array_equal(got, nhwc(refs["maxpool/out"]))
  assert float(jnp.max(got)) < 0


def test_stored_references_are_small(refs):
  """The file stays small enough to commit, and says which PyTorch wrote it."""
  assert os.path.getsize(PATH) < 1 << 20
  assert str(refs["meta/torch_version"])
