"""The fair transfer protocol (`mixskd_jax.transfer`): the learning-rate sweep against plain
runs, validation splits, BatchNorm re-estimation against hand-computed statistics, composed
segmentation scenes, mean IoU by hand, the choice rule, the whole protocol on real
Fashion-MNIST from a workdir (resumable per task), its command's one-line errors, and the
discriminator input option that this protocol's results motivated."""

import json
import shlex
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mixskd_jax.interop import pretrained
from mixskd_jax.interop import save_converted
from mixskd_jax.method import losses
from mixskd_jax.method.objective import ObjectiveConfig
from mixskd_jax.method.optimizer import reference_sgd
from mixskd_jax.method.schedule import reference_schedule
from mixskd_jax.models.registry import build_model
from mixskd_jax.transfer import backbone, config as transfer_config, protocol, run as transfer_run
from mixskd_jax.transfer import data as transfer_data
from mixskd_jax.transfer import scenes, segmentation, sweep
from tests.test_cli import assert_one_line_error, user_env
from tests.doc_blocks import doc_block
from tests.test_transfer import source_workdir  # noqa: F401  (a pytest fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = sweep.Recipe(epochs=3, batch_size=4, warmup_epochs=1, schedule="cosine", momentum=0.9,
                      nesterov=True, weight_decay=5e-4)


def _linear_loss(params, state, x, y):
  return jnp.mean(jnp.square(x @ params["w"] + params["b"] - y)), state


def test_sweep_equals_one_plain_run_per_learning_rate():
  """K copies at K peak rates (one compiled step) end where K separate optax runs of the
  reference SGD on the reference schedule at those rates end, in the same data order."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  y = rng.normal(size=(10, 2)).astype(np.float32)
  init = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
  rates = np.array([0.0, 0.05, 0.2])
  params, _, step_losses = sweep.train_sweep(
      _linear_loss, sweep.stack_copies(init, 3), {}, x, y, learning_rates=rates, recipe=RECIPE,
      seed=7)
  order = sweep.batch_order(10, RECIPE, 7)
  assert order.shape == (6, 4) and step_losses.shape == (3, 6)
  for e in range(3):  # the trainer's order: epoch e permutes with rng([seed, e]), rest dropped
    np.testing.assert_array_equal(order[2 * e:2 * e + 2].ravel(),
                                  np.random.default_rng([7, e]).permutation(10)[:8])
  for k, rate in enumerate(rates):
    tx = reference_sgd(reference_schedule(base_lr=float(rate), steps_per_epoch=2, num_epochs=3,
                                          warmup_epochs=1, schedule="cosine"),
                       momentum=0.9, nesterov=True, weight_decay=5e-4)
    p, opt = jax.tree.map(jnp.asarray, init), None
    opt = tx.init(p)
    for index in order:
      grads = jax.grad(lambda q: _linear_loss(q, {}, x[index], y[index])[0])(p)
      updates, opt = tx.update(grads, opt, p)
      p = optax.apply_updates(p, updates)
    for name in init:
      np.testing.assert_allclose(params[name][k], p[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(params["w"][0], init["w"])  # rate 0: not even decay moves it
  assert not np.allclose(params["w"][2], init["w"])


def test_batch_larger_than_the_data_is_a_clear_error():
  with pytest.raises(ValueError, match="batch_size=4 is larger than the 3 training examples"):
    sweep.batch_order(3, RECIPE, 0)


def test_validation_takes_the_examples_after_the_trained_ones_in_every_class():
  labels = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0])
  # Trained: the first 2 of each class (0, 2 and 1, 4); validation: the next 2 of each.
  np.testing.assert_array_equal(
      transfer_data.validation_indices(labels, 2, after=2, per_class=2), [3, 5, 6, 7])
  with pytest.raises(ValueError, match="validation_examples_per_class=3: class 1 has 4 "
                     "training-split examples, fewer than the 2 trained on plus 3"):
    transfer_data.validation_indices(labels, 2, after=2, per_class=3)


def test_reestimated_statistics_are_the_data_statistics():
  """The stem BatchNorm (whose input does not depend on any statistics) gets exactly the mean
  and unbiased variance of the stem convolution's output over all rows, whether the rows go
  through in one chunk or in unequal ones; parameters do not change."""
  model = backbone.plain_model("small_resnet", 3)
  zero = backbone.plain_model("small_resnet", 3, bn_momentum=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(10, 8, 8, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), x[:1])
  _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
  conv = np.asarray(inter["intermediates"]["stem"]["conv1"]["__call__"][0], np.float64)
  rows = conv.reshape(-1, conv.shape[-1])
  for chunk in (10, 5):  # one chunk; two equal chunks (the mean of their statistics)
    out = backbone.reestimate_batch_stats(zero, variables, x, chunk=chunk)
    stem = out["batch_stats"]["stem"]["bn1"]
    np.testing.assert_allclose(stem["mean"], rows.mean(0), rtol=1e-4, atol=1e-5)
    if chunk == 10:
      np.testing.assert_allclose(stem["var"], rows.var(0, ddof=1), rtol=1e-4)
    else:
      halves = rows.reshape(2, -1, rows.shape[-1])
      np.testing.assert_allclose(stem["var"], halves.var(1, ddof=1).mean(0), rtol=1e-4)
    jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])
  assert not np.allclose(stem["var"], variables["batch_stats"]["stem"]["bn1"]["var"])


SPEC = scenes.SceneSpec(size=32, min_items=1, max_items=3, min_scale=0.5, max_scale=1.0,
                        foreground_threshold=40)


def test_scenes_are_deterministic_and_labels_follow_the_pasted_items():
  rng = np.random.default_rng(0)
  items = rng.integers(0, 256, size=(6, 12, 12, 1)).astype(np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2])
  canvases, masks = scenes.compose(items, labels, count=5, spec=SPEC, seed=3)
  again, masks_again = scenes.compose(items, labels, count=5, spec=SPEC, seed=3)
  np.testing.assert_array_equal(canvases, again)
  np.testing.assert_array_equal(masks, masks_again)
  other, _ = scenes.compose(items, labels, count=5, spec=SPEC, seed=4)
  assert not np.array_equal(canvases, other)
  assert canvases.shape == (5, 32, 32, 1) and canvases.dtype == np.uint8
  assert masks.shape == (5, 32, 32) and set(np.unique(masks)) <= {0, 1, 2, 3}
  # Foreground pixels carry an item's value at or above the threshold; background stays black.
  assert np.all(canvases[..., 0][masks > 0] >= 40)
  assert np.all(canvases[..., 0][masks == 0] == 0)


def test_one_item_at_scale_one_is_pasted_exactly():
  item = np.zeros((1, 4, 4), np.uint8)
  item[0, 1:3, 1:3] = 200
  spec = scenes.SceneSpec(size=6, min_items=1, max_items=1, min_scale=1.0, max_scale=1.0,
                          foreground_threshold=1)
  canvas, mask = scenes.compose(item, np.array([4]), count=1, spec=spec, seed=0)
  assert canvas.sum() == 4 * 200 and np.all(mask[canvas[..., 0] == 200] == 5)
  assert np.count_nonzero(mask) == 4


def test_bilinear_resize_matches_jax_when_enlarging():
  image = np.random.default_rng(2).uniform(0, 255, size=(7, 7))
  ours = scenes.resize_bilinear(image, 11)
  theirs = np.asarray(jax.image.resize(jnp.asarray(image), (11, 11), "bilinear"))
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)


def test_mean_iou_by_hand():
  target = np.array([[0, 0, 1], [1, 2, 2]])
  predicted = np.array([[0, 1, 1], [1, 2, 0]])
  # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
  np.testing.assert_allclose(segmentation.iou_per_class(
      segmentation.confusion_matrix(predicted, target, 4)), [100 / 3, 200 / 3, 50, np.nan])
  assert segmentation.mean_iou(predicted, target, 4) == pytest.approx(50.0)
  assert segmentation.mean_iou(target, target, 3) == 100.0


def test_choose_prefers_metric_then_loss_then_the_first():
  grid = [{"val_metric": 80.0, "val_loss": 0.5}, {"val_metric": 90.0, "val_loss": 0.7},
          {"val_metric": 90.0, "val_loss": 0.4}, {"val_metric": 90.0, "val_loss": 0.4}]
  assert protocol.choose(grid) is grid[2]
  with pytest.raises(ValueError, match="no setting"):
    protocol.choose([])


def test_segmentation_network_shapes_and_backbone_tree():
  net = segmentation.SegmentationNetwork(backbone.plain_model("small_resnet", 3), 4, 8)
  variables = net.init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)))
  assert set(variables["params"]) == {"backbone", "decoder"}
  plain = build_model("small_resnet", 3, mixskd=False).init(jax.random.key(0),
                                                            jnp.zeros((1, 32, 32, 1)))
  assert (jax.tree.structure(variables["params"]["backbone"])
          == jax.tree.structure(plain["params"]))
  assert net.apply(variables, jnp.zeros((2, 32, 32, 1))).shape == (2, 32, 32, 4)


def tiny_transfer_config(source: str) -> ml_collections.ConfigDict:
  """The protocol on 3 Fashion-MNIST classes, 6 training and 4 validation images each, 40
  test images, 2 learning rates, 2 epochs: seconds per task."""
  c = transfer_config.get_config()
  c.init_from.path = source
  c.data.classes = (5, 7, 9)
  c.data.train_examples_per_class = 6
  c.data.validation_examples_per_class = 4
  c.data.test_examples = 40
  for task in ("linear_probe", "fine_tune", "segmentation"):
    c[task].recipe.epochs = 2
    c[task].recipe.batch_size = 4
    c[task].recipe.warmup_epochs = 1
    c[task].learning_rates = (0.01, 0.1)
  c.segmentation.canvas_size = 32
  c.segmentation.train_canvases = 8
  c.segmentation.validation_canvases = 4
  c.segmentation.test_canvases = 6
  return c


def test_the_protocol_from_a_workdir_chooses_on_validation_and_resumes(source_workdir,  # noqa: F811
                                                                       tmp_path):
  config = tiny_transfer_config(source_workdir)
  out = str(tmp_path / "transfer")
  results = transfer_run.run_transfer(config, out, log=lambda _: None)
  assert set(results["tasks"]) == {"linear_probe", "fine_tune", "segmentation"}
  for name, bn_modes in (("linear_probe", ("source", "reestimated")),
                         ("fine_tune", ("source", "reestimated", "batch")),
                         ("segmentation", ("source", "reestimated"))):
    r = results["tasks"][name]
    assert [(g["bn"], g["lr"]) for g in r["grid"]] == [(b, lr) for b in bn_modes
                                                       for lr in (0.01, 0.1)]
    best = protocol.choose(r["grid"])
    assert r["chosen"] == {"bn": best["bn"], "lr": best["lr"]}
    assert 0.0 <= r["test_metric"] <= 100.0
  trained = pretrained.load_trained(source_workdir)
  norms = results["diagnostics"]["weight_norm"]
  stem = trained.variables["params"]["stem"]["conv1"]["kernel"]
  assert norms["stem"] == pytest.approx(float(np.linalg.norm(stem)), rel=1e-6)
  assert set(results["diagnostics"]["feature_rms"]) == {"layer1", "layer2", "layer3", "pooled"}

  # A finished task is read back, not run again.
  with open(os.path.join(out, "fine_tune.json")) as f:
    saved = json.load(f)
  saved["test_metric"] = -1.0
  with open(os.path.join(out, "fine_tune.json"), "w") as f:
    json.dump(saved, f)
  again = transfer_run.run_transfer(config, out, log=lambda _: None)
  assert again["tasks"]["fine_tune"]["test_metric"] == -1.0


def test_a_fine_tuned_segmentation_backbone_and_bad_modes(source_workdir, tmp_path):  # noqa: F811
  config = tiny_transfer_config(source_workdir)
  config.tasks = ("segmentation",)
  config.segmentation.frozen_backbone = False
  config.segmentation.bn_modes = ("batch",)
  config.segmentation.learning_rates = (0.05,)
  result = transfer_run.run_transfer(config, str(tmp_path / "seg"), log=lambda _: None)
  assert result["tasks"]["segmentation"]["chosen"] == {"bn": "batch", "lr": 0.05}
  config.segmentation.frozen_backbone = True  # a frozen backbone has no "batch" mode
  with pytest.raises(transfer_run.TransferConfigError,
                     match=r"config.segmentation.bn_modes=\('batch',\) must name one or more "
                     r"of \('source', 'reestimated'\)"):
    transfer_run.run_transfer(config, str(tmp_path / "bad"), log=lambda _: None)


@pytest.mark.parametrize("field,value,message", [
    ("tasks", ("probe",), r"config.tasks=\('probe',\) must name one or more of"),
    ("fine_tune.learning_rates", (0.1, -1.0),
     r"config.fine_tune.learning_rates\[1\]=-1.0 must be a positive number"),
    ("linear_probe.recipe.batch_size", 0,
     r"config.linear_probe.recipe.batch_size=0 must be a positive integer"),
    ("segmentation.min_items", 5, r"config.segmentation: scenes: need 1 <= min_items"),
])
def test_config_errors_name_the_field(field, value, message):
  config = tiny_transfer_config("/nowhere")
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(transfer_run.TransferConfigError, match=message):
    transfer_run.run_transfer(config, "/nowhere/out", log=lambda _: None)


def _command(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=user_env(),
                        capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


def test_bad_init_from_is_one_line_and_status_2_in_both_commands(tmp_path,
                                                                 source_workdir):  # noqa: F811
  """A missing source, in the transfer command and in the trainer; a backbone that does not
  fit: 3-channel CIFAR ResNet-18 weights for 1-channel Fashion-MNIST (transfer command), a
  small_resnet checkpoint for a cifar_resnet18 run (trainer)."""
  missing_message = ("does not exist; pass a training workdir, one of its checkpoints/<step> "
                     "directories, or a directory written by `python -m mixskd_jax.interop`.")
  nowhere = str(tmp_path / "nowhere")
  line = assert_one_line_error(*_command("mixskd_jax.transfer", f"--init_from={nowhere}",
                                         f"--workdir={tmp_path / 'out'}"), f"{nowhere!r}")
  assert line.endswith(missing_message)
  line = assert_one_line_error(*_command(
      "mixskd_jax.main", "--config=configs/default.py", f"--workdir={tmp_path / 'run'}",
      "--config.model.mixskd=False", f"--config.init_from.path={nowhere}"), f"{nowhere!r}")
  assert line.endswith(missing_message)
  wrong_model = assert_one_line_error(*_command(
      "mixskd_jax.main", "--config=configs/default.py", f"--workdir={tmp_path / 'run2'}",
      "--config.model.mixskd=False", "--config.model.name=cifar_resnet18",
      f"--config.init_from.path={source_workdir}"), "config.init_from.path=")
  assert wrong_model.endswith("set config.model.name='small_resnet'.")
  # A backbone trained on 3-channel images (CIFAR ResNet-18) cannot read Fashion-MNIST's one.
  rgb = str(tmp_path / "rgb")
  shapes = jax.eval_shape(build_model("cifar_resnet18", 10, mixskd=False).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  save_converted(rgb, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                 model_name="cifar_resnet18", num_classes=10, mixskd=False, source="r18.pth")
  assert_one_line_error(*_command("mixskd_jax.transfer", f"--init_from={rgb}",
                                  f"--workdir={tmp_path / 'out2'}"),
                        f"config.init_from.path={rgb!r}: params/stem/conv1/kernel is "
                        "(3, 3, 3, 64) in the checkpoint and (3, 3, 1, 64) in the model")


def test_unit_pooled_discriminator_input_ignores_feature_scale():
  """With "unit_pooled" a frozen discriminator's BCE is the same for features scaled by any
  positive factor (it cannot reward larger features); with the reference's "pooled" it is
  not. unit_rows: unit norms, zero rows stay zero with a finite gradient."""
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(6, 4)), rng.normal(size=(4, 2))
  d = lambda p: jnp.maximum(p @ w1, 0) @ w2
  interp, mixed = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
  bce = lambda a, b: float(jnp.mean(losses.discriminator_bce(d(a), d(b))))
  unit = losses.unit_rows
  assert bce(unit(3 * interp), unit(3 * mixed)) == pytest.approx(bce(unit(interp), unit(mixed)),
                                                                 rel=1e-5)
  assert bce(3 * interp, 3 * mixed) != pytest.approx(bce(interp, mixed), rel=1e-3)
  np.testing.assert_allclose(np.linalg.norm(unit(interp), axis=-1), 1.0, rtol=1e-6)
  x = jnp.zeros((2, 3)).at[0].set(jnp.array([3.0, 4.0, 0.0]))
  np.testing.assert_allclose(unit(x), [[0.6, 0.8, 0.0], [0, 0, 0]], rtol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(unit(v) * jnp.arange(3.0)))(x)
  assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0)
  assert ObjectiveConfig.for_variant("full").discriminator_input == "pooled"
  with pytest.raises(ValueError, match="discriminator_input='scaled' is unknown"):
    ObjectiveConfig.for_variant("full", discriminator_input="scaled")


def test_documented_transfer_command_runs_end_to_end(tmp_path, source_workdir):  # noqa: F811
  """docs/checkpoints.md's command, on the test's source and shrunk by --config flags (the sizes of
  `tiny_transfer_config`, the fine-tuning task alone: the in-process test above runs every
  task): exit 0, the task's file, and a summary line on stdout."""
  words = shlex.split(doc_block("docs/checkpoints.md", "transfer").strip())
  assert words[:3] == ["python", "-m", "mixskd_jax.transfer"]
  flags = {w.split("=", 1)[0]: w for w in words[3:]}
  assert set(flags) == {"--init_from", "--workdir"}
  out = tmp_path / "transfer"
  tiny = tiny_transfer_config(source_workdir)
  shrink = [f"--config.{k}={v}" for k, v in (
      ("tasks", "('fine_tune',)"), ("data.classes", "(5,7,9)"), ("data.train_examples_per_class", 6),
      ("data.validation_examples_per_class", 4), ("data.test_examples", 40),
      ("segmentation.canvas_size", 32), ("segmentation.train_canvases", 8),
      ("segmentation.validation_canvases", 4), ("segmentation.test_canvases", 6))]
  for task in ("linear_probe", "fine_tune", "segmentation"):
    shrink += [f"--config.{task}.recipe.epochs=2", f"--config.{task}.recipe.batch_size=4",
               f"--config.{task}.recipe.warmup_epochs=1",
               f"--config.{task}.learning_rates=(0.01,0.1)"]
  code, stdout, stderr = _command("mixskd_jax.transfer", f"--init_from={source_workdir}",
                                  f"--workdir={out}", *shrink)
  assert code == 0, stderr[-3000:]
  for name in ("fine_tune", "diagnostics", "results"):
    assert (out / f"{name}.json").exists(), name
  assert not (out / "linear_probe.json").exists()
  with open(out / "results.json") as f:
    results = json.load(f)
  assert stdout.splitlines()[0] == transfer_run.summary_line(results)
  assert [(g["bn"], g["lr"]) for g in results["tasks"]["fine_tune"]["grid"]] == [
      (b, lr) for b in tiny.fine_tune.bn_modes for lr in (0.01, 0.1)]
