"""How a config's batch lands on the devices: global batch sizes, mix groups, BatchNorm groups
and the learning rate, resolved once for the devices a run has.

`resolve(config, num_devices)` returns a copy of the config in which every "-1 = depends on
the devices" field holds its value, so that the data pipeline, the step, the optimizer and
`config.json` all read the same concrete numbers:

* `batch_size = -1`: `per_device_batch_size` x devices (the official ImageNet run's unit is
  16 clean images per GPU). Otherwise the global batch is `batch_size` itself.
* `eval_batch_size` is rounded up to a multiple of the devices (evaluation pads and masks,
  so its results do not depend on the eval batch).
* `objective.mix_groups = -1`: one group per device, merged into groups of several devices
  when a device holds fewer than `objective.min_mix_group_size` examples (pairs drawn from a
  handful of images are nearly always an image with itself or its one neighbour).
* `model.batchnorm_groups = -1`: one BatchNorm group per mix group (a DDP run without SyncBN);
  1 normalizes over the whole global batch (SyncBN; XLA all-reduces the per-channel sums).
  BatchNorm groups are unions of whole mix groups, so each holds its examples' clean and mixed
  rows together, as the reference normalizes [clean; mixed] in one pass.
* `optimizer.lr_reference_batch` set: the learning rate is `learning_rate` x global batch /
  `lr_reference_batch` (the linear scaling rule; warm-up keeps its length in epochs).

Pairs and BatchNorm statistics that stay within a device need no communication; groups that
span devices move the images and feature maps of their pairs between devices (see
`experiments/SCALING.md`), which `resolve` logs.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from mixskd_jax.config.errors import ConfigValueError


def _err(field: str, message: str) -> ConfigValueError:
  """The config's own error type (a ValueError): the command prints it in one line, exit 2."""
  return ConfigValueError(f"config.{field}: {message}")


def global_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """The global clean batch for `num_devices` devices (see the module docstring)."""
  per_device = config.get("per_device_batch_size")
  if config.batch_size == -1:
    if per_device is None or per_device < 1:
      raise _err("batch_size", "-1 means per_device_batch_size x devices, so set "
                 f"config.per_device_batch_size to a positive number (got {per_device}).")
    return per_device * num_devices
  if config.batch_size < 1:
    raise _err("batch_size", f"{config.batch_size} must be positive, or -1 for "
               "per_device_batch_size x devices.")
  if per_device is not None and per_device * num_devices != config.batch_size:
    raise _err("per_device_batch_size", f"{per_device} x {num_devices} devices != "
               f"config.batch_size={config.batch_size}; set one of them (batch_size=-1 uses "
               "per_device_batch_size).")
  if config.batch_size % num_devices:
    raise _err("batch_size", f"{config.batch_size} does not split evenly over {num_devices} "
               f"devices; use a multiple of {num_devices}.")
  return config.batch_size


def mix_groups(requested: int, batch_size: int, num_devices: int, min_group_size: int) -> int:
  """Resolved `objective.mix_groups` (G) for a global batch of `batch_size`."""
  if requested == -1:
    groups = num_devices
    # Merge neighbouring devices' groups (halving G keeps it a divisor of the batch) until a
    # group holds enough examples to pair.
    while groups > 1 and batch_size // groups < min_group_size and groups % 2 == 0:
      groups //= 2
    return groups
  if requested < 1 or batch_size % requested:
    raise _err("objective.mix_groups", f"{requested} must be -1 (one per device) or a positive "
               f"divisor of the global batch {batch_size}.")
  return requested


def batchnorm_groups(requested: int, num_mix_groups: int) -> int:
  """Resolved `model.batchnorm_groups`: -1 -> the mix groups; must divide them."""
  if requested == -1:
    return num_mix_groups
  if requested < 1 or num_mix_groups % requested:
    raise _err("model.batchnorm_groups", f"{requested} must be -1 (one per mix group) or a "
               f"positive divisor of objective.mix_groups={num_mix_groups}, so that every "
               "BatchNorm group holds whole [clean; mixed] pairs of groups.")
  return requested


def resolve(config: ml_collections.ConfigDict, num_devices: int, *,
            log_costs: bool = True) -> ml_collections.ConfigDict:
  """A copy of `config` with its device-dependent fields resolved for `num_devices`; with
  `log_costs`, says which groups make devices exchange more than gradients.

  Raises:
    ConfigValueError (a ValueError) naming the field when a batch, group count or learning-rate rule does not fit.
  """
  c = config.copy_and_resolve_references()
  c.unlock()
  c.batch_size = global_batch_size(config, num_devices)
  c.per_device_batch_size = c.batch_size // num_devices
  if config.eval_batch_size < 1:
    raise _err("eval_batch_size", f"{config.eval_batch_size} must be positive.")
  c.eval_batch_size = -(-config.eval_batch_size // num_devices) * num_devices
  min_size = config.objective.min_mix_group_size
  if min_size < 1:
    raise _err("objective.min_mix_group_size", f"{min_size} must be >= 1.")
  c.objective.mix_groups = mix_groups(config.objective.mix_groups, c.batch_size, num_devices,
                                      min_size)
  c.model.batchnorm_groups = batchnorm_groups(config.model.batchnorm_groups,
                                              c.objective.mix_groups)
  reference = config.optimizer.get("lr_reference_batch")
  if reference is not None:
    if reference < 1:
      raise _err("optimizer.lr_reference_batch", f"{reference} must be positive (or None).")
    c.optimizer.learning_rate = config.optimizer.learning_rate * c.batch_size / reference
    c.optimizer.lr_reference_batch = None  # applied: a resolved config is not scaled twice
  if log_costs:
    _log_costs(c, num_devices)
  return c


def _log_costs(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Says which resolved groups make devices exchange more than gradients."""
  if num_devices == 1:
    return
  if c.objective.mix_groups % num_devices:
    logging.warning(
        "objective.mix_groups=%d on %d devices: mix groups span devices, so mixed images and "
        "interpolated feature maps of pairs cross devices every step. Use a multiple of the "
        "device count (e.g. -1) to keep pairs on their device.", c.objective.mix_groups,
        num_devices)
  if c.model.batchnorm_groups % num_devices:
    logging.info("model.batchnorm_groups=%d on %d devices: BatchNorm statistics are "
                 "all-reduced across devices in every BatchNorm layer (per-channel sums).",
                 c.model.batchnorm_groups, num_devices)
