"""`config_lib.validate`: every field's type and range is checked up front, in one line that
names the field; `preflight.check_run` and the command refuse a bad value before the workdir or
the dataset is touched; the checkpoint converter refuses --num_classes 0 and NaN weights."""

import importlib
import importlib.util
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from mixskd_jax import config as config_lib
from mixskd_jax import configs
from mixskd_jax.config import check as config_check, choices as config_choices, field_rules
from mixskd_jax.method.methods import METHODS
from mixskd_jax.method.objective import VARIANTS
from mixskd_jax.run import dataset_check, preflight
from tests.test_cli import assert_one_line_error
from tests.test_cli import main as run_command
from tests.training_configs import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_S = 20.0  # the command's config and idx_dir errors, TensorFlow's import included


def with_values(config, **values):
  """A copy of `config` with dotted fields (written with '__' for '.') set to `values`, past
  ml_collections' type checks (as a config built from a dict or loaded from JSON can be)."""
  d = config.to_dict()
  for dotted, value in values.items():
    node = d
    *parents, leaf = dotted.split("__")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return ml_collections.ConfigDict(d)


def refusal(config) -> str:
  with pytest.raises(config_lib.ConfigValueError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "\n" not in message and message.endswith("."), message
  return message


# ---------------------------------------------------------------------------------------------
# The table.

def test_every_leaf_of_base_config_has_a_rule():
  leaves = [path for path, _ in config_check.leaves(config_lib.base_config())]
  assert sorted(field_rules.RULES) == sorted(leaves)  # a rule each, and none for no field


def test_configs_validate_fast_without_jax_or_tensorflow():
  """The config package is the bottom layer: a shipped config loads and passes its one door
  with neither JAX, Flax nor TensorFlow imported."""
  code = ("import sys, time; from mixskd_jax import config as config_lib; "
          "from mixskd_jax.configs import default; t = time.monotonic(); "
          "config_lib.validate(default.get_config('smoke')); print(time.monotonic() - t); "
          "assert not [m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules]")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert float(out) < 0.5


def test_dataset_names_are_the_data_packages():
  """config.choices lists the datasets (the data package imports TensorFlow); they are
  data.SPECS's, read here from datasets.py alone (it imports no TensorFlow either)."""
  name = "_datasets_standalone"
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "mixskd_jax", "data", "datasets.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[name]
  assert config_choices.DATASETS == tuple(module.SPECS)
  assert config_choices.STREAMED_DATASETS == tuple(
      n for n, s in module.SPECS.items() if not s.in_memory)
  assert config_choices.DATASET_CLASSES == {n: s.num_classes for n, s in module.SPECS.items()}


# ---------------------------------------------------------------------------------------------
# Every shipped config passes.

STREAMED_ONLY_REFUSALS = {"cs_kd": "data.class_pairs", "ps_kd": "data.example_ids"}


@pytest.mark.parametrize("name", configs.names())
def test_shipped_configs_validate(name):
  """Every config, plain, `:smoke`, with each variant and each method (also with smoke).
  ImageNet is streamed, so its cs_kd and ps_kd versions are refused (data/streaming.py refuses
  them too, at the first batch)."""
  module = importlib.import_module(f"mixskd_jax.configs.{name}")
  streamed = module.get_config().data.name in config_choices.STREAMED_DATASETS
  for arg in ["", "smoke", *VARIANTS, *METHODS, *(f"{m},smoke" for m in METHODS)]:
    config = module.get_config(arg)
    method = arg.split(",")[0]
    if streamed and method in STREAMED_ONLY_REFUSALS:
      field = STREAMED_ONLY_REFUSALS[method]
      assert refusal(config).startswith(f"config.{field} = True: must be False for the "
                                        "streamed dataset 'imagenet2012'")
    else:
      config_lib.validate(config)


def test_tiny_config_validates():
  config_lib.validate(tiny_config())


# ---------------------------------------------------------------------------------------------
# Bad values: one line that starts with the field and the value.

BAD = [
    ({"batch_size": 0}, "batch_size = 0: must be an int >= 1 (the global clean batch), or -1"),
    ({"batch_size": -8}, "batch_size = -8: must be an int >= 1"),
    ({"batch_size": "8"}, "batch_size = '8': must be an int >= 1"),
    ({"batch_size": 8.5}, "batch_size = 8.5: must be an int"),
    ({"batch_size": True}, "batch_size = True: must be an int"),
    ({"checkpoint_every_steps": 0}, "checkpoint_every_steps = 0: must be an int >= 1"),
    ({"log_every_steps": 0}, "log_every_steps = 0: must be an int >= 1"),
    ({"objective__alpha": -1.0}, "objective.alpha = -1.0: must be a finite number >= 0"),
    ({"optimizer__learning_rate": -0.1}, "optimizer.learning_rate = -0.1: must be a finite "
                                         "number >= 0"),
    ({"optimizer__learning_rate": math.inf}, "optimizer.learning_rate = inf: must be a finite"),
    ({"num_epochs": 0, "num_train_steps": -1}, "num_epochs = 0: must be >= 1 when "
                                               "config.num_train_steps = -1"),
    ({"num_train_steps": 0}, "num_train_steps = 0: must be an int >= 1"),
    ({"eval_every_epochs": 0}, "eval_every_epochs = 0: must be an int >= 1"),
    ({"keep_checkpoints": 0}, "keep_checkpoints = 0: must be an int >= 1"),
    ({"eval_batch_size": 0}, "eval_batch_size = 0: must be an int >= 1"),
    ({"eval_calibration_bins": 0}, "eval_calibration_bins = 0: must be an int >= 1"),
    ({"resume_policy": "bogus"}, "resume_policy = 'bogus': must be one of 'same_config', "
                                 "'allow_changes'"),
    ({"max_param_norm_ratio": 0.5}, "max_param_norm_ratio = 0.5: must be 0 (the norm check "
                                    "off) or a finite number > 1"),
    ({"objective__weights__feature_mse": math.nan}, "objective.weights.feature_mse = nan: must "
                                                    "be a finite number >= 0"),
    ({"objective__weights__clean_ce": -1.0}, "objective.weights.clean_ce = -1.0"),
    ({"objective__temperature": 0.0}, "objective.temperature = 0.0: must be a finite number > 0"),
    ({"optimizer__momentum": 1.0}, "optimizer.momentum = 1.0: must be a finite number in [0, 1)"),
    ({"baselines__label_smoothing": 1.0}, "baselines.label_smoothing = 1.0: must be a finite "
                                          "number in [0, 1)"),
    ({"optimizer__milestones": (150, 100)}, "optimizer.milestones = (150, 100): must be a tuple "
                                            "of strictly increasing ints"),
    ({"model__name": "resnet9000"}, "model.name = 'resnet9000': must be one of "),
    ({"model__dtype": "float8"}, "model.dtype = 'float8': must be one of 'float32', 'bfloat16'"),
    ({"data__name": "svhn"}, "data.name = 'svhn': must be one of 'fashion_mnist', 'cifar10'"),
    ({"method": "dino"}, "method = 'dino': must be one of 'mixskd', "),
    ({"seed": -1}, "seed = -1: must be an int in [0, "),
    ({"data__augment": 1}, "data.augment = 1: must be True or False"),
    ({"batch_size": -1}, "batch_size = -1: means config.per_device_batch_size x devices"),
    ({"batch_size": 64, "per_device_batch_size": 12}, "per_device_batch_size = 12: must divide "
                                                      "config.batch_size = 64"),
    ({"batch_size": 16, "data__train_examples": 8}, "batch_size = 16: must be <= "
                                                    "config.data.train_examples = 8"),
    ({"objective__mix_groups": 3}, "objective.mix_groups = 3: must divide config.batch_size"),
    ({"method": "byot"}, "model.mixskd = False: must be True for config.method = 'byot'"),
    ({"distributed__num_processes": 2, "distributed__process_id": 2},
     "distributed.process_id = 2: must be < config.distributed.num_processes = 2"),
    ({"data__classes": (1, 1)}, "data.classes = (1, 1): must be a non-empty tuple of distinct "
                                "ints >= 0"),
    ({"data__classes": ()}, "data.classes = (): must be a non-empty tuple"),
    ({"data__classes": (0, 10)}, "data.classes = (0, 10): class 10 is out of range, "
                                 "'fashion_mnist' has labels 0..9"),
    ({"data__name": "imagenet2012", "data__classes": (0, 1)},
     "data.classes = (0, 1): must be None for the streamed dataset 'imagenet2012'"),
    ({"data__name": "imagenet2012", "eval_on_train_set": True},
     "eval_on_train_set = True: must be False for the streamed dataset 'imagenet2012'"),
    ({"init_from__path": ""}, "init_from.path = '': must be a training workdir"),
    ({"init_from__freeze_backbone": True}, "init_from.freeze_backbone = True: needs a plain "
                                           "network (config.model.mixskd = False)"),
    ({"init_from__keep_head": True}, "init_from.keep_head = True: needs config.init_from.path"),
]


@pytest.mark.parametrize("values,starts", BAD, ids=[s.split(" = ")[0] + str(i)
                                                    for i, (_, s) in enumerate(BAD)])
def test_bad_values_are_one_line_naming_the_field(values, starts):
  base = tiny_config()
  if values.get("method") == "byot":
    base.model.mixskd = False  # a plain network with a branched method
  message = refusal(with_values(base, **values))
  assert message.startswith("config." + starts), message


@pytest.mark.parametrize("values", [
    {"optimizer__learning_rate": 0.0},             # a frozen run
    {"optimizer__learning_rate": 1},               # an int is a fine float
    {"objective__alpha": 0.0},                     # no mixing (lam = 1), as the reference
    {"baselines__mixup_alpha": 0.0},
    {"num_epochs": 0, "num_train_steps": 4},       # the steps set the length
    {"max_param_norm_ratio": 0.0},                 # the norm check off
    {"objective__weights__clean_ce": None},        # the variant's default
    {"optimizer__milestones": ()},
    {"optimizer__milestones": [30, 60, 90]},       # a list, as from JSON
    {"data__prefetch": -1},                        # tf.data AUTOTUNE
    {"data__device_prefetch": 0},
    {"batch_size": -1, "per_device_batch_size": 4},
    {"distributed__local_device_ids": (0, 1)},
    {"distributed__cpu_collectives": "gloo"},
    {"seed": np.int64(3)},
    {"data__classes": [9, 0]},                     # a list, as from JSON; any order
    {"model__mixskd": False, "init_from__freeze_backbone": True},  # a probe of a random net
    {"init_from__path": "/runs/source", "init_from__keep_head": True},
])
def test_meaningful_values_pass(values):
  config_lib.validate(with_values(tiny_config(), **values))


def test_a_group_replaced_by_a_value_is_refused():
  message = refusal(with_values(tiny_config(), objective__weights=None))
  assert message.startswith("config.objective.weights = None: must be a group of fields")


def test_a_missing_field_is_checked_at_its_default():
  config = tiny_config()
  del config["resume_policy"]
  config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# Preflight and the command.

def test_check_run_refuses_before_the_workdir_and_the_dataset(tmp_path, monkeypatch):
  def untouched(*args, **kwargs):
    raise AssertionError("checked the workdir or dataset of an invalid config")
  monkeypatch.setattr(preflight, "check_workdir", untouched)
  monkeypatch.setattr(dataset_check, "check_dataset", untouched)
  with pytest.raises(preflight.PreflightError) as error:  # what the command catches
    preflight.check_run(tiny_config({"log_every_steps": 0}), str(tmp_path / "run"))
  assert isinstance(error.value, config_lib.ConfigValueError)  # also validate's own type
  assert str(error.value).startswith("config.log_every_steps = 0: must be an int >= 1")
  assert not (tmp_path / "run").exists()


def test_command_refuses_a_bad_value_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  code, out, err, seconds = run_command("--config=configs/default.py", f"--workdir={workdir}",
                                        "--config.batch_size=0", timeout=120,
                                        **{dataset_check.OFFLINE_ENV: "1"})
  line = assert_one_line_error(code, out, err, "config.batch_size = 0: must be an int >= 1")
  assert "batch_size" in line
  assert seconds < FAST_S
  assert not workdir.exists()


# A bad value of each kind: a field's own rule, a rule between fields, an unknown field.
BAD_VALUES = {
    "--config.batch_size=0": "config.batch_size = 0: must be an int >= 1",
    "--config.per_device_batch_size=3": "config.per_device_batch_size = 3: must divide "
                                        "config.batch_size = 128",
    "--config.init_from.keep_head=True": "config.init_from.keep_head = True: needs "
                                         "config.init_from.path",
    "--config.optimizer.schedule=linear": "config.optimizer.schedule = 'linear': must be one of "
                                          "'multistep', 'cosine', 'constant'",
}
# The command, with JAX, Flax and TensorFlow made unimportable: a refusal that needed them
# would end in an ImportError traceback instead of the one line.
_WITHOUT_JAX = """
import sys
class _Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'tensorflow'):
      raise ImportError('imported ' + name + ' before the config was checked')
sys.meta_path.insert(0, _Refuse())
sys.argv = ['mixskd_jax.main'] + sys.argv[1:]
from mixskd_jax import main
main.run()
"""


@pytest.mark.parametrize("flag", sorted(BAD_VALUES))
def test_command_refuses_a_bad_value_before_jax_or_tensorflow(tmp_path, flag):
  """The config's one door answers before JAX or TensorFlow is imported (in ~0.5 s here, where
  importing them took ~9 s before), with one line and exit status 2, the workdir untouched;
  the rule needing the device count (train/layout.py) is the only one that waits for JAX."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_JAX, "--config=configs/default.py",
       f"--workdir={workdir}", flag], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, dataset_check.OFFLINE_ENV: "1"})
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr[-2000:]
  assert result.stderr.startswith(BAD_VALUES[flag]), result.stderr
  assert not workdir.exists()


def test_command_refuses_a_device_count_rule_in_one_line(tmp_path):
  """batchnorm_groups must divide the mix groups, which depend on the devices: checked once
  JAX is up, the same one line and exit status 2."""
  code, out, err, _ = run_command("--config=configs/default.py", f"--workdir={tmp_path / 'run'}",
                                  "--config.model.batchnorm_groups=3", timeout=120,
                                  **{dataset_check.OFFLINE_ENV: "1"})
  assert_one_line_error(code, out, err, "config.model.batchnorm_groups: 3 must be -1 (one per "
                                        "mix group) or a positive divisor of "
                                        "objective.mix_groups=1")


def test_command_refuses_an_idx_dir_without_the_files_at_once(tmp_path):
  """An explicit idx_dir: never a tfds download (224 s of retries offline before), and with
  the network probe not even tried (MIXSKD_ASSUME_OFFLINE unset)."""
  idx_dir, data_dir, workdir = tmp_path / "idx", tmp_path / "tfds", tmp_path / "run"
  idx_dir.mkdir()
  (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(b"")
  code, out, err, seconds = run_command(
      "--config=configs/default.py:smoke", f"--workdir={workdir}",
      f"--config.data.idx_dir={idx_dir}", f"--config.data.data_dir={data_dir}", timeout=120)
  line = assert_one_line_error(code, out, err, f"config.data.idx_dir={idx_dir} lacks "
                                               "train-labels-idx1-ubyte.gz, t10k-images")
  assert "train-images-idx3-ubyte.gz, train-labels" in line  # all 4 in the fix
  assert seconds < FAST_S
  assert not workdir.exists() and not data_dir.exists()


# ---------------------------------------------------------------------------------------------
# The checkpoint converter.

def test_converter_refuses_num_classes_below_one_before_reading(tmp_path, monkeypatch, capsys):
  from mixskd_jax.interop import __main__ as command  # pylint: disable=import-outside-toplevel

  def unread(path):
    raise AssertionError(f"read {path}")
  monkeypatch.setattr(command, "read_state_dict", unread)
  for n in ("0", "-3"):
    monkeypatch.setattr(sys, "argv", ["interop", "--checkpoint", str(tmp_path / "x.npz"),
                                      "--model", "cifar_resnet18", "--num_classes", n,
                                      "--output", str(tmp_path / "out")])
    assert command.run() == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith(f"--num_classes {n}: must be >= 1")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_converter_refuses_non_finite_weights(tmp_path, monkeypatch, capsys, bad):
  from mixskd_jax.interop import __main__ as command  # pylint: disable=import-outside-toplevel
  from mixskd_jax.interop import convert  # pylint: disable=import-outside-toplevel
  weights = {"backbone.conv1.weight": np.ones((64, 3, 3, 3), np.float32),
             "backbone.bn1.num_batches_tracked": np.array(7),
             "backbone.bn1.weight": np.array([1.0, bad, 2.0], np.float32),
             "backbone.bn1.bias": np.array([np.nan], np.float32)}  # not the first bad one
  path = str(tmp_path / "diverged.npz")
  np.savez(path, **weights)
  argv = ["--checkpoint", path, "--model", "cifar_resnet18", "--num_classes", "100",
          "--output", str(tmp_path / "out")]
  with pytest.raises(convert.ConversionRefused, match="'backbone.bn1.weight' .3,. holds"):
    command.main(argv)
  monkeypatch.setattr(sys, "argv", ["interop", *argv])
  assert command.run() == 2
  err = capsys.readouterr().err
  assert err.splitlines() == [err.strip()]
  kind = "1 NaN and 0 infinite" if math.isnan(bad) else "0 NaN and 1 infinite"
  assert f"{kind} of 3 values" in err
  assert not (tmp_path / "out").exists()
