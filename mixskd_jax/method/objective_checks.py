"""The shape checks of the MixSKD objective's inputs: a model's outputs, and what the
self-teacher and discriminators return. Each mistake is one sentence naming the fix, raised
before it could reach a loss as a broadcasting error."""

from __future__ import annotations

from typing import Any

from mixskd_jax.models.outputs import ModelOutputs


def check_outputs(outputs: ModelOutputs, batch: int) -> None:
  """One final feature map per head, logits of 2B rows for B labels, one shape for all heads."""
  if len(outputs.features) != outputs.num_heads:
    raise ValueError(f"outputs has {outputs.num_heads} logits but {len(outputs.features)} "
                     "feature maps; MixSKD needs one final feature map per head.")
  for z in outputs.logits:
    if z.shape[0] != 2 * batch:
      raise ValueError(f"outputs must cover 2B = {2 * batch} images [clean; mixed] for {batch} "
                       f"labels, got logits of shape {z.shape}.")
  shapes = [z.shape for z in outputs.logits]
  if len(set(shapes)) > 1:  # the heads distil into each other: one class count for all
    raise ValueError(f"Every head's logits must have one shape (2B, num_classes); got {shapes} "
                     "(branch 1 .. main head): build every head with the same num_classes.")


def check_head_output(name: str, got: Any, expected: tuple[int, ...], fix: str) -> None:
  """A self-teacher or discriminator that returns the wrong shape, named before it reaches a
  loss as a broadcasting error."""
  if got.shape != expected:
    raise ValueError(f"The {name} returned shape {got.shape}, expected {expected}: {fix}")
