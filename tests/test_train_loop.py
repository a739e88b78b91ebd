"""train_and_evaluate end to end on tiny configs: real data pipeline, sharded steps over the 8
fake devices, checkpoints, metrics, results.json; and the errors a bad config gets."""

import glob
import json
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mixskd_jax import data
from mixskd_jax.config.errors import PreflightError
from mixskd_jax.run.divergence import DivergenceError
from mixskd_jax.run.loop import Trainer, train_and_evaluate
from tests.training_configs import tiny_config


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_fashion_mnist_end_to_end(tmp_path):
  """3 epochs of 4 steps: finite loss, checkpoints at 4/8/12, one eval per epoch, every head
  and the self-teacher evaluated on all 40 test images, results.json complete."""
  workdir = str(tmp_path)
  results = train_and_evaluate(tiny_config(), workdir)
  assert results == read_results(workdir)
  assert results["finished"] and results["step"] == 12 and results["devices"] == 8
  assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")) == [
      4, 8, 12]
  assert [h["step"] for h in results["history"]] == [4, 8, 12]
  final = results["final"]
  assert final["eval/count"] == 40
  for head in ("branch1", "branch2", "backbone", "self_teacher"):
    assert 0 <= final[f"eval/top1/{head}"] <= final[f"eval/top5/{head}"] <= 100
  assert final["eval/top1_max_over_heads_reference_protocol"] == max(
      final[f"eval/top1/{h}"] for h in ("branch1", "branch2", "backbone"))
  assert results["best_backbone_top1"] == max(h["eval/top1/backbone"] for h in results["history"])
  assert math.isfinite(final["eval/loss"])
  assert glob.glob(f"{workdir}/events.out.tfevents.*")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["name"] == "small_resnet"


def test_train_metrics_name_every_term(tmp_path):
  """Every objective term, each head's training accuracy and the learning rate are logged."""
  trainer = Trainer(tiny_config({"num_train_steps": 2}), str(tmp_path))
  trainer.run()
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  for term in ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
               "feature_mse", "discriminator", "loss", "learning_rate", "accuracy/backbone"):
    assert f"train/{term}" in tags, term


@pytest.mark.slow
def test_cifar100_on_mock_data(tmp_path):
  """The CIFAR-100 path (32x32x3, 100 classes) on tfds mock data, plain-CE baseline too."""
  overrides = {"data.name": "cifar100", "num_train_steps": 2, "data.train_examples": None}
  with tfds.testing.mock_data(num_examples=48):
    mixskd = train_and_evaluate(tiny_config(overrides), str(tmp_path / "mixskd"))
    plain = train_and_evaluate(tiny_config({**overrides, "model.mixskd": False}),
                               str(tmp_path / "ce"))
  assert mixskd["finished"] and mixskd["final"]["eval/count"] == 40
  assert plain["method"] == "cross_entropy"
  assert set(k for k in plain["final"] if k.startswith("eval/top1/")) == {"eval/top1/backbone"}


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_only_checkpoints_from_before_it(tmp_path):
  """A learning rate that blows the parameters up stops the run at the first check, by the
  norm guard while the loss is still finite, or as non-finite with the guard off; neither
  saves anything after the last good checkpoint, and the message says which one is kept."""
  workdir = str(tmp_path / "run")
  train_and_evaluate(tiny_config({"num_train_steps": 4}), workdir)
  blow_up = {"num_train_steps": 8, "optimizer.learning_rate": 1e6, "checkpoint_every_steps": 1,
             "log_every_steps": 1, "resume_policy": "allow_changes"}
  with pytest.raises(DivergenceError,
                     match=r"norm grew from .* at step 4 to .* at step 5.*checkpoint 4, saved "
                           r"before it, is kept"):
    train_and_evaluate(tiny_config(blow_up), workdir)
  with pytest.raises(DivergenceError, match=r"(= nan|= inf|norm is (nan|inf)) at step 5"):
    train_and_evaluate(tiny_config({**blow_up, "optimizer.learning_rate": 1e30,
                                    "max_param_norm_ratio": 0.0}), workdir)
  assert [os.path.basename(p) for p in glob.glob(f"{workdir}/checkpoints/*")] == ["4"]
  # config.json still describes checkpoint 4: the original config resumes without a policy.
  assert train_and_evaluate(tiny_config({"num_train_steps": 5}), workdir)["step"] == 5
  fresh = str(tmp_path / "fresh")
  with pytest.raises(DivergenceError, match="no checkpoint was saved before it"):
    train_and_evaluate(tiny_config({**blow_up, "resume_policy": "same_config"}), fresh)


@pytest.mark.parametrize("overrides,message", [
    ({"model.name": "resnet9000"}, "config.model.name = 'resnet9000'"),
    ({"data.name": "svhn"}, "config.data.name"),
    ({"batch_size": 12}, "config.batch_size: 12 does not split evenly over 8 devices"),
    ({"eval_batch_size": 0}, "config.eval_batch_size = 0"),
    ({"model.batchnorm_groups": 3}, "config.model.batchnorm_groups: 3"),
    ({"objective.variant": "paper"}, "config.objective.variant = 'paper'"),
    ({"optimizer.schedule": "linear"}, "config.optimizer.schedule"),
    ({"model.dtype": "float8"}, "config.model.dtype"),
])
def test_bad_configs_are_clear_errors(tmp_path, overrides, message):
  """The run's one check (`preflight.check_run`, the config's door then the device-count
  rules) refuses each before the trainer is built or the workdir written."""
  with pytest.raises(PreflightError, match=message) as error:
    train_and_evaluate(tiny_config(overrides), str(tmp_path / "run"))
  assert isinstance(error.value, ValueError)  # ConfigValueError: what validate raises
  assert not (tmp_path / "run").exists()


def test_missing_data_offline_is_a_clear_error(tmp_path, fashion_mnist_offline):
  data_dir, empty = fashion_mnist_offline
  config = tiny_config({"data.data_dir": data_dir, "data.idx_dir": empty})
  with pytest.raises(data.FashionMNISTMissingError, match="dataset-fashion-mnist"):
    Trainer(config, str(tmp_path / "work"))
