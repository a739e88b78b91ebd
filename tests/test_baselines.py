"""The baselines' pieces against numpy transcriptions of Self-KD-Lib's formulas (spec §7), and
each baseline method's step: terms, gradients and state behave as the method defines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes
from mixskd_jax.method import baselines, mixing
from mixskd_jax.method import methods
from mixskd_jax.method.methods import StepInputs
from mixskd_jax.models import build_model


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_label_smoothing_matches_self_kd_lib_convention():
  rng = np.random.default_rng(0)
  logits, labels, eps = rng.normal(size=(5, 7)), rng.integers(0, 7, 5), 0.1
  targets = np.full((5, 7), eps / 6)
  targets[np.arange(5), labels] = 1 - eps
  expected = -(targets * np_log_softmax(logits)).sum(-1)
  got = baselines.label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(baselines.smoothed_targets(jnp.asarray(labels), 7, eps).sum(-1),
                             1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_box_follows_the_reference_recipe(seed):
  """Box sides floor(sqrt(1-lam) * side), centre in [0, side), clipped; lam from its area."""
  key = jax.random.key(seed)
  lam = jax.random.uniform(jax.random.key(100 + seed))
  inside, lam_used = baselines.cutmix_box(key, 12, 10, lam)
  key_y, key_x = jax.random.split(key)
  cy, cx = int(jax.random.randint(key_y, (), 0, 12)), int(jax.random.randint(key_x, (), 0, 10))
  cut = np.sqrt(1 - float(lam))
  ch, cw = int(12 * cut), int(10 * cut)
  y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, 12)
  x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, 10)
  expected = np.zeros((12, 10), bool)
  expected[y0:y1, x0:x1] = True
  np.testing.assert_array_equal(inside, expected)
  np.testing.assert_allclose(lam_used, 1 - expected.sum() / 120, rtol=1e-6)


def test_cutmix_images_pastes_the_partner_inside_the_box_only():
  images = jnp.zeros((2, 4, 4, 1))
  partners = jnp.ones((2, 4, 4, 1))
  inside = jnp.zeros((4, 4), bool).at[1:3, 0:2].set(True)
  out = baselines.cutmix_images(images, partners, inside)
  assert float(out.sum()) == 2 * 4
  np.testing.assert_array_equal(out[:, 1:3, 0:2], 1.0)


def test_ps_kd_targets_and_alpha():
  labels = jnp.array([0, 2])
  previous = jnp.array([[0.2, 0.5, 0.3], [0.0, 0.0, 0.0]])  # second row never predicted
  got = baselines.ps_kd_targets(labels, previous, 0.4)
  np.testing.assert_allclose(got[0], 0.6 * np.array([1, 0, 0]) + 0.4 * np.array([0.2, 0.5, 0.3]),
                             rtol=1e-6)
  np.testing.assert_allclose(got[1], [0, 0, 1], rtol=1e-6)
  np.testing.assert_allclose(baselines.ps_kd_alpha(jnp.array(0), 10, 0.8), 0.08, rtol=1e-6)
  np.testing.assert_allclose(baselines.ps_kd_alpha(jnp.array(9), 10, 0.8), 0.8, rtol=1e-6)


def test_byot_terms_and_their_stop_gradients():
  rng = np.random.default_rng(1)
  logits = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(3)]
  feats = [jnp.asarray(rng.normal(size=(3, 2, 2, 5)), jnp.float32) for _ in range(3)]
  labels = jnp.array([0, 3, 1])
  terms = baselines.byot_terms(logits, feats, labels, 4.0)
  ce = sum(-np_log_softmax(np.asarray(z))[np.arange(3), labels] for z in logits)
  t = 4.0
  main = np.exp(np_log_softmax(np.asarray(logits[-1]) / t))
  kl = sum((main * (np.log(main) - np_log_softmax(np.asarray(z) / t))).sum(-1) * t * t
           for z in logits[:2])
  mse = sum(((np.asarray(f) - np.asarray(feats[-1])) ** 2).reshape(3, -1).mean(-1)
            for f in feats[:2])
  np.testing.assert_allclose(terms["cross_entropy"], ce, rtol=1e-5)
  np.testing.assert_allclose(terms["kl"], kl, rtol=1e-4)
  np.testing.assert_allclose(terms["feature_mse"], mse, rtol=1e-5)
  # The main head is only a teacher in the KL and MSE: no gradient reaches it from them.
  grad = jax.grad(lambda z, f: jnp.sum(baselines.byot_terms(
      logits[:2] + [z], feats[:2] + [f], labels, 4.0)["kl"] + baselines.byot_terms(
      logits[:2] + [z], feats[:2] + [f], labels, 4.0)["feature_mse"]), argnums=(0, 1))(
      logits[-1], feats[-1])
  assert float(jnp.abs(grad[0]).sum()) == 0.0 and float(jnp.abs(grad[1]).sum()) == 0.0


def _inputs(batch_size=6, num_examples=12, seed=0, **batch_extra):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch_size, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  batch = {"label": labels, **batch_extra}
  return StepInputs(images=images, labels=labels, key=jax.random.key(seed),
                    step=jnp.array(0, jnp.int32), batch=batch,
                    pair_images=batch_extra.get("pair_image"), method_state={})


def _method(name, **config_overrides):
  config = recipes.with_method(config_lib.base_config(), name)
  for key, value in config_overrides.items():
    config.baselines[key] = value
  model = build_model("small_resnet", 10, mixskd=config.model.mixskd)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  return methods.build_method(config, num_groups=1, steps_per_epoch=2, num_epochs=4), model, \
      variables


@pytest.mark.slow
def test_cross_entropy_and_label_smoothing_at_zero_agree():
  inputs = _inputs()
  ce, model, variables = _method("cross_entropy")
  ls, _, _ = _method("label_smoothing", label_smoothing=0.0)
  a = ce.loss(model, variables, inputs)[0]
  b = ls.loss(model, variables, inputs)[0]
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_mixup_method_feeds_mixed_images_and_mixes_the_labels():
  method, model, variables = _method("mixup")
  inputs = _inputs()
  loss, (terms, outputs, _, _) = method.loss(model, variables, inputs)
  mix_key, _ = jax.random.split(inputs.key)
  mix = mixing.sample_mix(mix_key, 6, 0.4, 1)
  expected_outputs, _ = model.apply(variables, mixing.mix(inputs.images, mix), train=True,
                                    mutable=["batch_stats"])
  np.testing.assert_allclose(outputs.logits[-1], expected_outputs.logits[-1], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(terms["lam"], mix.lam, rtol=1e-6)
  z = np.asarray(expected_outputs.logits[-1])
  labels_b = np.asarray(inputs.labels)[np.asarray(mix.perm)]
  lam = float(mix.lam)
  ce = lambda y: -np_log_softmax(z)[np.arange(6), y]
  np.testing.assert_allclose(loss, np.mean(lam * ce(np.asarray(inputs.labels))
                                           + (1 - lam) * ce(labels_b)), rtol=1e-5)


def test_cutmix_method_lam_is_the_box_area():
  method, model, variables = _method("cutmix")
  _, (terms, _, _, _) = method.loss(model, variables, _inputs(seed=3))
  lam = float(terms["lam"])
  assert 0.0 <= lam <= 1.0
  # Recomputed from an integer box area on 28 x 28.
  assert abs(round((1 - lam) * 784) - (1 - lam) * 784) < 1e-3


def test_cs_kd_partner_gets_no_gradient():
  method, model, variables = _method("cs_kd")
  rng = np.random.default_rng(5)
  pairs = jnp.asarray(rng.normal(size=(6, 28, 28, 1)), jnp.float32)
  inputs = _inputs(pair_image=pairs)

  def loss_with_pairs(p):
    i = StepInputs(**{**inputs.__dict__, "pair_images": p})
    return method.loss(model, variables, i)[0]
  assert float(jnp.abs(jax.grad(loss_with_pairs)(pairs)).sum()) == 0.0
  loss, (terms, _, _, _) = method.loss(model, variables, inputs)
  np.testing.assert_allclose(loss, terms["cross_entropy"] + terms["class_kl"], rtol=1e-6)
  assert float(terms["class_kl"]) > 0
  with pytest.raises(ValueError, match="class_pairs"):
    method.loss(model, variables, _inputs())


def test_ps_kd_reads_last_epoch_then_writes_this_one():
  method, model, variables = _method("ps_kd")
  ids = jnp.array([3, 0, 7, 11, 5, 2], jnp.int32)
  inputs = _inputs(example_id=ids)
  state = method.init_state(12, 10)
  assert state["predictions"].shape == (12, 10)
  inputs = StepInputs(**{**inputs.__dict__, "method_state": state})
  loss, (terms, outputs, _, new_state) = method.loss(model, variables, inputs)
  # First epoch: no predictions yet, so the targets are one-hot and the loss is plain CE.
  z = np.asarray(outputs.logits[-1])
  np.testing.assert_allclose(loss, np.mean(-np_log_softmax(z)[np.arange(6), inputs.labels]),
                             rtol=1e-5)
  table = np.asarray(new_state["predictions"])
  np.testing.assert_allclose(table[np.asarray(ids)], np.exp(np_log_softmax(z)), rtol=1e-5)
  untouched = np.setdiff1d(np.arange(12), np.asarray(ids))
  assert np.all(table[untouched] == 0)
  # A later epoch uses the stored rows with alpha_t.
  later = StepInputs(**{**inputs.__dict__, "method_state": new_state,
                        "step": jnp.array(4, jnp.int32)})
  loss2, (terms2, outputs2, _, _) = method.loss(model, variables, later)
  alpha = 0.8 * 3 / 4
  np.testing.assert_allclose(terms2["alpha_t"], alpha, rtol=1e-6)
  onehot = np.eye(10)[np.asarray(inputs.labels)]
  targets = (1 - alpha) * onehot + alpha * table[np.asarray(ids)]
  z2 = np.asarray(outputs2.logits[-1])
  np.testing.assert_allclose(loss2, np.mean(-(targets * np_log_softmax(z2)).sum(-1)), rtol=1e-5)
  with pytest.raises(ValueError, match="example_ids"):
    method.loss(model, variables, StepInputs(**{**_inputs().__dict__, "method_state": state}))


@pytest.mark.slow
def test_byot_trains_backbone_and_branches_but_not_the_mixskd_heads():
  method, model, variables = _method("byot")
  inputs = _inputs()
  grads = jax.grad(lambda p: method.loss(model, {**variables, "params": p}, inputs)[0])(
      variables["params"])
  partition = method.partition(variables["params"])
  for name in ("self_teacher", "discriminators"):
    assert set(jax.tree_util.tree_leaves(partition[name])) == {"frozen"}
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree_util.tree_leaves(grads[name]))
  for name in ("backbone", "branches_0", "branches_1"):
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads[name]))


@pytest.mark.parametrize("name,field,value,match", [
    ("byot", "model.mixskd", False, "config.model.mixskd=True"),
    ("cross_entropy", "model.mixskd", True, "config.model.mixskd=False"),
    ("ps_kd", "data.example_ids", False, "config.data.example_ids=True"),
    ("cs_kd", "data.class_pairs", False, "config.data.class_pairs=True"),
])
def test_inconsistent_method_config_names_the_field(name, field, value, match):
  config = recipes.with_method(config_lib.base_config(), name)
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(ValueError, match=match):
    methods.check_config(config)


def test_unknown_method_is_refused():
  config = config_lib.base_config()
  config.method = "dino"
  with pytest.raises(ValueError, match="config.method='dino' is unknown"):
    methods.check_config(config)
