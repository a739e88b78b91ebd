"""The MixSKD objective: every term against a numpy transcription of the spec (§B.3), the
variants' weights, and where gradients flow (§B.4) including the optimizer's partition."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixskd_jax.method import kl_schedule, mixing, objective
from mixskd_jax.method.objective import ObjectiveConfig
from mixskd_jax.method.optimizer import reference_sgd
from mixskd_jax.method.trainable import partitioned
from mixskd_jax.models import FeatureDiscriminators, ModelOutputs, SelfTeacher, build_model

B, C, HEADS, HW, CH = 6, 5, 3, 2, 4
T = 3.0


# ---------------------------------------------------------------- numpy reference of spec B.3
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def np_kl(s, t):
  p = np.exp(np_log_softmax(t / T))
  return (p * (np.log(p) - np_log_softmax(s / T))).sum(-1).mean() * T * T


def np_bce(logits, targets):
  return np.mean(np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits))))


def np_terms(logits, feats, y, lam, perm, st_w, disc_w):
  """Spec B.2-B.3 written out with numpy; self-teacher and discriminators are the linear /
  MLP functions given by st_w = (conv (H*c, c), fc (c, C), fc bias (C,)) and
  disc_w = [(w1, b1, w2, b2)] per head."""
  clean = [z[:B] for z in logits]
  mixed = [z[B:] for z in logits]
  interp = [lam * c + (1 - lam) * c[perm] for c in clean]
  g_clean = [g[:B] for g in feats]
  g_mix = [g[B:] for g in feats]
  g_int = [lam * g + (1 - lam) * g[perm] for g in g_clean]
  teacher = lambda gs: (np.concatenate(gs, -1) @ st_w[0]).mean((1, 2)) @ st_w[1] + st_w[2]
  t_hat, t_tilde = teacher(g_int), teacher(g_mix)
  mix_ce = lambda z: lam * np_ce(z, y) + (1 - lam) * np_ce(z, y[perm])
  target = np.concatenate([np.tile([1.0, 0.0], (B, 1)), np.tile([0.0, 1.0], (B, 1))])
  disc = 0.0
  for (w1, b1, w2, b2), gi, gm in zip(disc_w, g_int, g_mix):
    pooled = np.concatenate([gi.mean((1, 2)), gm.mean((1, 2))])
    disc += np_bce(np.maximum(pooled @ w1 + b1, 0) @ w2 + b2, target)
  return {
      "clean_ce": sum(np_ce(c, y) for c in clean),
      "mixup_ce": sum(mix_ce(m) for m in mixed),
      "self_teacher_ce": mix_ce(t_hat) + mix_ce(t_tilde),
      "kl_self_teacher": np_kl(interp[-1], t_tilde) + np_kl(mixed[-1], t_hat),
      "kl_branches": sum(np_kl(interp[k], mixed[k]) + np_kl(mixed[k], interp[k])
                         for k in range(len(logits) - 1)),
      "feature_mse": sum(((gi - gm) ** 2).mean() for gi, gm in zip(g_int, g_mix)),
      "discriminator": disc,
  }


# ---------------------------------------------------------------- a synthetic H-head "model"
@pytest.fixture(scope="module")
def synthetic():
  rng = np.random.default_rng(0)
  logits = [rng.normal(size=(2 * B, C)).astype(np.float32) * 2 for _ in range(HEADS)]
  feats = [rng.normal(size=(2 * B, HW, HW, CH)).astype(np.float32) for _ in range(HEADS)]
  y = rng.integers(0, C, B)
  perm = rng.permutation(B)
  st = SelfTeacher(C)
  st_vars = st.init(jax.random.key(0), [jnp.asarray(f[:B]) for f in feats])
  disc = FeatureDiscriminators(hidden=7)
  d_vars = disc.init(jax.random.key(1), [jnp.zeros((2 * B, CH))] * HEADS)
  return dict(logits=logits, feats=feats, y=y, perm=perm, lam=0.35, st=st, st_vars=st_vars,
              disc=disc, d_vars=d_vars)


def run_loss(s, config, logits=None, feats=None, st_params=None, d_params=None, perm=None,
             labels=None, self_teacher=None, **kw):
  outputs = ModelOutputs(logits=tuple(map(jnp.asarray, logits or s["logits"])),
                         features=tuple(map(jnp.asarray, feats or s["feats"])))
  mix = mixing.MixParams(lam=jnp.float32(s["lam"]),
                         perm=jnp.asarray(s["perm"] if perm is None else perm, jnp.int32))
  st_params = s["st_vars"]["params"] if st_params is None else st_params
  d_params = s["d_vars"]["params"] if d_params is None else d_params
  return objective.mixskd_loss(
      outputs, jnp.asarray(s["y"] if labels is None else labels), mix,
      self_teacher=self_teacher or (lambda f: s["st"].apply({"params": st_params}, f)),
      discriminators=lambda p: s["disc"].apply({"params": d_params}, p), config=config, **kw)


def numpy_reference(s):
  stp = jax.tree_util.tree_map(np.asarray, s["st_vars"]["params"])
  st_w = (stp["conv"]["kernel"][0, 0], stp["fc"]["kernel"], stp["fc"]["bias"])
  disc_w = [tuple(np.asarray(d[l][k]) for l in ("fc1", "fc2") for k in ("kernel", "bias"))
            for d in (s["d_vars"]["params"][f"disc{k}"] for k in range(HEADS))]
  return np_terms(s["logits"], s["feats"], s["y"], s["lam"], s["perm"], st_w, disc_w)


@pytest.mark.parametrize("jit", [False, True])
def test_terms_match_numpy_transcription_of_spec(synthetic, jit):
  """Each named term, and the loss, equal the spec's formulas."""
  fn = functools.partial(run_loss, synthetic, ObjectiveConfig.for_variant("full"))
  loss, terms = jax.jit(fn)() if jit else fn()
  expected = numpy_reference(synthetic)
  for name in objective.TERMS:
    np.testing.assert_allclose(terms[name], expected[name], rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(loss, sum(expected.values()), rtol=2e-5)
  assert set(terms) == set(objective.TERMS) | {"loss"}


def test_variant_weights(synthetic):
  """reference_cifar leaves out mixup CE and self-teacher CE (still logged); custom weights
  scale their terms; all terms are identical across variants."""
  ref_loss, ref = run_loss(synthetic, ObjectiveConfig.for_variant("reference_cifar"))
  full_loss, full = run_loss(synthetic, ObjectiveConfig.for_variant("full"))
  adv_loss, _ = run_loss(synthetic, ObjectiveConfig.for_variant("adversarial"))
  for name in objective.TERMS:
    np.testing.assert_allclose(ref[name], full[name], rtol=1e-6)
  included = [n for n in objective.TERMS if n not in ("mixup_ce", "self_teacher_ce")]
  np.testing.assert_allclose(ref_loss, sum(ref[n] for n in included), rtol=1e-6)
  np.testing.assert_allclose(full_loss, sum(full[n] for n in objective.TERMS), rtol=1e-6)
  np.testing.assert_allclose(adv_loss, full_loss, rtol=1e-6)
  weights = {"feature_mse": 3.0, "clean_ce": 0.5, "kl_branches": 0.0}
  w_loss, _ = run_loss(synthetic, ObjectiveConfig.for_variant("full", weights=weights))
  expected = sum(full[n] * weights.get(n, 1.0) for n in objective.TERMS)
  np.testing.assert_allclose(w_loss, expected, rtol=1e-6)


def test_temperature_is_a_parameter(synthetic):
  """T changes only the KL terms, as T^2 KL(softmax(t/T) || softmax(s/T))."""
  _, t3 = run_loss(synthetic, ObjectiveConfig.for_variant("full", temperature=3.0))
  _, t1 = run_loss(synthetic, ObjectiveConfig.for_variant("full", temperature=1.0))
  assert not np.isclose(t3["kl_branches"], t1["kl_branches"])
  np.testing.assert_allclose(t3["clean_ce"], t1["clean_ce"])


def test_per_group_permutation_equals_its_global_form(synthetic):
  """Pairs inside mix groups: the objective with a (G, B/G) perm, on outputs laid out per group
  ([clean_0; mixed_0; clean_1; mixed_1]), equals the (B,) global form on [clean; mixed]."""
  s = synthetic
  group_perm = np.array([[1, 2, 0], [0, 2, 1]])
  regroup = lambda rows: [np.asarray(mixing.stack_views(x[:B], x[B:], 2)) for x in rows]
  config = ObjectiveConfig.for_variant("full")
  _, terms_s = run_loss(s, config, perm=group_perm, logits=regroup(s["logits"]),
                        feats=regroup(s["feats"]))
  _, terms_g = run_loss(s, config,
                        perm=np.asarray(mixing.global_permutation(jnp.asarray(group_perm))))
  for name in terms_s:
    np.testing.assert_allclose(terms_s[name], terms_g[name], rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_per_group_lam_is_the_mean_of_independent_groups(synthetic):
  """With one lam per mix group, every term is the mean of the terms each group gives alone
  (its own rows, lam and permutation): what DDP averages over GPUs."""
  s = synthetic
  group_perm, lams = np.array([[1, 2, 0], [0, 2, 1]]), np.array([0.2, 0.9], np.float32)
  config = ObjectiveConfig.for_variant("full")
  outputs = lambda rows: tuple(jnp.asarray(mixing.stack_views(x[:B], x[B:], 2)) for x in rows)
  call = lambda logits, feats, y, lam, perm: objective.mixskd_loss(
      ModelOutputs(logits=logits, features=feats), jnp.asarray(y),
      mixing.MixParams(lam=jnp.asarray(lam), perm=jnp.asarray(perm, jnp.int32)), config=config,
      self_teacher=lambda f: s["st"].apply(s["st_vars"], f),
      discriminators=lambda p: s["disc"].apply(s["d_vars"], p))[1]
  together = call(outputs(s["logits"]), outputs(s["feats"]), s["y"], lams, group_perm)
  half = B // 2
  alone = [call(tuple(jnp.asarray(np.concatenate([x[g * half:(g + 1) * half],
                                                  x[B + g * half:B + (g + 1) * half]]))
                      for x in s["logits"]),
                tuple(jnp.asarray(np.concatenate([x[g * half:(g + 1) * half],
                                                  x[B + g * half:B + (g + 1) * half]]))
                      for x in s["feats"]),
                s["y"][g * half:(g + 1) * half], lams[g], group_perm[g]) for g in range(2)]
  for name in together:
    np.testing.assert_allclose(together[name], (alone[0][name] + alone[1][name]) / 2,
                               rtol=1e-5, err_msg=name)


def grads_by_term(s, term, variant="full", **kw):
  """Gradients of one term alone w.r.t. (logits, features, self-teacher, discriminators)."""
  config = ObjectiveConfig.for_variant(
      variant, weights={t: float(t == term) for t in objective.TERMS}, **kw)
  def f(logits, feats, stp, dp):
    return run_loss(s, config, logits=logits, feats=feats, st_params=stp, d_params=dp)[0]
  return jax.grad(f, argnums=(0, 1, 2, 3))(
      [jnp.asarray(z) for z in s["logits"]], [jnp.asarray(g) for g in s["feats"]],
      s["st_vars"]["params"], s["d_vars"]["params"])


def norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


def test_kl_teacher_sides_get_no_gradient(synthetic):
  """kl_self_teacher: the self-teacher (and through it the features) is a stop-gradient
  teacher. kl_branches: each direction's teacher is detached, so the mixed half's logits of
  head k get gradient only from KL(m_k || sg(z_hat_k)), which we check by value."""
  g_logits, g_feats, g_st, _ = grads_by_term(synthetic, "kl_self_teacher")
  assert norm(g_st) == 0.0 and norm(g_feats) == 0.0
  assert norm(g_logits[-1]) > 0 and norm(g_logits[:-1]) == 0.0
  g_logits, g_feats, g_st, _ = grads_by_term(synthetic, "kl_branches")
  assert norm(g_st) == 0.0 and norm(g_feats) == 0.0 and norm(g_logits[-1]) == 0.0
  # Numerically: the mixed-half gradient equals that of KL(m || const interp) alone.
  s = synthetic
  k, lam, perm = 0, s["lam"], s["perm"]
  clean = jnp.asarray(s["logits"][k][:B])
  interp = lam * clean + (1 - lam) * clean[perm]
  def only_student_side(m):
    from mixskd_jax.method import losses
    return jnp.mean(losses.temperature_kl(m, interp, T))
  expected = jax.grad(only_student_side)(jnp.asarray(s["logits"][k][B:]))
  np.testing.assert_allclose(g_logits[k][B:], expected, rtol=1e-5, atol=1e-8)


def test_feature_mse_pulls_both_views(synthetic):
  """No stop-gradient on either side of the feature MSE."""
  _, g_feats, _, _ = grads_by_term(synthetic, "feature_mse")
  for g in g_feats:
    assert norm(g[:B]) > 0 and norm(g[B:]) > 0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_adversarial_players_have_opposite_signs(synthetic, scale):
  """adversarial: discriminators descend the BCE (a gradient the reversal scale does not
  touch; `full`'s frozen discriminators get none at all) while the features receive the
  negated, scaled gradient of `full`'s BCE: they learn to fool D."""
  _, g_feats_ref, _, g_d_frozen = grads_by_term(synthetic, "discriminator", "full")
  _, g_feats_adv, _, g_d_adv = grads_by_term(synthetic, "discriminator", "adversarial",
                                             gradient_reversal_scale=scale)
  _, _, _, g_d_unit = grads_by_term(synthetic, "discriminator", "adversarial",
                                    gradient_reversal_scale=1.0)
  assert norm(g_d_frozen) == 0.0 and norm(g_d_adv) > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_d_adv,
                         g_d_unit)
  for a, r in zip(g_feats_adv, g_feats_ref):
    assert norm(r) > 0
    np.testing.assert_allclose(a, -scale * r, rtol=1e-5, atol=1e-9)
  # One small step of the discriminators along -grad lowers their BCE: they learn to separate.
  config = ObjectiveConfig.for_variant(
      "adversarial", weights={t: float(t == "discriminator") for t in objective.TERMS})
  d0 = synthetic["d_vars"]["params"]
  d1 = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, d0, g_d_adv)
  assert run_loss(synthetic, config, d_params=d1)[0] < run_loss(synthetic, config, d_params=d0)[0]


def test_config_errors_name_the_field():
  """Bad variants, weights and temperatures are refused with the field's name."""
  with pytest.raises(ValueError, match="variant"):
    ObjectiveConfig.for_variant("paper")
  with pytest.raises(ValueError, match="kl_logits"):
    ObjectiveConfig.for_variant("full", weights={"kl_logits": 1.0})
  with pytest.raises(ValueError, match="temperature"):
    ObjectiveConfig.for_variant("full", temperature=0.0)


# ---------------------------------------------------------------- the real model, one step
@pytest.fixture(scope="module")
def small():
  model = build_model("small_resnet", 10)
  images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
  labels = jnp.arange(8) % 10
  variables = model.init(jax.random.key(1), images)
  mix = mixing.sample_mix(jax.random.key(2), 8, alpha=0.4)
  return model, variables, images, labels, mix


def one_step(small, variant):
  model, variables, images, labels, mix = small
  config = ObjectiveConfig.for_variant(variant)
  params = variables["params"]
  tx = partitioned(reference_sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
                   objective.parameter_partition(params, config))
  @jax.jit
  def step(params):
    grads, aux = jax.grad(lambda p: objective.apply_mixskd(
        model, {**variables, "params": p}, images, labels, mix, config), has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return grads, jax.tree_util.tree_map(lambda p, u: p + u, params, updates), aux
  return step(params)


def changed(before, after):
  return any(not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


# reference_cifar (the subtle one: no gradient and no decay for the self-teacher) stays in the
# default tier; each variant's compile costs seconds.
@pytest.mark.parametrize("variant", [
    v if v == "reference_cifar" else pytest.param(v, marks=pytest.mark.slow)
    for v in objective.VARIANTS])
def test_what_each_variant_trains(small, variant):
  """Self-teacher: exactly zero gradient and zero update (no weight decay either) in
  reference_cifar, trained otherwise. Discriminators: never change except in adversarial.
  Backbone and branches always train."""
  params = small[1]["params"]
  grads, new, (terms, outputs, batch_stats) = one_step(small, variant)
  st_trained = variant != "reference_cifar"
  assert (norm(grads["self_teacher"]) > 0) == st_trained
  assert changed(params["self_teacher"], new["self_teacher"]) == st_trained
  assert changed(params["discriminators"], new["discriminators"]) == (variant == "adversarial")
  for name in ("backbone", "branches_0", "branches_1"):
    assert changed(params[name], new[name])
  assert all(np.isfinite(float(v)) for v in terms.values())
  assert changed(small[1]["batch_stats"], batch_stats)


def test_partition_labels():
  """The partition names exactly the self-teacher / discriminator subtrees as frozen."""
  params = {"backbone": {"w": 0}, "self_teacher": {"conv": {"kernel": 0}},
            "discriminators": {"disc0": {"fc1": {"kernel": 0}}}}
  part = lambda v: objective.parameter_partition(params, ObjectiveConfig.for_variant(v))
  assert part("reference_cifar") == {"backbone": {"w": "trainable"},
                                     "self_teacher": {"conv": {"kernel": "frozen"}},
                                     "discriminators": {"disc0": {"fc1": {"kernel": "frozen"}}}}
  assert part("full")["self_teacher"]["conv"]["kernel"] == "trainable"
  assert part("full")["discriminators"]["disc0"]["fc1"]["kernel"] == "frozen"
  assert part("adversarial")["discriminators"]["disc0"]["fc1"]["kernel"] == "trainable"


def test_apply_mixskd_rejects_mismatched_outputs(synthetic):
  """Outputs that do not cover [clean; mixed] for the labels are refused clearly."""
  s = synthetic
  with pytest.raises(ValueError, match="2B"):
    run_loss(s, ObjectiveConfig.for_variant("full"), logits=[z[:B] for z in s["logits"]])


# ------------------------------------------- research options: KL warm-up and the KL gate
# Off by default; off, every variant traces exactly the operations it traced before them.
class _TinyNet(nn.Module):
  """The MixSKD network protocol (`__call__`, `teach`, `discriminate`) at its smallest: two
  heads of Dense logits on Dense "feature maps" (N, 1, 1, 4), so a step compiles in moments."""
  pooling: str = "spatial_mean"

  def setup(self):
    self.stems = [nn.Dense(4) for _ in range(2)]
    self.heads = [nn.Dense(C) for _ in range(2)]
    self.self_teacher = SelfTeacher(C)
    self.discriminators = FeatureDiscriminators(hidden=3)

  def __call__(self, x, train=True):
    feats = tuple(stem(x.reshape(x.shape[0], -1))[:, None, None, :] for stem in self.stems)
    return ModelOutputs(logits=tuple(h(f[:, 0, 0]) for h, f in zip(self.heads, feats)),
                        features=feats)

  def teach(self, features):
    return self.self_teacher(features)

  def discriminate(self, pooled):
    return self.discriminators(pooled)

  def init_all(self, x):
    outputs = self(x)
    return self.teach(outputs.features), self.discriminate(
        [f.mean((1, 2)) for f in outputs.features])


def _option_config(variant="full", **objective_fields):
  from mixskd_jax import config as config_lib
  config = config_lib.base_config()
  config.objective.variant = variant
  for key, value in objective_fields.items():
    config.objective[key] = value
  return config


@pytest.fixture(scope="module")
def tiny_net():
  from mixskd_jax.method.methods import StepInputs
  model = _TinyNet()
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(B, 4, 4, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, C, B), jnp.int32)
  # Random parameters in init's structure without running init (eager init costs seconds).
  shapes = jax.eval_shape(functools.partial(model.init, method=_TinyNet.init_all),
                          jax.random.key(0), images)
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), shapes)
  inputs = StepInputs(images=images, labels=labels, key=jax.random.key(4),
                      step=jnp.array(7, jnp.int32), batch={"label": labels}, pair_images=None,
                      method_state={})
  return model, variables, inputs


@pytest.mark.parametrize("variant", objective.VARIANTS)
def test_kl_options_off_trace_exactly_todays_objective(tiny_net, variant):
  """With kl_warmup_epochs = 0 and kl_gate = "none" the method's loss and gradients are the
  same program (jaxpr) as the objective called with the variant's weights, as before the
  options: the same operations, so bit-identical values."""
  from mixskd_jax.method import methods
  model, variables, inputs = tiny_net
  method = methods.build_method(_option_config(variant), num_groups=1, steps_per_epoch=3)

  def today(params):  # the MixSKD method before the options existed
    mix = mixing.sample_mix(inputs.key, B, 0.4, 1, lam_per_group=False)
    value, (terms, outputs, stats) = objective.apply_mixskd(
        model, {"params": params}, inputs.images, inputs.labels, mix,
        ObjectiveConfig.for_variant(variant))
    clean = tuple(mixing.split_views(z, 1)[0] for z in outputs.logits)
    return value, (terms, outputs.replace(logits=clean), stats, inputs.method_state)

  now = lambda params: method.loss(model, {"params": params}, inputs)
  trace = lambda f: str(jax.make_jaxpr(jax.value_and_grad(f, has_aux=True))(
      variables["params"]))
  assert trace(now) == trace(today)


def test_kl_warmup_scale_is_the_linear_ramp():
  """min(1, (step / steps_per_epoch) / warmup_epochs): 4 steps an epoch, 2.5 epochs."""
  scale = lambda step: float(kl_schedule.kl_warmup_scale(jnp.int32(step), steps_per_epoch=4,
                                                       warmup_epochs=2.5))
  assert scale(0) == 0.0
  assert scale(5) == 0.5                      # 1.25 epochs of 2.5
  np.testing.assert_allclose(scale(3), 0.3, rtol=1e-7)
  assert scale(10) == 1.0 and scale(37) == 1.0
  with pytest.raises(ValueError, match="warmup_epochs"):
    kl_schedule.kl_warmup_scale(jnp.int32(0), steps_per_epoch=4, warmup_epochs=0.0)


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_term_scales_scale_exactly_the_named_terms(synthetic, factor):
  """`term_scales` multiplies the named terms' weights and nothing else; the logged terms stay
  unweighted."""
  s = synthetic
  config = ObjectiveConfig.for_variant("reference_cifar")
  scales = {t: jnp.float32(factor) for t in objective.KL_TERMS}
  loss, terms = run_loss(s, config, term_scales=scales)
  _, plain = run_loss(s, config)
  for name in objective.TERMS:
    assert terms[name] == plain[name], name
  expected = sum(config.weight(t) * (factor if t in objective.KL_TERMS else 1.0) * plain[t]
                 for t in objective.TERMS)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert set(objective.KL_TERMS) == {t for t in objective.TERMS if t.startswith("kl_")}
  with pytest.raises(ValueError, match="kl_logits"):
    run_loss(s, config, term_scales={"kl_logits": 1.0})


# Hand-made predictions for the gate: the labels never use class C - 1, so a head predicting
# it everywhere has accuracy exactly 0; one predicting each example's own label y_a has the
# lam-weighted accuracy lam + (1 - lam) [y_b = y_a] on every mixed row.
GATE_LABELS = np.array([0, 1, 2, 3, 0, 1])


def _gate_case(s, teacher_good, backbone_good):
  own = 10.0 * np.eye(C, dtype=np.float32)[GATE_LABELS]
  wrong = np.tile(10.0 * np.eye(C, dtype=np.float32)[C - 1], (B, 1))
  teacher = np.concatenate([own if teacher_good else wrong] * 2)  # [interp view; mixup view]
  # Backbone: the clean rows make the interpolated logits, the mixed rows are m_4.
  backbone = np.concatenate([own, own]) if backbone_good else np.concatenate([wrong, wrong])
  logits = [jnp.asarray(z) for z in s["logits"][:-1]] + [jnp.asarray(backbone)]
  return dict(logits=logits, labels=jnp.asarray(GATE_LABELS),
              self_teacher=lambda f: jnp.asarray(teacher))


def test_kl_gate_opens_only_when_the_teacher_is_more_accurate(synthetic):
  """kl_gate="teacher_leads": 1 when the self-teacher's lam-weighted accuracy on the rows
  kl_self_teacher pairs beats the backbone head's, 0 when it is worse or tied; it weighs
  kl_self_teacher and nothing else. "monitor" logs the same gate and never applies it."""
  s = synthetic
  lam, y_b = s["lam"], GATE_LABELS[s["perm"]]
  same = (y_b == GATE_LABELS).astype(np.float64)
  gated = ObjectiveConfig.for_variant("full", kl_gate="teacher_leads")
  plain = ObjectiveConfig.for_variant("full")
  no_st = ObjectiveConfig.for_variant("full", weights={"kl_self_teacher": 0.0})
  grad = lambda cfg, case: jax.grad(lambda z: run_loss(s, cfg, **{**case, "logits": z})[0])(
      case["logits"])

  # The teacher predicts y_a on both views, the backbone a class no label has: gate open.
  case = _gate_case(s, teacher_good=True, backbone_good=False)
  loss, terms = run_loss(s, gated, **case)
  ref_loss, ref_terms = run_loss(s, plain, **case)
  assert float(terms["kl_gate_open"]) == 1.0
  np.testing.assert_allclose(terms["kl_gate/teacher_accuracy"],
                             np.mean(lam + (1 - lam) * same), rtol=1e-6)
  assert float(terms["kl_gate/backbone_accuracy"]) == 0.0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-7)
  for name in objective.TERMS:
    assert terms[name] == ref_terms[name], name

  # The backbone predicts y_a on the mixup rows (y_b on the interpolated ones, lam < 1/2),
  # the teacher a class no label has: gate closed, kl_self_teacher alone leaves the loss.
  assert lam < 0.5
  case = _gate_case(s, teacher_good=False, backbone_good=True)
  loss, terms = run_loss(s, gated, **case)
  assert float(terms["kl_gate_open"]) == 0.0
  assert float(terms["kl_gate/teacher_accuracy"]) == 0.0
  np.testing.assert_allclose(terms["kl_gate/backbone_accuracy"], np.mean((1 + same) / 2),
                             rtol=1e-6)
  assert float(terms["kl_self_teacher"]) > 0  # still logged, unweighted
  np.testing.assert_allclose(loss, run_loss(s, no_st, **case)[0], rtol=1e-7)
  for a, b in zip(grad(gated, case), grad(no_st, case)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  monitor_loss, monitor = run_loss(
      s, ObjectiveConfig.for_variant("full", kl_gate="monitor"), **case)
  assert float(monitor["kl_gate_open"]) == 0.0
  np.testing.assert_allclose(monitor_loss, run_loss(s, plain, **case)[0], rtol=1e-7)

  # Per example: the batch means of the gate's entries and of the loss are mixskd_loss's.
  per_example = objective.mixskd_per_example_terms(
      ModelOutputs(logits=tuple(case["logits"]), features=tuple(map(jnp.asarray, s["feats"]))),
      case["labels"], mixing.MixParams(lam=jnp.float32(lam), perm=jnp.asarray(s["perm"])),
      self_teacher=case["self_teacher"], discriminators=lambda p: s["disc"].apply(s["d_vars"], p),
      config=gated)
  for name in ("kl_gate_open", "kl_gate/teacher_accuracy", "kl_gate/backbone_accuracy", "loss"):
    np.testing.assert_allclose(np.mean(per_example[name]), terms[name], rtol=1e-5, atol=1e-7)

  # Both wrong: a tie, and a tie keeps the gate closed.
  _, terms = run_loss(s, gated, **_gate_case(s, teacher_good=False, backbone_good=False))
  assert float(terms["kl_gate_open"]) == 0.0


def test_method_applies_and_logs_the_options(tiny_net):
  """With kl_warmup_epochs = 2.5 (4 steps an epoch) and kl_gate = "teacher_leads", each step's
  loss is the config weights times the ramp on both KL terms times the gate on
  kl_self_teacher; the ramp, the gate and the two accuracies are among the method's terms,
  which the train step logs as train/<name> (steps.train_step; imported here it would pull in
  TensorFlow through the data package)."""
  from mixskd_jax.method import methods
  model, variables, inputs = tiny_net
  # alpha = 0: lam = 1, which spares compiling the Beta sampler (seconds on CPU).
  config = _option_config("full", kl_warmup_epochs=2.5, kl_gate="teacher_leads", alpha=0.0)
  method = methods.build_method(config, num_groups=1, steps_per_epoch=4)
  obj = methods.objective_config(config)
  loss_at = jax.jit(lambda step: method.loss(model, variables, dataclasses.replace(
      inputs, step=step))[:2])
  for at, ramp in ((0, 0.0), (5, 0.5), (12, 1.0)):
    loss, (terms, *_) = loss_at(jnp.int32(at))
    assert float(terms["kl_warmup_scale"]) == ramp
    teacher, backbone = (float(terms[f"kl_gate/{k}_accuracy"]) for k in ("teacher", "backbone"))
    assert 0.0 <= teacher <= 1.0 and 0.0 <= backbone <= 1.0
    gate = float(terms["kl_gate_open"])
    assert gate == float(teacher > backbone)
    factor = {"kl_branches": ramp, "kl_self_teacher": ramp * gate}
    expected = sum(obj.weight(t) * factor.get(t, 1.0) * float(terms[t]) for t in objective.TERMS)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(terms["loss"]) == float(loss)


def test_config_rules_of_the_options():
  from mixskd_jax import config as config_lib
  config_lib.validate(_option_config(kl_warmup_epochs=0.5, kl_gate="teacher_leads"))
  for field, bad, says in (("kl_warmup_epochs", -1.0, "finite number >= 0"),
                           ("kl_gate", "always", "'teacher_leads'")):
    with pytest.raises(config_lib.ConfigValueError, match=f"objective.{field}.*{says}"):
      config_lib.validate(_option_config(**{field: bad}))
  with pytest.raises(ValueError, match="kl_gate"):
    ObjectiveConfig.for_variant("full", kl_gate="always")
