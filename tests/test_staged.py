"""MixSKD's network around any staged Linen backbone: a user's own, ConvNeXt (LayerNorm, no
BatchNorm) and ViT (tokens); the trainer runs every branched method on them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds  # noqa: F401  (the trainer's data pipeline)
from flax import linen as nn

import mixskd_jax as mixskd
from mixskd_jax.models import build_model
from mixskd_jax.run.loop import train_and_evaluate
from mixskd_jax.train import steps
from mixskd_jax.train.state import TrainState
from tests.test_configs import load


class UserStage(nn.Module):
  """A user's stage, unknown to the library: conv (stride 2) + LayerNorm + GELU."""
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), strides=2)(x)
    return nn.gelu(nn.LayerNorm()(x))


@pytest.mark.slow
def test_user_backbone_from_templates():
  """Template modules become fresh copies: branch k holds stages k+1..S with their own initial
  values and reads the output of backbone stage k; the plain network is the backbone."""
  stages = [UserStage(8), UserStage(16), UserStage(16)]
  net = mixskd.mixskd_network(stages, 5, stem=nn.Conv(8, (1, 1)))
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = net.init(jax.random.key(1), x)
  params = variables["params"]
  assert set(params) == {"backbone", "branches_0", "branches_1", "self_teacher",
                         "discriminators"}
  assert set(params["backbone"]) == {"stem", "layer1", "layer2", "layer3", "fc"}
  assert set(params["branches_0"]) == {"stage0", "stage1", "fc"}
  assert set(params["branches_1"]) == {"stage0", "fc"}
  kernel = lambda stage: stage["Conv_0"]["kernel"]
  assert kernel(params["branches_0"]["stage0"]).shape == kernel(params["backbone"]["layer2"]).shape
  assert not np.array_equal(kernel(params["branches_0"]["stage0"]),
                            kernel(params["backbone"]["layer2"]))
  out = net.apply(variables, x)
  assert [z.shape for z in out.logits] == [(4, 5)] * 3
  assert [f.shape for f in out.features] == [(4, 2, 2, 16)] * 3
  # Branch 1 from the output of backbone stage 1, by hand.
  b = params["branches_0"]
  h = out.stage_features[0]
  for name in ("stage0", "stage1"):
    h = UserStage(16).apply({"params": b[name]}, h)
  np.testing.assert_allclose(out.features[0], h, rtol=1e-5, atol=1e-6)
  plain = mixskd.staged_classifier(stages, 5, stem=nn.Conv(8, (1, 1)))
  logits = plain.apply({"params": params["backbone"]}, x).logits
  np.testing.assert_allclose(logits[0], out.logits[-1], rtol=1e-6)


@pytest.mark.slow
def test_templates_and_factories_build_the_same_network():
  x = jnp.ones((2, 8, 8, 3))
  from_templates = mixskd.mixskd_network([UserStage(4), UserStage(8)], 3)
  from_factories = mixskd.mixskd_network([functools.partial(UserStage, 4),
                                          functools.partial(UserStage, 8)], 3)
  a = from_templates.init(jax.random.key(0), x)
  b = from_factories.init(jax.random.key(0), x)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))


@pytest.mark.slow
def test_refusals_are_clear():
  with pytest.raises(ValueError, match="at least 2 stages"):
    mixskd.mixskd_network([UserStage(4)], 3).init(jax.random.key(0), jnp.ones((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="unknown"):
    mixskd.mixskd_network([UserStage(4), UserStage(4)], 3, pooling="avg")
  # A ViT's tokens declared as feature maps: the error names the pooling that fits.
  vit = build_model("small_vit", 10)
  wrong = vit.clone(pooling="spatial_mean")
  with pytest.raises(ValueError, match="token_mean"):
    wrong.init(jax.random.key(0), jnp.ones((2, 28, 28, 1)))


@pytest.mark.parametrize("name,feature_shape,teacher_kernel", [
    pytest.param("small_convnext", (4, 4, 128), (1, 1, 384, 128), marks=pytest.mark.slow),
    ("small_vit", (49, 64), (1, 192, 64)),
])
def test_convnext_and_vit_heads(name, feature_shape, teacher_kernel):
  """3 heads with the last stage's features, no BatchNorm state, the self-teacher's per-position
  map sized for 3 heads, and an eval step that evaluates every head and the self-teacher."""
  model = build_model(name, 10)
  x = jnp.zeros((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert "batch_stats" not in variables
  assert variables["params"]["self_teacher"]["conv"]["kernel"].shape == teacher_kernel
  out = model.apply(variables, x)
  assert [f.shape[1:] for f in out.features] == [feature_shape] * 3
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                     opt_state=(), method_state={})
  batch = {"image": jnp.zeros((4, 28, 28, 1), jnp.uint8), "label": jnp.arange(4),
           "mask": jnp.array([True, True, True, False])}
  sums = steps.eval_step(state, batch, model=model, mean=(0.5,), std=(0.25,))
  assert float(sums["count"]) == 3
  assert {"top1/branch1", "top1/branch2", "top1/backbone", "top1/self_teacher"} <= set(sums)
  plain = build_model(name, 10, mixskd=False)
  plain_logits = plain.apply({"params": variables["params"]["backbone"]}, x).logits[0]
  np.testing.assert_allclose(plain_logits, out.logits[-1], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("config,arg", [
    ("fashion_mnist_convnext.py", "smoke"),
    ("fashion_mnist_convnext.py", "reference_cifar,smoke"),
    ("fashion_mnist_convnext.py", "byot,smoke"),
    ("fashion_mnist_convnext.py", "cross_entropy,smoke"),
    ("fashion_mnist_vit.py", "smoke"),
    ("fashion_mnist_vit.py", "adversarial,smoke"),
    ("fashion_mnist_vit.py", "byot,smoke"),
    ("fashion_mnist_vit.py", "cross_entropy,smoke"),
])
def test_trainer_runs_every_method_on_convnext_and_vit(config, arg, tmp_path):
  """Our trainer on real Fashion-MNIST at smoke size: MixSKD's variants and BYOT (branches) and
  the CE twin (plain backbone), every head evaluated, the loss finite."""
  results = train_and_evaluate(load(config, arg), str(tmp_path))
  final = results["final"]
  assert results["finished"] and final["eval/count"] == 40 and np.isfinite(final["eval/loss"])
  first = arg.split(",")[0]
  method = first if first in ("byot", "cross_entropy") else "mixskd"
  assert results["method"] == method
  # Any network with branches carries a self-teacher, evaluated even where BYOT leaves it
  # untrained.
  heads = (["backbone"] if method == "cross_entropy"
           else ["branch1", "branch2", "backbone", "self_teacher"])
  assert sorted(k.split("/")[-1] for k in final if k.startswith("eval/top1/")) == sorted(heads)
