"""mixskd_jax.nnx: the NNX heads equal the Linen ones, the network builds fresh branches, the
trainable filter freezes what each variant freezes (by top-level path only), the loss is the
shared objective on one [clean; mixed] pass, and the own-model guide's NNX example runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from mixskd_jax import nnx as mnnx
from mixskd_jax.method import mixing, objective
from mixskd_jax.models import heads
from tests.doc_blocks import doc_block


def nnx_params(module):
  """{path: nnx.Param} of every parameter of `module` (the variables themselves)."""
  return {p: v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


def load_linen(module, params):
  """Copies Linen `params` into `module`, checking the two parameter trees mirror each other."""
  flat, own = traverse_util.flatten_dict(params), nnx_params(module)
  assert {p: v.shape for p, v in own.items()} == {p: v.shape for p, v in flat.items()}
  for path, var in own.items():
    var[...] = flat[path]


def snapshot(module):
  return {p: np.array(v[...]) for p, v in nnx_params(module).items()}


class ConvStage(nnx.Module):
  """3x3 conv, stride 2 -> [BatchNorm] -> relu [-> + a per-pixel Linear named self_teacher]."""

  def __init__(self, cin, cout, rngs, *, bn=False, nested=False):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs) if bn else None
    # A user's module that happens to share the name of MixSKD's top-level self-teacher.
    self.self_teacher = nnx.Linear(cout, cout, rngs=rngs) if nested else None

  def __call__(self, x):
    x = self.conv(x)
    x = nnx.relu(self.bn(x) if self.bn is not None else x)
    return x + self.self_teacher(x) if self.self_teacher is not None else x


def conv_net(seed=0, **stage_kwargs):
  widths = (4, 8, 8, 16)
  return mnnx.MixSKDNetwork(
      stem=lambda rngs: nnx.Conv(3, 4, (3, 3), rngs=rngs),
      stages=[functools.partial(ConvStage, i, o, **stage_kwargs)
              for i, o in zip(widths, widths[1:])],
      num_classes=5, features=16, discriminator_hidden=8, rngs=nnx.Rngs(seed))


IMAGES = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
LABELS = jnp.array([0, 3, 4, 3])


@pytest.mark.parametrize("pooling,shape", [
    pytest.param("spatial_mean", (3, 4, 4), marks=pytest.mark.slow), ("token_mean", (3, 5))])
def test_heads_equal_linen(pooling, shape):
  channels = (6, 4, 5)  # Linen's default width: the first head's channels
  keys = jax.random.split(jax.random.key(1), 3)
  feats = [jax.random.normal(k, shape + (c,)) for k, c in zip(keys, channels)]
  linen_teacher = heads.SelfTeacher(7, pooling=pooling)
  params = linen_teacher.init(jax.random.key(2), feats)["params"]
  teacher = mnnx.SelfTeacher(sum(channels), 7, width=6, pooling=pooling, rngs=nnx.Rngs(3))
  for path, var in nnx_params(teacher).items():  # PyTorch-default init: U(+-1/sqrt(fan_in))
    fan_in = {"conv": 15, "fc": 6}[path[0]]
    assert float(jnp.max(jnp.abs(var[...]))) <= fan_in ** -0.5
  load_linen(teacher, params)
  np.testing.assert_allclose(teacher(feats), linen_teacher.apply({"params": params}, feats),
                             atol=1e-6, rtol=1e-6)

  pooled = [f.mean(axis=tuple(range(1, f.ndim - 1))) for f in feats]
  linen_discs = heads.FeatureDiscriminators(hidden=16)
  params = linen_discs.init(jax.random.key(4), pooled)["params"]
  discs = mnnx.FeatureDiscriminators(channels, hidden=16, rngs=nnx.Rngs(5))
  load_linen(discs, params)
  for ours, theirs in zip(discs(pooled), linen_discs.apply({"params": params}, pooled)):
    assert ours.shape == (shape[0], 2)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="width"):
    mnnx.SelfTeacher(15, 7, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_network_heads_and_fresh_branches():
  model = conv_net()
  out = model(IMAGES)
  assert model.num_heads == 3 and len(out.logits) == len(out.features) == 3
  assert all(z.shape == (4, 5) for z in out.logits)
  assert all(f.shape == (4, 1, 1, 16) for f in out.features)
  assert model.teach(out.features).shape == (4, 5)
  assert model.self_teacher.conv.kernel.shape == (1, 1, 48, 16)
  assert [d.shape for d in model.discriminate([f.mean((1, 2)) for f in out.features])] == [
      (4, 2)] * 3
  stages = model.backbone.stages
  for k, branch in enumerate(model.branches, start=1):
    assert len(branch.stages) == 3 - k  # copies of stages k+1 .. S
    for j, stage in enumerate(branch.stages):
      ours, backbone = stage.conv.kernel[...], stages[k + j].conv.kernel[...]
      assert ours.shape == backbone.shape and not np.array_equal(ours, backbone)
    assert not np.array_equal(branch.head.kernel[...], model.backbone.head.kernel[...])
    # Branch k reads the output of backbone stage k.
    np.testing.assert_allclose(branch(out.stage_features[k - 1])[0], out.logits[k - 1],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_token_backbone_pooling_and_refusals():
  token_stage = lambda rngs: nnx.Sequential(nnx.Linear(8, 8, rngs=rngs), nnx.gelu)
  build = lambda pooling, n=3: mnnx.MixSKDNetwork(
      stages=[token_stage] * n, num_classes=5, features=8, pooling=pooling, rngs=nnx.Rngs(0))
  tokens = jax.random.normal(jax.random.key(1), (4, 6, 8))
  model = build("token_mean")
  out = model(tokens)
  assert [z.shape for z in out.logits] == [(4, 5)] * 3
  assert [f.shape for f in out.features] == [(4, 6, 8)] * 3
  assert model.self_teacher.conv.kernel.shape == (1, 24, 8)
  mix = mixing.sample_mix(jax.random.key(2), 4, alpha=0.4)
  loss, (terms, _) = mnnx.mixskd_loss(model, tokens, LABELS, mix,
                                      objective.ObjectiveConfig.for_variant("full"))
  assert np.isfinite(float(loss)) and float(terms["self_teacher_ce"]) > 0
  with pytest.raises(ValueError, match="token_mean"):
    build("spatial_mean")(tokens)
  with pytest.raises(ValueError, match="unknown"):
    build("mean")
  with pytest.raises(ValueError, match="at least 2 stages"):
    build("token_mean", n=1)
  shared = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="new, freshly initialized"):
    mnnx.MixSKDNetwork(stages=[lambda rngs: shared] * 2, num_classes=5, features=8,
                       pooling="token_mean", rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("variant,frozen", [("reference_cifar", {"self_teacher", "discriminators"}),
                                            ("full", {"discriminators"}),
                                            ("adversarial", set())])
def test_trainable_filter(variant, frozen):
  config = objective.ObjectiveConfig.for_variant(variant)
  model = conv_net(nested=True)
  trainable = mnnx.trainable_filter(config)
  selected = [p for p, _ in nnx.to_flat_state(nnx.state(model, trainable))]
  assert {p[0] for p in selected} == {"backbone", "branches", "self_teacher",
                                      "discriminators"} - frozen
  assert any("self_teacher" in p[1:] for p in selected)  # the user's nested module trains
  # Weight decay moves every parameter the optimizer holds, with or without a gradient.
  optimizer = nnx.Optimizer(model, optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1)),
                            wrt=trainable)

  @nnx.jit
  def step(model, optimizer, key):
    mix = mixing.sample_mix(key, 4, alpha=0.4)
    grads = nnx.grad(lambda m: mnnx.mixskd_loss(m, IMAGES, LABELS, mix, config)[0],
                     argnums=nnx.DiffState(0, trainable))(model)
    optimizer.update(model, grads)

  before = snapshot(model)
  for i in range(2):
    step(model, optimizer, jax.random.key(i))
  after = snapshot(model)
  for group in ("backbone", "branches", "self_teacher", "discriminators"):
    same = [np.array_equal(before[p], after[p]) for p in before if p[0] == group]
    assert all(same) if group in frozen else not any(same), group
  assert not any(np.array_equal(before[p], after[p]) for p in before
                 if p[0] == "backbone" and "self_teacher" in p)


@pytest.mark.slow
def test_loss_is_objective_on_one_pass_and_batchnorm_sees_both_views():
  config = objective.ObjectiveConfig.for_variant("full")
  model = conv_net(bn=True)
  mix = mixing.sample_mix(jax.random.key(3), 4, alpha=0.4)
  loss, (terms, outputs) = mnnx.mixskd_loss(model, IMAGES, LABELS, mix, config)
  both = jnp.concatenate([IMAGES, mixing.mix(IMAGES, mix)])
  by_hand = model(both)
  loss_hand, terms_hand = objective.mixskd_loss(
      by_hand, LABELS, mix, self_teacher=model.teach, discriminators=model.discriminate,
      config=config)
  np.testing.assert_allclose(loss, loss_hand, rtol=1e-6)
  for name in objective.TERMS:
    np.testing.assert_allclose(terms[name], terms_hand[name], rtol=1e-5, atol=1e-7)
  for ours, theirs in zip(outputs.logits, by_hand.logits):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)

  # Stage 2's BatchNorm: after a nonlinearity the mixed view's batch mean differs from the
  # clean one's (a linear map of mixed images has the same batch mean as of the clean ones).
  stages = model.backbone.stages
  bn = stages[1].bn
  old = np.array(bn.mean[...])
  bn_input = stages[1].conv(stages[0](model.backbone.stem(both)))  # before the update
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=mnnx.trainable_filter(config))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: mnnx.mixskd_loss(m, IMAGES, LABELS, mix, config)[0],
                     argnums=nnx.DiffState(0, mnnx.trainable_filter(config)))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  expected = 0.9 * old + 0.1 * np.asarray(bn_input.mean((0, 1, 2)))
  np.testing.assert_allclose(bn.mean[...], expected, rtol=1e-5, atol=1e-6)
  clean_only = 0.9 * old + 0.1 * np.asarray(bn_input[:4].mean((0, 1, 2)))
  assert not np.allclose(bn.mean[...], clean_only, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_guide_nnx_example_runs(capsys):
  namespace = {}
  exec(compile(doc_block("docs/own-model.md", "nnx-model"), "own-model nnx-model", "exec"),
       namespace)
  assert all(np.isfinite(float(v)) for v in namespace["terms"].values())
  assert namespace["logits"].shape == (8, 10)
  assert "clean_ce" in capsys.readouterr().out
  # The backbone alone and the user's plain copy give the network's main-head logits.
  np.testing.assert_array_equal(namespace["backbone_logits"], namespace["logits"])
  np.testing.assert_allclose(namespace["plain_logits"], namespace["logits"], rtol=1e-5,
                             atol=1e-6)
  assert [o.shape[-1] for o in namespace["stage_outputs"]] == [16, 32, 64]
  # BatchNorm statistics moved in training, and the copy carries them.
  plain, model = namespace["plain"], namespace["model"]
  np.testing.assert_array_equal(plain.stages[2].bn.mean[...], model.backbone.stages[2].bn.mean[...])
  assert float(np.abs(plain.stages[2].bn.mean[...]).max()) > 0


def test_copy_backbone_refuses_a_plain_model_laid_out_otherwise():
  build = lambda features=8: mnnx.MixSKDNetwork(
      stages=[lambda rngs: nnx.Linear(8, 8, rngs=rngs)] * 2, num_classes=5,
      features=features, pooling="token_mean", rngs=nnx.Rngs(0))

  class Plain(nnx.Module):
    def __init__(self, width, rngs, stages_name="stages"):
      setattr(self, stages_name, nnx.List([nnx.Linear(8, 8, rngs=rngs),
                                           nnx.Linear(8, width, rngs=rngs)]))
      self.head = nnx.Linear(8, 5, rngs=rngs)

  model = build()
  copied = mnnx.copy_backbone(model, Plain(8, nnx.Rngs(3)))
  np.testing.assert_array_equal(copied.head.kernel[...], model.backbone.head.kernel[...])
  with pytest.raises(ValueError, match=r"'stages/1/bias' is \(4,\) in your plain model but "
                                       r"\(8,\) in the backbone"):
    mnnx.copy_backbone(model, Plain(4, nnx.Rngs(3)))
  with pytest.raises(ValueError, match="Your plain model has no 'stages/0/bias'"):
    mnnx.copy_backbone(model, Plain(8, nnx.Rngs(3), stages_name="layers"))


def test_wrong_features_and_discriminator_widths_name_the_argument():
  tokens = jax.random.normal(jax.random.key(1), (4, 6, 8))
  model = mnnx.MixSKDNetwork(stages=[lambda rngs: nnx.Linear(8, 8, rngs=rngs)] * 2,
                             num_classes=5, features=16, pooling="token_mean", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="built with features=16, but the last stage gives 8 "
                                       "channels .*: pass features=8"):
    model(tokens)
  discs = mnnx.FeatureDiscriminators([8, 8], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="built for in_features=8 got pooled features of 6 "
                                       "channels"):
    discs([jnp.ones((4, 8)), jnp.ones((4, 6))])
