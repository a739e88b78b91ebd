"""The front page's examples work as written: the two shortest MixSKD training steps (Linen and
NNX) train, the training and pod commands are commands the trainer accepts, and the notebook
wheel command is the one the notebooks guide gives (the notebook tests build the wheel with it)."""

import jax
import numpy as np
import pytest

from tests.doc_blocks import doc_block
from tests.doc_commands import parse_command, python_commands


def run_block(name):
  namespace = {}
  exec(compile(doc_block("README.md", name), f"README {name}", "exec"), namespace)
  return namespace


def moved(before, after):
  return any(not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


@pytest.mark.slow
def test_quick_linen_step_trains_the_network_and_self_teacher_not_the_discriminators():
  namespace = run_block("quick-linen")
  terms = namespace["terms"]
  assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["mixup_ce"]) > 0
  before = namespace["model"].init(jax.random.key(1), namespace["images"])["params"]
  after = namespace["params"]
  assert moved(before["backbone"], after["backbone"])
  assert moved(before["self_teacher"], after["self_teacher"])
  assert not moved(before["discriminators"], after["discriminators"])


@pytest.mark.slow
def test_quick_nnx_step_trains():
  namespace = run_block("quick-nnx")
  terms = namespace["terms"]
  assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["mixup_ce"]) > 0
  assert namespace["model"](namespace["images"]).logits[-1].shape == (8, 10)


def test_train_commands_are_ones_the_trainer_accepts():
  """Each command's flags parse, through the trainer's own flags, into a config that passes
  the config's checks (the CIFAR recipe, a smoke run with an override)."""
  commands = python_commands(doc_block("README.md", "train"))
  assert len(commands) == 2
  recipe, smoke = (parse_command(words)["config"] for words in commands)
  assert recipe["model"]["name"] == "cifar_resnet18" and recipe["num_epochs"] == 205
  assert smoke["num_train_steps"] > 0 and smoke["objective"]["variant"] == "adversarial"


def test_pod_commands_compile_for_a_slice_then_train_the_same_config():
  """The pre-launch check names a slice and the config the training command then runs (the
  aot command's flags and topology are checked with the others in tests/test_aot.py)."""
  aot, train = python_commands(doc_block("README.md", "pod"))
  assert aot[2] == "mixskd_jax.aot" and train[2] == "mixskd_jax.main"
  config = lambda words: next(w for w in words if w.startswith("--config="))
  assert config(aot) == config(train)
  parsed = parse_command(train)
  assert parsed["flags"]["workdir"].startswith("gs://")
  assert parsed["config"]["batch_size"] == -1  # per device: the same recipe on any slice


def test_notebook_wheel_command_is_the_notebooks_guides():
  """tests/test_notebooks.py builds the wheel with the guide's command."""
  assert doc_block("README.md", "wheel") == doc_block("docs/notebooks.md", "wheel")
