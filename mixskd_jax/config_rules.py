"""What each config field may hold: one rule per leaf of `config_schema.base_config()` (`RULES`),
the rules that tie fields together (`CROSS_RULES`), and `check`, which applies them all (the
kinds of rule: `config_rule_kinds.py`).

A bad value fails here, before any data is read or anything compiled, with one line that names
the field, the value, what is allowed and what to set instead:

  config.batch_size = 0: must be an int >= 1 (the global clean batch), or -1 with
  config.per_device_batch_size set.

instead of a ZeroDivisionError minutes into the run, or silently (a negative learning rate
trains uphill). The ranges follow how the code uses each field (each rule says why where it is
not obvious), so a value the code handles meaningfully is never refused: a learning rate of 0
(a frozen run), mixing alpha 0 (no mixing, lam = 1, as the reference), num_epochs 0 when
num_train_steps sets the length. Field names are `config_schema.unknown_field_error`'s job;
checks that need the device count stay in `train/layout.py`.

Imports only ml_collections and numpy at module level, and JAX/Flax for the model and method
registries when checking: never TensorFlow (the data package imports it, so the dataset names
are listed here; tests/test_config_validation.py checks them against `data.SPECS`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import ml_collections

from mixskd_jax import config_choices
from mixskd_jax.config_rule_kinds import (Rule, choice, flag, integer, is_int, is_number, number,
                                          text)
from mixskd_jax.objective import TERMS


class ConfigValueError(ValueError):
  """A config field holds a value of the wrong type or out of its range. The message is one
  line: the dotted field, the value, what is allowed and what to set."""


# `mixskd_jax.data.SPECS` without importing TensorFlow; the test keeps them equal.
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")
STREAMED_DATASETS = ("imagenet2012",)  # spec.in_memory False: tf.data streams it
# Each dataset's spec.num_classes (config.data.classes indexes them); the test keeps them equal.
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}
RESUME_POLICIES = ("same_config", "allow_changes")  # train/run_guard.py
DISTRIBUTED_MODES = ("auto", "always", "never")  # train/distributed.py
CPU_COLLECTIVES = ("gloo", "mpi", "megascale")  # jax_cpu_collectives_implementation


# ---------------------------------------------------------------------------------------------
# Values of particular fields.

def _increasing_epochs(value: Any) -> bool:
  """Milestones: ints >= 0, strictly increasing (the schedule keys a dict by milestone, so a
  repeated one would decay once where PyTorch's MultiStepLR decays twice)."""
  if not isinstance(value, (tuple, list)) or not all(is_int(m) and m >= 0 for m in value):
    return False
  return all(a < b for a, b in zip(value, value[1:]))


def _device_ids(value: Any) -> bool:
  """jax.distributed.initialize's local_device_ids: an int or distinct ints, all >= 0."""
  ids = [value] if is_int(value) else value
  return (isinstance(ids, (tuple, list)) and len(ids) > 0
          and all(is_int(i) and i >= 0 for i in ids) and len(set(ids)) == len(ids))


def _off_or_above_one(value: Any) -> bool:
  return is_number(value) and (value == 0 or value > 1)


def _class_subset(value: Any) -> bool:
  """data.classes: a non-empty tuple of distinct labels (the range is a cross rule's, once
  the dataset is known)."""
  return (isinstance(value, (tuple, list)) and len(value) > 0
          and all(is_int(c) and c >= 0 for c in value) and len(set(value)) == len(value))


# ---------------------------------------------------------------------------------------------
# One rule per leaf of base_config(), in its order.

_WEIGHT = number(0, "a loss term's weight")
# methods.objective_config drops a None weight, so the variant's default applies.
_OBJECTIVE_WEIGHT = number(0, "a loss term's weight", none_means="the variant's default")

RULES: dict[str, Rule] = {
    # Seeds numpy's Generator, tf's stateless ops and jax.random.key, which takes an int64.
    "seed": integer(0, "seeds the data order, augmentation and initialization",
                    maximum=2**63 - 1),
    "method": choice(config_choices.methods,
                     none_means="mixskd when config.model.mixskd, else cross_entropy"),
    "model.name": choice(config_choices.models),
    "model.mixskd": flag(),
    "model.dtype": choice(config_choices.dtypes),
    "model.discriminator_hidden": integer(1, "hidden units of each discriminator"),
    "model.conv_input_barrier": flag(),
    "model.cpu_convolutions": choice(config_choices.cpu_convolutions),
    "model.remat_branches": flag(),
    "model.batchnorm_groups": integer(1, "row groups of the batch's BatchNorm statistics",
                                      also=(-1,), also_why="one per mix group"),
    "model.batchnorm_running_stats": choice(config_choices.running_stats),
    "data.name": choice(DATASETS),
    "data.data_dir": text("a directory path", "tfds's default data_dir"),
    "data.manual_dir": text("a directory path", "imagenet2012 already prepared in data_dir"),
    "data.idx_dir": text("a directory path", "/usr/share/datasets/fashion-mnist"),
    "data.augment": flag(),
    "data.train_examples_per_class": integer(1, none_means="every example"),
    "data.train_examples": integer(1, none_means="every example"),
    "data.test_examples": integer(1, none_means="every example"),
    # In-memory data: <= 0 runs the pipeline in the caller's thread; tf.data: -1 is AUTOTUNE.
    "data.prefetch": integer(0, "host batches prepared ahead; 0: none", also=(-1,),
                             also_why="tf.data AUTOTUNE for streamed datasets"),
    "data.device_prefetch": integer(0, "global batches sent to the devices ahead; 0: none"),
    "data.shuffle_buffer": integer(1, "examples in a streamed epoch's shuffle buffer"),
    "data.example_ids": flag(),
    "data.class_pairs": flag(),
    "data.classes": Rule(_class_subset, "a non-empty tuple of distinct ints >= 0 (the dataset's "
                         "labels to keep, relabeled 0..k-1 in this order)", "every class"),
    "batch_size": integer(1, "the global clean batch", also=(-1,),
                          also_why="with config.per_device_batch_size set"),
    "per_device_batch_size": integer(1, none_means="config.batch_size / devices"),
    "eval_batch_size": integer(1, "global, padded and masked at the end"),
    # 0 is fine when num_train_steps sets the length (a cross rule checks the other case).
    "num_epochs": integer(0, "the run's length in epochs"),
    "num_train_steps": integer(1, "the run's length in steps", also=(-1,),
                               also_why="num_epochs epochs"),
    "objective.variant": choice(config_choices.variants),
    # mixing.sample_lambda: alpha <= 0 means lam = 1 (no mixing), as the reference; only a
    # negative value is a mistake.
    "objective.alpha": number(0, "mixup's Beta(alpha, alpha); 0: no mixing"),
    "objective.temperature": number(0, "the KD temperature", exclusive=True),
    **{f"objective.weights.{term}": _OBJECTIVE_WEIGHT for term in TERMS},
    # A factor on the *reversed* gradient: a negative one would un-reverse it.
    "objective.gradient_reversal_scale": number(0, "the reversed gradient's factor"),
    "objective.mix_groups": integer(1, "groups of the batch that pairs stay within", also=(-1,),
                                    also_why="one per device"),
    "objective.min_mix_group_size": integer(1),
    "objective.lam_per_group": flag(),
    "objective.kl_warmup_epochs": number(0, "epochs of the KL terms' linear warm-up; 0: none"),
    "objective.kl_gate": choice(config_choices.kl_gates),
    "objective.discriminator_input": choice(config_choices.discriminator_inputs),
    "baselines.label_smoothing": number(0, "the label gets 1 - eps", below=1),
    "baselines.mixup_alpha": number(0, "Beta(alpha, alpha); 0: no mixing"),
    "baselines.cutmix_alpha": number(0, "Beta(alpha, alpha); 0: no mixing"),
    "baselines.kd_temperature": number(0, "the KD temperature", exclusive=True),
    "baselines.cs_kd_weight": _WEIGHT,
    # alpha_t = alpha_T * (epoch + 1) / epochs weighs the old prediction against the label.
    "baselines.ps_kd_alpha": number(0, "the final weight of the past prediction", at_most=1),
    "baselines.byot_kl_weight": _WEIGHT,
    "baselines.byot_feature_weight": _WEIGHT,
    "optimizer.learning_rate": number(0, "0 freezes the parameters"),
    "optimizer.lr_reference_batch": integer(1, "the batch learning_rate is given for",
                                            none_means="learning_rate as given"),
    "optimizer.momentum": number(0, "SGD momentum", below=1),
    "optimizer.nesterov": flag(),
    "optimizer.weight_decay": number(0, "coupled L2"),
    "optimizer.warmup_epochs": integer(0, "epochs of linear warm-up; 0: none"),
    "optimizer.schedule": choice(config_choices.schedules),
    "optimizer.milestones": Rule(_increasing_epochs, "a tuple of strictly increasing ints "
                                 ">= 0 (epochs after warm-up; () for none)"),
    "optimizer.decay_factor": number(0, "the rate's factor at each milestone"),
    "log_every_steps": integer(1),
    "eval_every_epochs": integer(1),
    "eval_calibration_bins": integer(1, "confidence bins of the calibration error"),
    "eval_on_train_set": flag(),
    "checkpoint_every_steps": integer(1),
    "keep_checkpoints": integer(1, "a run resumes from its checkpoints"),
    "resume_policy": choice(RESUME_POLICIES),
    "max_param_norm_ratio": Rule(_off_or_above_one, "0 (the norm check off) or a finite number "
                                 "> 1 (the parameters' allowed growth over the last checkpoint)"),
    "init_from.path": Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                           "a training workdir, one of its checkpoints/<N> directories or a "
                           "directory `python -m mixskd_jax.interop` wrote",
                           "a fresh initialization"),
    "init_from.keep_head": flag(),
    "init_from.freeze_backbone": flag(),
    "distributed.initialize": choice(DISTRIBUTED_MODES),
    "distributed.coordinator_address": Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                                            "a 'host:port' string", "from the environment"),
    "distributed.num_processes": integer(1, none_means="from the environment"),
    "distributed.process_id": integer(0, none_means="from the environment"),
    "distributed.local_device_ids": Rule(_device_ids, "an int or a tuple of distinct ints >= 0",
                                         "from the environment"),
    # maybe_initialize treats "" as unset, like None.
    "distributed.cpu_collectives": Rule(lambda v: v == "" or v in CPU_COLLECTIVES,
                                        "one of " + ", ".join(map(repr, CPU_COLLECTIVES)),
                                        "JAX's default"),
}


# ---------------------------------------------------------------------------------------------
# Rules between fields. Each takes the flat {dotted: value} of a config whose every field
# passed its own rule, and returns the message or None.

def _batch_needs_per_device(v: Mapping[str, Any]) -> str | None:
  if v["batch_size"] == -1 and v["per_device_batch_size"] is None:
    return ("config.batch_size = -1: means config.per_device_batch_size x devices, so set "
            "config.per_device_batch_size (an int >= 1), or set config.batch_size to the "
            "global batch.")
  return None


def _per_device_divides_batch(v: Mapping[str, Any]) -> str | None:
  per_device, batch = v["per_device_batch_size"], v["batch_size"]
  if per_device is not None and batch != -1 and batch % per_device:
    return (f"config.per_device_batch_size = {per_device}: must divide config.batch_size = "
            f"{batch} (per_device_batch_size x devices is the global batch); unset it, or set "
            "config.batch_size = -1 to use it.")
  return None


def _epochs_or_steps(v: Mapping[str, Any]) -> str | None:
  if v["num_train_steps"] == -1 and v["num_epochs"] < 1:
    return (f"config.num_epochs = {v['num_epochs']}: must be >= 1 when config.num_train_steps "
            "= -1 (the run trains num_epochs epochs); or set config.num_train_steps >= 1.")
  return None


def _batch_fits_examples(v: Mapping[str, Any]) -> str | None:
  cap, batch = v["data.train_examples"], v["batch_size"]
  if cap is not None and batch > cap:
    return (f"config.batch_size = {batch}: must be <= config.data.train_examples = {cap}, or an "
            "epoch has no full batch; lower the batch or use more examples.")
  return None


def _groups_divide(v: Mapping[str, Any]) -> str | None:
  """The device-independent part of layout.resolve's group checks."""
  batch, mix, bn = v["batch_size"], v["objective.mix_groups"], v["model.batchnorm_groups"]
  if mix != -1 and batch != -1 and batch % mix:
    return (f"config.objective.mix_groups = {mix}: must divide config.batch_size = {batch} "
            "(each group holds whole pairs), or be -1 (one per device).")
  if mix != -1 and bn != -1 and mix % bn:
    return (f"config.model.batchnorm_groups = {bn}: must divide config.objective.mix_groups = "
            f"{mix} (each BatchNorm group holds whole mix groups), or be -1 (one per mix group).")
  return None


def _method_fits_model_and_data(v: Mapping[str, Any]) -> str | None:
  """methods.check_config's rules: the branched methods need model.mixskd, CS-KD and PS-KD
  their batch fields (the `:METHOD` config token sets all of them)."""
  # pylint: disable-next=import-outside-toplevel
  from mixskd_jax.train.methods import BRANCHED_METHODS, DATA_NEEDS
  method = v["method"]
  if method is None:
    return None
  branched = method in BRANCHED_METHODS
  if v["model.mixskd"] != branched:
    return (f"config.model.mixskd = {v['model.mixskd']}: must be {branched} for config.method "
            f"= {method!r} ({'a network with' if branched else 'a plain network without'} "
            f"auxiliary branches); or choose the method with the config's :{method} token.")
  field = DATA_NEEDS.get(method)
  if field and not v[f"data.{field}"]:
    return (f"config.data.{field} = False: must be True for config.method = {method!r}; or "
            f"choose the method with the config's :{method} token.")
  return None


def _streamed_data_fields(v: Mapping[str, Any]) -> str | None:
  """What a streamed dataset cannot do (data/streaming.py, data/sources.py)."""
  name = v["data.name"]
  if name not in STREAMED_DATASETS:
    return None
  for field in ("class_pairs", "example_ids"):
    if v[f"data.{field}"]:
      return (f"config.data.{field} = True: must be False for the streamed dataset {name!r} "
              "(cs_kd's pairs and ps_kd's ids index the whole training set in memory); use an "
              "in-memory dataset for those methods.")
  if v["data.train_examples_per_class"] is not None:
    return (f"config.data.train_examples_per_class = {v['data.train_examples_per_class']}: must "
            f"be None for the streamed dataset {name!r}; cap it with config.data.train_examples.")
  if v["data.classes"] is not None:
    return (f"config.data.classes = {v['data.classes']!r}: must be None for the streamed "
            f"dataset {name!r} (class subsets are taken from splits held in memory); use an "
            "in-memory dataset.")
  if v["eval_on_train_set"]:
    return (f"config.eval_on_train_set = True: must be False for the streamed dataset {name!r} "
            "(it would read the whole training split at every evaluation); use an in-memory "
            "dataset.")
  return None


def _classes_in_range(v: Mapping[str, Any]) -> str | None:
  classes, count = v["data.classes"], DATASET_CLASSES.get(v["data.name"])
  if classes is None or count is None:
    return None
  for c in classes:
    if c >= count:
      return (f"config.data.classes = {tuple(classes)!r}: class {c} is out of range, "
              f"{v['data.name']!r} has labels 0..{count - 1}.")
  return None


def _init_from_fits(v: Mapping[str, Any]) -> str | None:
  """The linear probe trains a plain network's head (train/pretrained.py); keeping the head
  needs a checkpoint to keep it from."""
  if v["init_from.freeze_backbone"] and v["model.mixskd"]:
    return ("config.init_from.freeze_backbone = True: needs a plain network "
            "(config.model.mixskd = False): a MixSKD network's branches read the backbone's "
            "stages and would train on frozen features; set config.model.mixskd=False.")
  if v["init_from.keep_head"] and v["init_from.path"] is None:
    return ("config.init_from.keep_head = True: needs config.init_from.path (the checkpoint "
            "whose head is kept); set the path, or keep_head=False.")
  return None


def _process_in_range(v: Mapping[str, Any]) -> str | None:
  pid, count = v["distributed.process_id"], v["distributed.num_processes"]
  if pid is not None and count is not None and pid >= count:
    return (f"config.distributed.process_id = {pid}: must be < config.distributed.num_processes "
            f"= {count} (processes count from 0).")
  return None


CROSS_RULES: tuple[Callable[[Mapping[str, Any]], str | None], ...] = (
    _batch_needs_per_device, _per_device_divides_batch, _epochs_or_steps, _batch_fits_examples,
    _groups_divide, _method_fits_model_and_data, _streamed_data_fields, _classes_in_range,
    _init_from_fits, _process_in_range)


# ---------------------------------------------------------------------------------------------

def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every field of `node` that is not itself a group of fields."""
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _value_text(value: Any) -> str:
  """The value as the message shows it: repr, with the type where it is not obvious."""
  shown = repr(value)
  if isinstance(value, (str, bool, int, float, tuple, list)) or value is None:
    return shown
  return f"{shown} (a {type(value).__name__})"


def check(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
  """Raises ConfigValueError for the first field of `config` that breaks its rule, then for
  the first broken rule between fields.

  A field that `config` lacks is checked at its `schema` (base_config) value; a field the
  schema lacks is left to `config_schema.unknown_field_error`.
  """
  groups = {path.rsplit(".", 1)[0] for path in RULES if "." in path}
  values = dict(leaves(schema))
  for path, value in leaves(config):
    if path in groups:  # a group of fields replaced by a plain value
      raise ConfigValueError(f"config.{path} = {_value_text(value)}: must be a group of "
                             f"fields (config.{path}.*), as in config_schema.base_config().")
    values[path] = value
  for path, rule in RULES.items():
    why = rule.error(values[path])
    if why:
      raise ConfigValueError(f"config.{path} = {_value_text(values[path])}: {why}.")
  for cross in CROSS_RULES:
    message = cross(values)
    if message:
      raise ConfigValueError(message)
