"""Every config loads the way `--config=path[:args]` loads it, carries the recipe the spec
gives, and its `:smoke` version trains end to end (CIFAR on tfds mock data).

The configs live in the package, `mixskd_jax/configs/` (so that an installed package, e.g. on
Colab, has them); `configs/*.py` at the repository root re-export them for the commands
`--config=configs/NAME.py`."""

import glob
import os
import re
import shlex
import sys

import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from mixskd_jax import config as config_lib
from mixskd_jax import configs as package_configs
from mixskd_jax.run import command_line
from mixskd_jax.run.loop import train_and_evaluate
from mixskd_jax.train import layout

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG_DIR = os.path.join(REPO, "configs")
PACKAGE_CONFIG_DIR = os.path.join(REPO, "mixskd_jax", "configs")
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def load(name, arg="", config_dir=CONFIG_DIR):
  """The config exactly as `--config=configs/<name>[:arg]` builds it."""
  path = os.path.join(config_dir, name) + (f":{arg}" if arg else "")
  return config_flags.config_flags._ConfigFileParser(name="config").parse(path)


def test_the_expected_configs_exist():
  assert CONFIGS == ["cifar100_resnet18_ce.py", "cifar100_resnet18_mixskd.py",
                     "cifar100_resnet50_ce.py", "cifar100_resnet50_mixskd.py", "default.py",
                     "fashion_mnist_convnext.py", "fashion_mnist_vit.py",
                     "imagenet_resnet50_ce.py", "imagenet_resnet50_mixskd.py"]
  assert [f"{name}.py" for name in package_configs.names()] == CONFIGS


def documented_commands(name: str) -> list[list[str]]:
  """The `python -m mixskd_jax.main ...` commands in config `name`'s docstring (the package's
  module: what an installed package has), as argument lists, continuation lines joined."""
  with open(os.path.join(PACKAGE_CONFIG_DIR, name)) as f:
    doc = f.read().split('"""')[1].replace("\\\n", " ")
  commands = []
  for line in doc.splitlines():
    if "python -m mixskd_jax.main" in line:
      args = shlex.split(line.split("python -m mixskd_jax.main", 1)[1])
      commands.append([a.replace("$(python -m mixskd_jax.configs default)", "configs/default.py")
                       for a in args])
  return commands


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_documents_a_command_that_runs(name, monkeypatch):
  """Each config's docstring gives its command, expected result and cost, and every command
  it shows parses as the command line parses it (config file, ':' tokens, --config.* fields)
  into a config that passes `config.validate`: a renamed field or token breaks this test."""
  with open(os.path.join(PACKAGE_CONFIG_DIR, name)) as f:
    doc = f.read().split('"""')[1]
  assert "Expected" in doc, "the expected result"
  assert "Time" in doc or " min " in doc, "what it costs"
  commands = documented_commands(name)
  assert any(f"--config=configs/{name}" in a for c in commands for a in c), "its own command"
  for args in commands:
    assert any(a.startswith("--workdir=") for a in args), args
    assert command_line.check_command_line(["main", *args]) is None, args
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    monkeypatch.setattr(sys, "argv", ["main", *args])  # config_flags reads its overrides there
    flag_values(sys.argv)
    config_lib.validate(flag_values.config)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_checkouts_configs_are_the_packages(name):
  """configs/NAME.py only re-exports mixskd_jax/configs/NAME.py's get_config (one source), and
  `--config=` builds the same config from either file, arguments included."""
  with open(os.path.join(CONFIG_DIR, name)) as f:
    code = f.read().split('"""')[2]
  statements = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
  assert statements == [f"from mixskd_jax.configs.{name[:-3]} import get_config  # noqa: F401"]
  for arg in ("", "smoke"):
    assert load(name, arg).to_dict() == load(name, arg, PACKAGE_CONFIG_DIR).to_dict()


def test_package_config_paths_work_on_the_command_line(capsys):
  """`mixskd_jax.configs.path(NAME)` (printed by `python -m mixskd_jax.configs NAME`) is a
  file that `--config=` takes, with arguments and overrides checked as for configs/NAME.py."""
  path = package_configs.path("default")
  assert path == package_configs.path("default.py") == os.path.join(PACKAGE_CONFIG_DIR,
                                                                    "default.py")
  assert load("default.py", "smoke", PACKAGE_CONFIG_DIR).num_train_steps == 4
  assert command_line.check_command_line(
      ["main", f"--config={path}:smoke", "--workdir=/tmp/x"]) is None
  message = command_line.check_command_line(["main", f"--config={path}", "--config.batch_sise=8"])
  assert message and "batch_size" in message
  with pytest.raises(ValueError, match="Unknown config 'nope'; the configs are: .*default"):
    package_configs.path("nope")
  from mixskd_jax.configs import __main__ as configs_main  # pylint: disable=import-outside-toplevel
  assert configs_main.main(["configs", "fashion_mnist_vit"]) == 0
  assert capsys.readouterr().out == package_configs.path("fashion_mnist_vit") + "\n"
  assert configs_main.main(["configs"]) == 0
  listed = capsys.readouterr().out.splitlines()
  assert [re.split(r"\s+", line) for line in listed] == [
      [name, package_configs.path(name)] for name in package_configs.names()]


def test_cifar_recipe_is_the_papers():
  c = load("cifar100_resnet18_mixskd.py", "reference_cifar")
  assert (c.model.name, c.data.name, c.batch_size, c.num_epochs) == (
      "cifar_resnet18", "cifar100", 64, 205)
  assert c.objective.variant == "reference_cifar"
  assert (c.objective.alpha, c.objective.temperature) == (0.4, 3.0)
  o = c.optimizer
  assert (o.learning_rate, o.momentum, o.nesterov, o.weight_decay) == (0.1, 0.9, True, 5e-4)
  assert (o.warmup_epochs, o.schedule, tuple(o.milestones), o.decay_factor) == (
      5, "multistep", (100, 150), 0.1)
  assert load("cifar100_resnet18_mixskd.py").objective.variant == "full"
  assert load("cifar100_resnet50_mixskd.py").model.name == "cifar_resnet50"
  assert not load("cifar100_resnet18_ce.py").model.mixskd


def test_imagenet_recipe_is_the_official_run():
  """On the official 8 GPUs: 128 clean images, 16 per device, each device its own mix group,
  lam and BatchNorm group (DDP without SyncBN), lr 0.1."""
  c = layout.resolve(load("imagenet_resnet50_mixskd.py"), num_devices=8)
  assert (c.model.name, c.data.name, c.batch_size, c.num_epochs) == (
      "imagenet_resnet50", "imagenet2012", 128, 305)
  assert (c.objective.alpha, c.objective.variant, c.objective.lam_per_group) == (
      0.2, "full", True)
  assert (c.objective.mix_groups, c.model.batchnorm_groups) == (8, 8)
  o = c.optimizer
  assert (o.learning_rate, o.nesterov, o.weight_decay, o.warmup_epochs, o.schedule) == (
      0.1, False, 1e-4, 5, "cosine")


@pytest.mark.parametrize("devices", [1, 8, 16, 64])
def test_recipes_resolve_on_any_slice(devices):
  """ImageNet keeps 16 per device (lr scaled linearly from 0.1 at 128); CIFAR keeps the
  reference's global 64 with one BatchNorm group, pairs per device while a device holds >= 8
  images; eval batches become multiples of the devices."""
  imagenet = layout.resolve(load("imagenet_resnet50_mixskd.py"), num_devices=devices)
  assert imagenet.batch_size == 16 * devices
  assert imagenet.optimizer.learning_rate == pytest.approx(0.1 * 16 * devices / 128)
  assert imagenet.objective.mix_groups == imagenet.model.batchnorm_groups == devices
  assert imagenet.eval_batch_size % devices == 0 and imagenet.eval_batch_size >= 1000
  cifar = layout.resolve(load("cifar100_resnet18_mixskd.py"), num_devices=devices)
  assert (cifar.batch_size, cifar.optimizer.learning_rate, cifar.model.batchnorm_groups) == (
      64, 0.1, 1)
  assert cifar.objective.mix_groups == min(devices, 8)
  assert cifar.eval_batch_size % devices == 0 and cifar.eval_batch_size >= 500


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="Unknown config argument 'tiny'"):
    load("default.py", "tiny")
  c = load("default.py", "adversarial,smoke")
  assert c.objective.variant == "adversarial" and c.num_train_steps == 4


def test_a_method_token_makes_the_same_recipes_twin():
  """`:cross_entropy` trains the plain backbone with every other setting unchanged."""
  mixskd, ce = load("fashion_mnist_vit.py"), load("fashion_mnist_vit.py", "cross_entropy")
  assert ce.method == "cross_entropy" and not ce.model.mixskd and mixskd.model.mixskd
  ce.method, ce.model.mixskd = mixskd.method, mixskd.model.mixskd
  assert ce.to_dict() == mixskd.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default.py", "cifar100_resnet18_mixskd.py",
                                  "cifar100_resnet18_ce.py"])
def test_smoke_runs_end_to_end(name, tmp_path):
  """The real configs (real models) at smoke size; CIFAR-100 on tfds mock data."""
  config = load(name, "smoke")
  with tfds.testing.mock_data(num_examples=64):
    results = train_and_evaluate(config, str(tmp_path))
  assert results["finished"] and results["final"]["eval/count"] == 40
