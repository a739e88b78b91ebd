"""The public loss API a user imports into their own model: one import, token features,
per-example terms, a `where` mask for padded rows, `shard_map` with an axis name, a user's own
`nn.BatchNorm` on [clean; mixed], path-based trainable masks, float32 lam."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec as P

import mixskd_jax as mixskd

B, C, HEADS, D = 8, 5, 3, 6
FULL = mixskd.ObjectiveConfig.for_variant("full")


class RowNet(nn.Module):
  """A user's network that treats every row alone: 3 heads over (N, L, D) tokens."""
  tokens: bool = True

  @nn.compact
  def __call__(self, x):
    logits, feats = [], []
    h = x
    for k in range(HEADS):
      h = jnp.tanh(nn.Dense(D, name=f"stage{k}")(h))
      feats.append(h)
      logits.append(nn.Dense(C, name=f"fc{k}")(mixskd.pool(h, "token_mean")))
    return mixskd.ModelOutputs(logits=tuple(logits), features=tuple(feats))


@pytest.fixture(scope="module")
def setup():
  net = RowNet()
  x = jax.random.normal(jax.random.key(0), (B, 4, D))
  labels = jnp.arange(B) % C
  net_params = net.init(jax.random.key(1), x)["params"]
  feats = net.apply({"params": net_params}, x).features
  teacher = mixskd.SelfTeacher(C, pooling="token_mean")
  discs = mixskd.FeatureDiscriminators(hidden=7)
  params = {"network": net_params,
            "self_teacher": teacher.init(jax.random.key(2), feats)["params"],
            "discriminators": discs.init(jax.random.key(3), [f.mean(1) for f in feats])["params"]}
  return dict(net=net, x=x, labels=labels, params=params, teacher=teacher, discs=discs)


def loss_parts(s, params, x, labels, mix, **kwargs):
  """(outputs, keyword arguments) of mixskd_loss for RowNet on [clean; mixed]."""
  outputs = s["net"].apply({"params": params["network"]},
                           mixskd.stack_views(x, mixskd.mix(x, mix), mix.num_groups))
  return outputs, dict(
      self_teacher=lambda f: s["teacher"].apply({"params": params["self_teacher"]}, f),
      discriminators=lambda p: s["discs"].apply({"params": params["discriminators"]}, p),
      config=FULL, pooling="token_mean", **kwargs)


def test_one_import_gives_the_api_without_tensorflow():
  """Every name in `mixskd_jax.__all__` exists, and importing it pulls in no TensorFlow."""
  assert all(hasattr(mixskd, name) for name in mixskd.__all__)
  code = ("import sys, mixskd_jax; assert 'tensorflow' not in sys.modules; "
          "assert 'tensorflow_datasets' not in sys.modules; print('ok')")
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True).stdout.strip() == "ok"


@pytest.mark.slow
def test_token_features_equal_the_same_numbers_as_one_column_feature_maps(setup):
  """Tokens (N, L, D) with token_mean give the loss of the same numbers laid out as feature
  maps (N, L, 1, D) with spatial_mean: the self-teacher's per-token map is its 1x1 conv."""
  s = setup
  mix = mixskd.sample_mix(jax.random.key(4), B, alpha=0.4)
  outputs, kw = loss_parts(s, s["params"], s["x"], s["labels"], mix)
  loss, terms = mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)
  as_maps = outputs.replace(features=tuple(f[:, :, None, :] for f in outputs.features))
  st = jax.tree_util.tree_map(lambda a: a, s["params"]["self_teacher"])
  st["conv"]["kernel"] = st["conv"]["kernel"][None]     # (1, in, w) -> (1, 1, in, w)
  map_teacher = mixskd.SelfTeacher(C)
  loss2, terms2 = mixskd.mixskd_loss(
      as_maps, s["labels"], mix, config=FULL,
      self_teacher=lambda f: map_teacher.apply({"params": st}, f),
      discriminators=kw["discriminators"])
  for name in terms:
    np.testing.assert_allclose(terms[name], terms2[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(terms["feature_mse"]) > 0 and float(terms["kl_branches"]) > 0


def test_wrong_layout_is_refused_naming_the_fix(setup):
  s = setup
  mix = mixskd.sample_mix(jax.random.key(4), B, alpha=0.4)
  outputs, kw = loss_parts(s, s["params"], s["x"], s["labels"], mix)
  kw["pooling"] = "spatial_mean"
  with pytest.raises(ValueError, match="token_mean"):
    mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)
  with pytest.raises(ValueError, match="unknown"):
    mixskd.pool(jnp.zeros((2, 3, 4)), "avg")


def test_pool_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(mixskd.pool(x, "spatial_mean"), x.mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(mixskd.pool(x[:, 0], "token_mean"), x[:, 0].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(mixskd.pool(x[:, 0], "first_token"), x[:, 0, 0])


def test_per_example_terms_average_to_the_loss_terms(setup):
  s = setup
  mix = mixskd.sample_mix(jax.random.key(5), B, alpha=0.4)
  outputs, kw = loss_parts(s, s["params"], s["x"], s["labels"], mix)
  loss, terms = mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)
  per_example = mixskd.mixskd_per_example_terms(outputs, s["labels"], mix, **kw)
  assert set(per_example) == set(terms)
  for name, values in per_example.items():
    assert values.shape == (B,)
    np.testing.assert_allclose(values.mean(), terms[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_where_mask_ignores_padded_rows(setup):
  """A batch of 6 real rows padded to 8 with garbage: with `where` (and the mix drawn with it)
  the loss and its gradient equal those of the 6 real rows alone."""
  s = setup
  where = jnp.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
  real = np.flatnonzero(np.asarray(where))
  x = s["x"].at[~where].set(1e3)                       # garbage in the padded rows
  mix = mixskd.sample_mix(jax.random.key(6), B, alpha=0.4, where=where)
  perm = np.asarray(mix.perm)
  assert set(perm[real]) == set(real) and all(perm[i] == i for i in np.flatnonzero(~where))
  # The same pairs among the real rows alone, indices renumbered.
  renumber = {old: new for new, old in enumerate(real)}
  real_mix = mixskd.MixParams(lam=mix.lam, perm=jnp.array([renumber[p] for p in perm[real]],
                                                          jnp.int32))

  def masked(params):
    outputs, kw = loss_parts(s, params, x, s["labels"], mix, where=where)
    return mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)

  def alone(params):
    outputs, kw = loss_parts(s, params, x[real], s["labels"][real], real_mix)
    return mixskd.mixskd_loss(outputs, s["labels"][real], real_mix, **kw)

  (loss, terms), grads = jax.value_and_grad(masked, has_aux=True)(s["params"])
  (loss2, terms2), grads2 = jax.value_and_grad(alone, has_aux=True)(s["params"])
  for name in terms:
    np.testing.assert_allclose(terms[name], terms2[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # No real row at all: zero, not NaN.
  outputs, kw = loss_parts(s, s["params"], x, s["labels"], mix, where=jnp.zeros(B, bool))
  assert float(mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)[0]) == 0.0


@pytest.mark.slow
def test_loss_inside_shard_map_equals_the_global_loss(setup):
  """Each of 4 devices holds 2 clean rows and pairs them locally; with axis_name the loss and
  its gradient inside shard_map equal the global loss of the same 4 mix groups."""
  s = setup
  devices = np.array(jax.devices()[:4])
  assert len(devices) == 4, "conftest fakes 8 CPU devices"
  mesh = Mesh(devices, ("data",))
  mix = mixskd.sample_mix(jax.random.key(7), B, alpha=0.4, num_groups=4)

  def global_loss(params):
    outputs, kw = loss_parts(s, params, s["x"], s["labels"], mix)
    return mixskd.mixskd_loss(outputs, s["labels"], mix, **kw)

  def local(params, x, labels, perm, lam):
    local_mix = mixskd.MixParams(lam=lam, perm=perm[0])
    def loss_fn(p):
      outputs, kw = loss_parts(s, p, x, labels, local_mix, axis_name="data")
      return mixskd.mixskd_loss(outputs, labels, local_mix, **kw)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  sharded = jax.jit(jax.shard_map(local, mesh=mesh,
                                  in_specs=(P(), P("data"), P("data"), P("data"), P()),
                                  out_specs=((P(), P()), P())))
  (loss, terms), grads = sharded(s["params"], s["x"], s["labels"], mix.perm, mix.lam)
  (loss2, terms2), grads2 = jax.value_and_grad(global_loss, has_aux=True)(s["params"])
  for name in terms:
    np.testing.assert_allclose(terms[name], terms2[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class BatchNormNet(nn.Module):
  """A user's network with Flax's own BatchNorm: 2 heads on (N, 4, 4, 3) images."""

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(8, (3, 3), name="conv")(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h))
    a = nn.relu(nn.Conv(8, (1, 1), name="aux")(h))
    m = nn.relu(nn.Conv(8, (3, 3), name="main")(h))
    pooled = [mixskd.pool(f, "spatial_mean") for f in (a, m)]
    return mixskd.ModelOutputs(logits=(nn.Dense(C, name="fc_aux")(pooled[0]),
                                       nn.Dense(C, name="fc_main")(pooled[1])), features=(a, m))


@pytest.mark.slow
def test_users_own_batchnorm_normalizes_clean_and_mixed_together():
  """One forward over [clean; mixed]: Flax's BatchNorm statistics cover all 2B rows, the
  loss trains the network, and eval mode uses the running statistics."""
  net = BatchNormNet()
  x = jax.random.normal(jax.random.key(0), (B, 4, 4, 3)) * 3 + 1
  labels = jnp.arange(B) % C
  variables = net.init(jax.random.key(1), x, train=False)
  feats = net.apply(variables, x, train=False).features
  teacher, discs = mixskd.SelfTeacher(C), mixskd.FeatureDiscriminators(hidden=4)
  params = {"network": variables["params"],
            "self_teacher": teacher.init(jax.random.key(2), feats)["params"],
            "discriminators": discs.init(jax.random.key(3), [f.mean((1, 2)) for f in feats])[
                "params"]}
  mix = mixskd.sample_mix(jax.random.key(4), B, alpha=0.4)
  rows = mixskd.stack_views(x, mixskd.mix(x, mix))

  def loss_fn(params):
    outputs, state = net.apply({"params": params["network"],
                                "batch_stats": variables["batch_stats"]}, rows, train=True,
                               mutable=["batch_stats"])
    loss, terms = mixskd.mixskd_loss(
        outputs, labels, mix, config=FULL,
        self_teacher=lambda f: teacher.apply({"params": params["self_teacher"]}, f),
        discriminators=lambda p: discs.apply({"params": params["discriminators"]}, p))
    return loss, state["batch_stats"]

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # Mixing keeps the batch mean, so the variance tells the views apart: Flax keeps the
  # biased variance of the rows it normalized.
  conv = lambda images: nn.Conv(8, (3, 3)).apply({"params": params["network"]["conv"]}, images)
  np.testing.assert_allclose(stats["bn"]["var"], 0.9 + 0.1 * conv(rows).var((0, 1, 2)),
                             rtol=1e-5)
  assert not np.allclose(stats["bn"]["var"], 0.9 + 0.1 * conv(x).var((0, 1, 2)), rtol=1e-3)
  assert np.isfinite(float(loss))
  assert float(optax.global_norm(grads["network"])) > 0


def test_trainable_mask_by_paths():
  """Defaults find top-level heads; a nested self-teacher is refused unless its path (or a
  predicate) is given; a wrong path names the top-level keys; booleans for optax.masked."""
  leaf = jnp.zeros(())
  nested = {"model": {"backbone": {"w": leaf}, "self_teacher": {"fc": {"kernel": leaf}}},
            "discriminators": {"disc0": {"fc1": {"kernel": leaf}}}}
  reference = mixskd.ObjectiveConfig.for_variant("reference_cifar")
  with pytest.raises(ValueError, match="model/self_teacher"):
    mixskd.parameter_partition(nested, reference)
  labels = mixskd.parameter_partition(nested, reference, self_teacher=("model", "self_teacher"))
  assert labels == {"model": {"backbone": {"w": "trainable"},
                              "self_teacher": {"fc": {"kernel": "frozen"}}},
                    "discriminators": {"disc0": {"fc1": {"kernel": "frozen"}}}}
  by_predicate = mixskd.parameter_partition(
      nested, reference, self_teacher=lambda path: "self_teacher" in path)
  assert by_predicate == labels
  assert mixskd.trainable_mask(nested, FULL, self_teacher=("model", "self_teacher")) == {
      "model": {"backbone": {"w": True}, "self_teacher": {"fc": {"kernel": True}}},
      "discriminators": {"disc0": {"fc1": {"kernel": False}}}}
  with pytest.raises(ValueError, match="no sub-tree at 'heads/self_teacher'.*'model'"):
    mixskd.parameter_partition(nested, FULL, self_teacher=("heads", "self_teacher"))
  with pytest.raises(ValueError, match="selects no parameter"):
    mixskd.parameter_partition(nested, FULL, self_teacher=lambda path: False)
  flat = {"net": {"w": leaf}, "discriminators": {"w": leaf}}
  assert mixskd.parameter_partition(flat, FULL, self_teacher=None) == {
      "net": {"w": "trainable"}, "discriminators": {"w": "frozen"}}


def test_lam_stays_float32_when_mixing_bfloat16():
  """bf16 features are mixed with the float32 lam that mixed the images (then rounded once)."""
  lam = jnp.float32(0.3337)
  mix = mixskd.MixParams(lam=lam, perm=jnp.array([1, 0], jnp.int32))
  x = jnp.array([[1.0, 2.0], [3.0, -5.0]], jnp.bfloat16)
  want = (lam * x.astype(jnp.float32) + (1 - lam) * x[::-1].astype(jnp.float32))
  np.testing.assert_array_equal(mixskd.mix(x, mix), want.astype(jnp.bfloat16))
  bf16_lam = jnp.bfloat16(lam)
  rounded_first = bf16_lam * x + (1 - bf16_lam) * x[::-1]
  assert not np.array_equal(np.asarray(mixskd.mix(x, mix), np.float32),
                            np.asarray(rounded_first, np.float32))


def test_shape_mistakes_in_the_linen_path_are_one_sentence_naming_the_fix():
  """Heads applied to other widths than they were initialized for, a head factory with the
  wrong class count, heads of different class counts, a self-teacher or discriminators that
  return the wrong shape: each a ValueError saying what to change, never a raw Flax or
  broadcasting error."""
  feats = [jnp.ones((4, 2, 2, 8))] * 2
  teacher = mixskd.SelfTeacher(5)
  teacher_vars = teacher.init(jax.random.key(0), feats)
  with pytest.raises(ValueError, match=r"initialized for heads' features of 16 channels in all, "
                                       r"got 12 \(\[6, 6\]\)"):
    teacher.apply(teacher_vars, [jnp.ones((4, 2, 2, 6))] * 2)
  discs = mixskd.FeatureDiscriminators(hidden=4)
  disc_vars = discs.init(jax.random.key(0), [jnp.ones((4, 8))] * 2)
  for widths in ([6, 6], [8, 8, 8]):
    with pytest.raises(ValueError, match=rf"initialized for 2 heads of \[8, 8\] channels, got "
                                         rf"pooled features of {re.escape(str(widths))}"):
      discs.apply(disc_vars, [jnp.ones((4, w)) for w in widths])

  class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), strides=2)(x)

  wide_head = lambda num_classes, in_features, name: nn.Dense(num_classes + 1, name=name)
  with pytest.raises(ValueError, match="head factory gave 6 outputs for num_classes=5"):
    mixskd.mixskd_network([Stage(), Stage()], 5, head=wide_head).init(
        jax.random.key(0), jnp.ones((2, 8, 8, 1)))

  mix = mixskd.sample_mix(jax.random.key(0), 2, alpha=0.4)
  labels = jnp.array([0, 1])
  good = dict(self_teacher=lambda f: jnp.ones((4, 5)),
              discriminators=lambda p: [jnp.ones((4, 2))] * 2, config=FULL)
  outputs = mixskd.ModelOutputs(logits=(jnp.ones((4, 5)),) * 2, features=tuple(feats))
  mixskd.mixskd_loss(outputs, labels, mix, **good)  # the shapes that fit
  uneven = mixskd.ModelOutputs(logits=(jnp.ones((4, 5)), jnp.ones((4, 6))), features=tuple(feats))
  with pytest.raises(ValueError, match=r"must have one shape \(2B, num_classes\); got "
                                       r"\[\(4, 5\), \(4, 6\)\]"):
    mixskd.mixskd_loss(uneven, labels, mix, **good)
  with pytest.raises(ValueError, match=r"self_teacher returned shape \(4, 7\), expected \(4, 5\)"):
    mixskd.mixskd_loss(outputs, labels, mix, **{**good, "self_teacher": lambda f: jnp.ones((4, 7))})
  with pytest.raises(ValueError, match="discriminators returned 3 arrays for 2 heads"):
    mixskd.mixskd_loss(outputs, labels, mix,
                       **{**good, "discriminators": lambda p: [jnp.ones((4, 2))] * 3})
  with pytest.raises(ValueError,
                     match=r"discriminators returned shape \(4, 3\), expected \(4, 2\)"):
    mixskd.mixskd_loss(outputs, labels, mix,
                       **{**good, "discriminators": lambda p: [jnp.ones((4, 3))] * 2})
