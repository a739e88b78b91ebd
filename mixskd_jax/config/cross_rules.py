"""The rules that tie config fields together (`CROSS_RULES`). Each takes the flat
{dotted: value} of a config whose every field passed its own rule (`field_rules.RULES`) and
returns the one-line message, or None. Rules that need the device count run later, in
`train/layout.py`, with the same kind of message."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mixskd_jax.config.choices import (BRANCHED_METHODS, DATA_NEEDS, DATASET_CLASSES,
                                       STREAMED_DATASETS)


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
  """The linear probe trains a plain network's head (interop/pretrained.py); keeping the head
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

