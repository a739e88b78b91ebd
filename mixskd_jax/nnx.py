"""MixSKD for native `flax.nnx` models, the public NNX door: the variant's trainable filter
and optimizer, the loss of one step, and the copy of a trained backbone into a user's plain
model, with the modules they act on (self-teacher, discriminators, the staged network).

The modules live in `mixskd_jax.models.nnx_network` and are re-exported here. They mirror the
Linen classes in `mixskd_jax.models` module for module (same initializers, same parameter
names: `self_teacher/conv/kernel`, `discriminators/disc0/fc1/kernel`, ...), so an NNX user
keeps one module graph, `nnx.Optimizer` and `nnx.jit`, and the objective in
`mixskd_jax.method.objective` is shared, not re-implemented.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from mixskd_jax.method import mixing, objective
from mixskd_jax.method.mixing import MixParams
from mixskd_jax.models.nnx_network import (Dtype, FeatureDiscriminators, HeadFactory,
                                           MixSKDNetwork, MLPDiscriminator, SelfTeacher,
                                           StageFactory, Tower, torch_linear)
from mixskd_jax.models.outputs import ModelOutputs

__all__ = [
    "Dtype", "FeatureDiscriminators", "HeadFactory", "MLPDiscriminator", "MixSKDNetwork",
    "SelfTeacher", "StageFactory", "Tower", "copy_backbone", "mixskd_loss", "optimizer",
    "torch_linear", "trainable_filter",
]


def trainable_filter(config: objective.ObjectiveConfig) -> nnx.filterlib.Filter:
  """The `nnx.Param`s of a `MixSKDNetwork` that `config.variant` trains, as an NNX filter.

  For `nnx.Optimizer(model, tx, wrt=...)` and `nnx.DiffState(0, ...)`. Frozen are the
  top-level `self_teacher` (`reference_cifar`) and `discriminators` (all but `adversarial`)
  sub-trees: only the FIRST path element is matched, so a user's module named `self_teacher`
  deeper in the backbone trains. Paths are relative to the model, so pass the
  `MixSKDNetwork` itself (not a module holding it) as the optimizer's / DiffState's argument.
  """
  frozen = set()
  if not config.trains_self_teacher:
    frozen.add("self_teacher")
  if not config.trains_discriminators:
    frozen.add("discriminators")
  return nnx.All(nnx.Param, lambda path, _: not (path and path[0] in frozen))


def optimizer(model: MixSKDNetwork, tx: optax.GradientTransformation,
              config: objective.ObjectiveConfig) -> nnx.Optimizer:
  """`nnx.Optimizer(model, tx, wrt=trainable_filter(config))`: `tx` for what the variant
  trains. The loss already sends no gradient into frozen heads, so `wrt=nnx.Param` with a
  gradient-only `tx` leaves them alone too; this also keeps weight decay (`optax.adamw`) and any
  other gradient-free update off them. Gradients taken with `nnx.DiffState(0, nnx.Param)` or
  with the same filter both work."""
  return nnx.Optimizer(model, tx, wrt=trainable_filter(config))


def copy_backbone(model: MixSKDNetwork, plain: nnx.Module) -> nnx.Module:
  """Copies the trained backbone's parameters and BatchNorm statistics into `plain`, a user's
  own NNX classifier laid out like `model.backbone` (attributes `stem` (if any), `stages` (a
  list) and `head`), in place; returns `plain`. Run `model.backbone(x)` for (logits,
  stage outputs) without copying.

  Raises:
    ValueError naming the first path or shape that differs.
  """
  source = nnx.to_flat_state(nnx.state(model.backbone))
  target = nnx.to_flat_state(nnx.state(plain))
  source_shapes = {path: getattr(v.get_value(), "shape", None) for path, v in source}
  target_shapes = {path: getattr(v.get_value(), "shape", None) for path, v in target}
  name = lambda path: "/".join(str(p) for p in path)
  layout = "lay it out as stem, stages (an nnx.List), head, with the backbone's module names."
  missing = [p for p in source_shapes if p not in target_shapes]
  if missing:
    raise ValueError(f"Your plain model has no {name(missing[0])!r}, which the backbone has: "
                     f"{layout}")
  extra = [p for p in target_shapes if p not in source_shapes]
  if extra:
    raise ValueError(f"Your plain model has {name(extra[0])!r}, which the backbone does not: "
                     f"{layout}")
  for path, shape in source_shapes.items():
    if target_shapes[path] != shape:
      raise ValueError(f"{name(path)!r} is {target_shapes[path]} in your plain model but "
                       f"{shape} in the backbone: build it with the same widths.")
  nnx.update(plain, nnx.state(model.backbone))
  return plain


def mixskd_loss(model: MixSKDNetwork, images: jax.Array, labels: jax.Array, mix: MixParams,
                config: objective.ObjectiveConfig
                ) -> tuple[jax.Array, tuple[dict[str, jax.Array], ModelOutputs]]:
  """The MixSKD loss of one step of an NNX `MixSKDNetwork` (in the mode it is in).

  One forward pass over the 2B rows `mixing.stack_views(clean, mixed, mix.num_groups)`, so a
  BatchNorm in train mode normalizes both views together, as the reference does.

  Args:
    model: the network; its BatchNorm statistics update in place in train mode.
    images: (B, ...) float inputs (NHWC images, or what the stem reads).
    labels: (B,) integer labels.
    mix: lam and permutation (`mixing.sample_mix`).
    config: the objective.

  Returns:
    (loss, (terms, outputs)): differentiate with `has_aux=True`; outputs cover 2B rows.
  """
  x = mixing.stack_views(images, mixing.mix(images, mix), mix.num_groups)
  outputs = model(x)
  loss, terms = objective.mixskd_loss(outputs, labels, mix, self_teacher=model.teach,
                                      discriminators=model.discriminate, config=config,
                                      pooling=model.pooling)
  return loss, (terms, outputs)
