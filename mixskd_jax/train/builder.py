"""The one way a train step is built: model, method, optimizer, state initializer and the jitted
train and eval steps with their shardings, donation and compiler options. The trainer and the
benchmark both build here, so what is measured is what trains."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from mixskd_jax.method import trainable
from mixskd_jax.method.methods import Method, build_method
from mixskd_jax.models import compiler_options
from mixskd_jax.models.registry import build_model_from_config
from mixskd_jax.models.staged import HEAD
from mixskd_jax.train import sharding, steps
from mixskd_jax.train.optimizer import build_optimizer
from mixskd_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What the step needs to know of the data.

  Attributes:
    num_classes: labels lie in [0, num_classes).
    image_shape: (H, W, C) of a batch's images.
    mean, std: per-channel normalization constants, [0, 1] units.
    num_examples: rows of per-example method state (PS-KD's table).
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: Sequence[float]
  std: Sequence[float]
  num_examples: int


@dataclasses.dataclass(frozen=True)
class Steps:
  """A built run: `init_state(key)` -> replicated TrainState; `state_from(variables)` -> the
  replicated TrainState that starts from `variables` ({'params', 'batch_stats'}, host or
  device arrays; a fresh optimizer state: `config.init_from`); `train_step(state, batch,
  root_key)` -> (state, metrics), the state donated; `eval_step(state, batch)` -> sums."""
  model: nn.Module
  method: Method
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  init_state: Callable[[jax.Array], TrainState]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  state_from: Callable[[dict], TrainState] | None = None


def freezes_backbone(config: ml_collections.ConfigDict) -> bool:
  """`config.init_from.freeze_backbone` (False for a config without the group)."""
  init_from = config.get("init_from")
  return bool(init_from is not None and init_from.get("freeze_backbone", False))


def build_steps(config: ml_collections.ConfigDict, mesh: Mesh, data: DataShape, *,
                steps_per_epoch: int, num_epochs: int) -> Steps:
  """Builds `config`'s run on `mesh`.

  Args:
    config: resolved for the mesh's devices (`train.layout.resolve`).
    mesh: the devices; batches are split along its `data` axis, the state is replicated.
    data: the data's shape and constants.
    steps_per_epoch, num_epochs: the schedule's length (the step's cost does not depend on it).
  """
  frozen = freezes_backbone(config)
  # The mesh's devices name the compiler, not the host's backend: a step compiled ahead of time
  # for a TPU slice on a CPU host must not carry XLA:CPU's choices (bench/aot.py).
  platform = sharding.platform(mesh)
  model = build_model_from_config(config.model, data.num_classes, frozen_backbone=frozen,
                                  platform=platform)
  method = build_method(config, num_groups=config.objective.mix_groups,
                        steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
  dummy = jax.ShapeDtypeStruct((1,) + tuple(data.image_shape), jnp.float32)
  abstract_params = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
  partition = method.partition(abstract_params)
  if frozen:  # a linear probe: the plain model's head alone trains (no decay elsewhere either)
    partition = trainable.freeze_except(partition, trained=[(HEAD,)])
  tx, schedule = build_optimizer(config, steps_per_epoch=steps_per_epoch,
                                 num_epochs=num_epochs, partition=partition)
  repl, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)

  def state_from(variables):
    return TrainState.create(variables, tx, method.init_state(data.num_examples,
                                                              data.num_classes))

  def init_state(key):
    return state_from(model.init(key, jnp.zeros(dummy.shape, dummy.dtype)))

  common = dict(model=model, mean=tuple(data.mean), std=tuple(data.std))
  train_step = jax.jit(
      functools.partial(steps.train_step, method=method, tx=tx, schedule=schedule, **common),
      in_shardings=(repl, batch, repl), out_shardings=(repl, repl), donate_argnums=(0,),
      compiler_options=compiler_options(config.model, platform) or None)
  eval_step = jax.jit(
      functools.partial(steps.eval_step, calibration_bins=config.eval_calibration_bins,
                        **common),
      in_shardings=(repl, batch), out_shardings=repl)
  return Steps(model=model, method=method, tx=tx, schedule=schedule,
               init_state=jax.jit(init_state, out_shardings=repl), train_step=train_step,
               eval_step=eval_step, state_from=jax.jit(state_from, out_shardings=repl))
