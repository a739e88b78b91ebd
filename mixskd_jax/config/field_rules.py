"""One rule per leaf of `schema.base_config()` (`RULES`): the type and range each field may hold,
checked by `check.validate` (the kinds of rule: `kinds.py`; the rules between fields:
`cross_rules.py`).

The ranges follow how the code uses each field (each rule says why where it is not obvious), so
a value the code handles meaningfully is never refused: a learning rate of 0 (a frozen run),
mixing alpha 0 (no mixing, lam = 1, as the reference), num_epochs 0 when num_train_steps sets
the length. The allowed names of choice fields come from `choices.py`.
"""

from __future__ import annotations

from typing import Any

from mixskd_jax.config import choices
from mixskd_jax.config.kinds import Rule, choice, flag, integer, is_int, is_number, number, text


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
    "method": choice(choices.METHODS,
                     none_means="mixskd when config.model.mixskd, else cross_entropy"),
    "model.name": choice(choices.MODELS),
    "model.mixskd": flag(),
    "model.dtype": choice(choices.DTYPES),
    "model.discriminator_hidden": integer(1, "hidden units of each discriminator"),
    "model.conv_input_barrier": flag(),
    "model.cpu_convolutions": choice(choices.CPU_CONVOLUTIONS),
    "model.remat_branches": flag(),
    "model.batchnorm_groups": integer(1, "row groups of the batch's BatchNorm statistics",
                                      also=(-1,), also_why="one per mix group"),
    "model.batchnorm_running_stats": choice(choices.RUNNING_STATS),
    "data.name": choice(choices.DATASETS),
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
    "objective.variant": choice(choices.VARIANTS),
    # mixing.sample_lambda: alpha <= 0 means lam = 1 (no mixing), as the reference; only a
    # negative value is a mistake.
    "objective.alpha": number(0, "mixup's Beta(alpha, alpha); 0: no mixing"),
    "objective.temperature": number(0, "the KD temperature", exclusive=True),
    **{f"objective.weights.{term}": _OBJECTIVE_WEIGHT for term in choices.TERMS},
    # A factor on the *reversed* gradient: a negative one would un-reverse it.
    "objective.gradient_reversal_scale": number(0, "the reversed gradient's factor"),
    "objective.mix_groups": integer(1, "groups of the batch that pairs stay within", also=(-1,),
                                    also_why="one per device"),
    "objective.min_mix_group_size": integer(1),
    "objective.lam_per_group": flag(),
    "objective.kl_warmup_epochs": number(0, "epochs of the KL terms' linear warm-up; 0: none"),
    "objective.kl_gate": choice(choices.KL_GATES),
    "objective.discriminator_input": choice(choices.DISCRIMINATOR_INPUTS),
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
    "optimizer.schedule": choice(choices.SCHEDULES),
    "optimizer.milestones": Rule(_increasing_epochs, "a tuple of strictly increasing ints "
                                 ">= 0 (epochs after warm-up; () for none)"),
    "optimizer.decay_factor": number(0, "the rate's factor at each milestone"),
    "log_every_steps": integer(1),
    "eval_every_epochs": integer(1),
    "eval_calibration_bins": integer(1, "confidence bins of the calibration error"),
    "eval_on_train_set": flag(),
    "checkpoint_every_steps": integer(1),
    "keep_checkpoints": integer(1, "a run resumes from its checkpoints"),
    "resume_policy": choice(choices.RESUME_POLICIES),
    "max_param_norm_ratio": Rule(_off_or_above_one, "0 (the norm check off) or a finite number "
                                 "> 1 (the parameters' allowed growth over the last checkpoint)"),
    "init_from.path": Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                           "a training workdir, one of its checkpoints/<N> directories or a "
                           "directory `python -m mixskd_jax.interop` wrote",
                           "a fresh initialization"),
    "init_from.keep_head": flag(),
    "init_from.freeze_backbone": flag(),
    "distributed.initialize": choice(choices.DISTRIBUTED_MODES),
    "distributed.coordinator_address": Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                                            "a 'host:port' string", "from the environment"),
    "distributed.num_processes": integer(1, none_means="from the environment"),
    "distributed.process_id": integer(0, none_means="from the environment"),
    "distributed.local_device_ids": Rule(_device_ids, "an int or a tuple of distinct ints >= 0",
                                         "from the environment"),
    # maybe_initialize treats "" as unset, like None.
    "distributed.cpu_collectives": Rule(lambda v: v == "" or v in choices.CPU_COLLECTIVES,
                                        "one of " + ", ".join(map(repr, choices.CPU_COLLECTIVES)),
                                        "JAX's default"),
}


