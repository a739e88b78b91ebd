"""Transfer learning in the trainer: `config.data.classes` (a relabeled class subset of the real
Fashion-MNIST), `config.init_from` from a training workdir, one of its steps and a converted
checkpoint (the backbone copied leaf by leaf, the head fresh, a wrong model refused in one
line), the linear probe (backbone parameters and BatchNorm statistics bit-identical after
training, the head trained), fine-tuning, resuming a fine-tune run, and
`config.eval_on_train_set` against a hand-computed accuracy."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from mixskd_jax import data
from mixskd_jax.data import sources
from mixskd_jax.interop import pretrained
from mixskd_jax.interop import save_converted
from mixskd_jax.models.registry import build_model
from mixskd_jax.run.loop import Trainer
from mixskd_jax.store import workdir as workdir_lib
from mixskd_jax.store.checkpoint import Checkpoints
from mixskd_jax.train import builder, layout, sharding
from mixskd_jax.train.state import TrainState
from tests.doc_blocks import doc_block
from tests.training_configs import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = np.zeros((1, 28, 28, 1), np.float32)  # Fashion-MNIST's shape, for model.init
SOURCE_CLASSES = 10


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def random_variables(num_classes: int, mixskd: bool, seed: int) -> dict:
  """small_resnet's variables with random values, scaled like a trained network's (numpy; no
  init compiled): BatchNorm statistics away from their initial mean 0 / var 1, so that a
  copied leaf cannot pass for a fresh one."""
  model = build_model("small_resnet", num_classes, mixskd=mixskd)
  shapes = flat(jax.eval_shape(model.init, jax.random.key(0), IMAGE))
  rng = np.random.default_rng(seed)

  def value(name, shape):
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":  # fan-in scaled, so activations stay O(1) through the stages
      return rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    if leaf in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.0, 0.1, shape)  # bias, mean
  return traverse_util.unflatten_dict(
      {k: value(k, s.shape).astype(s.dtype) for k, s in shapes.items()}, sep="/")


@pytest.fixture(scope="module")
def source_workdir(tmp_path_factory):
  """A training workdir of ours holding a plain small_resnet (10 classes) at step 1: its
  TrainState saved by the trainer's Checkpoints (verified digest) and its config.json."""
  workdir = tmp_path_factory.mktemp("source")
  state = TrainState.create(random_variables(SOURCE_CLASSES, False, seed=1), optax.sgd(0.1))
  checkpoints = Checkpoints(str(workdir), keep=1)
  checkpoints.save(1, state)
  checkpoints.close()
  workdir_lib.write_json(workdir_lib.resolve(str(workdir)) / "config.json",
                         tiny_config({"model.mixskd": False}).to_dict())
  return str(workdir)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
  """What `python -m mixskd_jax.interop` writes for an official MixSKD checkpoint."""
  out = str(tmp_path_factory.mktemp("converted") / "r")
  save_converted(out, random_variables(SOURCE_CLASSES, True, seed=2), model_name="small_resnet",
                 num_classes=SOURCE_CLASSES, mixskd=True, source="resnet.pth.tar")
  return out


def assert_backbone_copied(new, fresh, source_backbone, *, mixskd):
  """Every backbone leaf (head excepted) equals the source's, bit for bit; every other leaf
  (the head, a MixSKD network's branches, self-teacher, discriminators) is the fresh one."""
  src, out, init = flat(source_backbone), flat(new), flat(fresh)
  assert out.keys() == init.keys()
  prefix = "backbone/" if mixskd else ""
  copied = 0
  for name, value in out.items():
    collection, path = name.split("/", 1)
    inner = path[len(prefix):] if path.startswith(prefix) else None
    if inner is not None and not inner.startswith("fc/"):
      np.testing.assert_array_equal(value, src[f"{collection}/{inner}"], err_msg=name)
      copied += 1
    else:
      np.testing.assert_array_equal(value, init[name], err_msg=name)
  assert copied == len([k for k in src if "/fc/" not in k])


# ---------------------------------------------------------------------------------------------
# Class subsets.

def test_class_subset_is_relabeled_in_both_splits():
  """classes=(7, 2): the examples of those classes, in stored order, relabeled 0 and 1; the
  per-class subset takes the first n of each; the model gets a 2-way head; the train-set
  evaluation visits exactly the trained examples, unaugmented."""
  everything = tiny_config({"data.train_examples": None, "data.test_examples": None})
  subset = tiny_config({"data.train_examples": None, "data.test_examples": None,
                        "data.classes": (7, 2)})
  for split, per_class in (("train", 6000), ("test", 1000)):
    all_images, all_labels = sources.load_split(everything.data, split)
    images, labels = sources.load_split(subset.data, split)
    where = np.flatnonzero((all_labels == 7) | (all_labels == 2))
    np.testing.assert_array_equal(images, all_images[where])
    np.testing.assert_array_equal(labels, np.where(all_labels[where] == 7, 0, 1))
    assert np.bincount(labels).tolist() == [per_class, per_class]
  info = data.get_dataset_info(subset.data)
  assert (info.num_classes, info.num_train, info.num_test) == (2, 12000, 2000)

  few = tiny_config({"data.train_examples": None, "data.classes": (7, 2),
                     "data.train_examples_per_class": 5, "eval_batch_size": 8})
  images, labels, keep = sources.train_examples(few.data)
  assert np.bincount(labels[keep]).tolist() == [5, 5]
  assert data.get_dataset_info(few.data).num_train == 10
  batches = list(data.train_eval_iterator(few))
  assert [int(b["mask"].sum()) for b in batches] == [8, 2]
  np.testing.assert_array_equal(np.concatenate([b["image"][b["mask"]] for b in batches]),
                                images[keep])
  np.testing.assert_array_equal(np.concatenate([b["label"][b["mask"]] for b in batches]),
                                labels[keep])


# ---------------------------------------------------------------------------------------------
# Reading trained models and copying their backbone.

def test_converted_mixskd_checkpoint_into_plain_and_mixskd_models(converted_dir):
  """(c) A converted MixSKD network: its `backbone` sub-tree goes into a 3-class plain model's
  whole tree and into a 3-class MixSKD network's `backbone`; heads, branches, self-teacher and
  discriminators stay fresh."""
  trained = pretrained.load_trained(converted_dir)
  assert (trained.model_name, trained.num_classes, trained.mixskd) == ("small_resnet", 10, True)
  source = pretrained.backbone_variables(trained)
  for mixskd in (False, True):
    fresh = random_variables(3, mixskd, seed=3)
    new, what = pretrained.transfer(fresh, trained, mixskd=mixskd, model_name="small_resnet")
    assert_backbone_copied(new, fresh, source, mixskd=mixskd)
    head = new["params"]["backbone"]["fc"] if mixskd else new["params"]["fc"]
    assert head["kernel"].shape == (64, 3)
    assert "\n" not in what and converted_dir in what and "fresh: the head fc" in what
    if mixskd:
      assert "branches_0" in what and "self_teacher" in what


def test_a_different_model_or_head_or_damage_is_a_one_line_error(source_workdir, tmp_path):
  trained = pretrained.load_trained(source_workdir)
  assert not trained.mixskd and trained.num_classes == 10
  resnet18 = jax.eval_shape(build_model("cifar_resnet18", 3, mixskd=False).init,
                            jax.random.key(0), IMAGE)
  with pytest.raises(pretrained.PretrainedError) as error:
    pretrained.transfer(resnet18, trained, mixskd=False, model_name="cifar_resnet18")
  message = str(error.value)
  assert "\n" not in message
  assert re.search(r"params/layer1/block0/\w+/\w+ is \([\d, ]+\) in the checkpoint and "
                   r"\([\d, ]+\) in the model; the checkpoint is small_resnet, "
                   r"config.model.name is cifar_resnet18: set "
                   r"config.model.name='small_resnet'\.$", message), message

  with pytest.raises(pretrained.PretrainedError, match=r"params/fc/bias is \(10,\) in the "
                     r"checkpoint and \(3,\) in the model; the checkpoint has 10 classes: set "
                     r"config.init_from.keep_head=False"):
    pretrained.transfer(random_variables(3, False, seed=3), trained, mixskd=False,
                        model_name="small_resnet", keep_head=True)

  damaged = tmp_path / "damaged"
  shutil.copytree(source_workdir, damaged)
  chunk = max(glob.glob(f"{damaged}/checkpoints/1/default/**/d/*", recursive=True),
              key=os.path.getsize)
  data_bytes = bytearray(open(chunk, "rb").read())
  data_bytes[len(data_bytes) // 2] ^= 0x10
  open(chunk, "wb").write(bytes(data_bytes))
  with pytest.raises(pretrained.PretrainedError, match=r"checkpoints/1 is damaged \(.*SHA-256 "
                     r"mismatch\)\); it is not used"):
    pretrained.load_trained(str(damaged))
  assert os.path.isdir(damaged / "checkpoints" / "1")  # someone else's: never moved
  with pytest.raises(pretrained.PretrainedError, match="neither a training workdir"):
    pretrained.load_trained(str(tmp_path))
  step = pretrained.load_trained(os.path.join(source_workdir, "checkpoints", "1"))  # (b)
  assert step.source == trained.source and step.model_name == "small_resnet"
  with pytest.raises(pretrained.PretrainedError, match="does not exist"):  # before any data
    Trainer(probe_config(str(tmp_path / "nowhere")), str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# In the trainer.

def probe_config(source, **overrides):
  """A plain small_resnet on 3 Fashion-MNIST classes, 8 examples each, batches of 8."""
  return tiny_config({"model.mixskd": False, "data.classes": (0, 3, 5),
                      "data.train_examples": None, "data.train_examples_per_class": 8,
                      "batch_size": 8, "eval_batch_size": 16, "num_train_steps": 3,
                      "checkpoint_every_steps": 3, "optimizer.warmup_epochs": 0,
                      "init_from.path": source, **overrides})


def test_linear_probe_from_a_workdir_and_the_train_set_accuracy(source_workdir, tmp_path):
  """(a) freeze_backbone: after 3 steps every backbone parameter and BatchNorm statistic is
  the source's, bit for bit, while the new 3-way head trained; eval_on_train_set records the
  accuracy on the 24 training examples, equal to one computed by hand."""
  config = probe_config(source_workdir, **{"init_from.freeze_backbone": True,
                                           "eval_on_train_set": True})
  trainer = Trainer(config, str(tmp_path / "probe"))
  head_before = jax.device_get(trainer.state.params["fc"])
  source = pretrained.load_trained(source_workdir).variables
  results = trainer.run()
  final = jax.device_get(trainer.state.variables)
  backbone = {k: v for k, v in flat(final).items() if "/fc/" not in k}
  assert backbone.keys() == {k for k in flat(source) if "/fc/" not in k}
  for name, value in backbone.items():  # parameters and batch_stats alike
    np.testing.assert_array_equal(value, flat(source)[name], err_msg=name)
  assert final["params"]["fc"]["kernel"].shape == (64, 3)
  assert not np.array_equal(final["params"]["fc"]["kernel"], head_before["kernel"])

  record = results["history"][-1]
  assert record["train_set/count"] == 24 and record["eval/count"] == 40
  images, labels, keep = sources.train_examples(trainer.config.data)
  logits = trainer.built.model.apply(
      final, data.normalize(images[keep], trainer.info.mean, trainer.info.std),
      train=False).logits[-1]
  correct = int(np.sum(np.argmax(logits, -1) == labels[keep]))
  assert 0 <= record["train_set/top1/backbone"] <= 100
  assert record["train_set/top1/backbone"] == pytest.approx(100.0 * correct / 24, abs=1e-9)


def test_linear_probe_updates_only_the_head_fine_tuning_everything():
  """The built optimizer: with freeze_backbone every parameter but the head `fc` gets an
  exactly zero update (weight decay included), without it every parameter moves; the model
  runs its backbone in inference mode only when frozen."""
  params = random_variables(3, False, seed=4)["params"]
  grads = jax.tree_util.tree_map(np.ones_like, params)
  for freeze in (True, False):
    config = layout.resolve(probe_config(None, **{"init_from.freeze_backbone": freeze}), 8)
    built = builder.build_steps(
        config, sharding.make_mesh(), builder.DataShape(
            num_classes=3, image_shape=(28, 28, 1), mean=(0.5,), std=(0.5,), num_examples=24),
        steps_per_epoch=3, num_epochs=1)
    assert built.model.frozen_backbone is freeze
    updates, _ = jax.jit(built.tx.update)(grads, built.tx.init(params), params)
    for name, update in flat(updates).items():
      moved = bool(np.any(np.asarray(update) != 0))
      assert moved == (not freeze or name.startswith("fc/")), (freeze, name)


@pytest.mark.slow
def test_fine_tune_from_a_step_then_resume_from_its_own_checkpoint(source_workdir, tmp_path,
                                                                    monkeypatch):
  """(b) A step directory; without freezing the backbone trains. The same command again
  resumes from the run's own checkpoint and never reads init_from. (Slow tier: two trainers,
  ~30 s on 2 busy cores.)"""
  config = probe_config(os.path.join(source_workdir, "checkpoints", "1"),
                        **{"num_train_steps": 2, "checkpoint_every_steps": 2})
  workdir = str(tmp_path / "fine_tune")
  trainer = Trainer(config, workdir)
  source = flat(pretrained.load_trained(source_workdir).variables)
  start = flat(trainer.state.variables)
  assert all(np.array_equal(start[k], source[k]) for k in start if "/fc/" not in k)
  trainer.run()
  tuned = flat(trainer.state.variables)
  assert any(not np.array_equal(tuned[k], source[k]) for k in tuned
             if k.startswith("params/layer"))

  def unread(path):
    raise AssertionError(f"a resumed run read init_from ({path})")
  monkeypatch.setattr(pretrained, "load_trained", unread)
  again = Trainer(config, workdir)
  results = again.run()
  assert results["step"] == 2 and results["steps_this_run"] == 0
  resumed = flat(again.state.variables)
  assert all(np.array_equal(resumed[k], tuned[k]) for k in tuned)


# ---------------------------------------------------------------------------------------------
# docs/checkpoints.md's commands.

def test_documented_fine_tune_command_parses_to_a_valid_config():
  """docs/checkpoints.md's linear-probe command: its --config.* flags parse (the tuple included) into a
  config that validates, through ml_collections' own flag parser as `mixskd_jax.main` does."""
  commands = [shlex.split(line) for line in
              doc_block("docs/checkpoints.md", "fine-tune").replace("\\\n", " ").splitlines()
              if line.startswith("python")]
  probe = [c for c in commands if any("freeze_backbone" in a for a in c)][0]
  assert probe[:3] == ["python", "-m", "mixskd_jax.main"]
  flags = [a for a in probe[3:] if a.startswith("--config")]
  code = ("import json, sys\n"
          "from absl import flags\n"
          "from ml_collections import config_flags\n"
          "from mixskd_jax import config as config_lib\n"
          "config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
          "flags.FLAGS(['x'] + sys.argv[1:])\n"
          "config_lib.validate(flags.FLAGS.config)\n"
          "print(json.dumps(flags.FLAGS.config.to_dict()))\n")
  out = subprocess.run([sys.executable, "-c", code, *flags], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  config = json.loads(out.stdout.strip().splitlines()[-1])
  assert config["init_from"]["freeze_backbone"] is True and config["model"]["mixskd"] is False
  assert config["init_from"]["path"] and config["eval_on_train_set"] is True
  assert config["data"]["classes"] == [0, 3, 5]
