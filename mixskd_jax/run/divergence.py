"""The divergence guard: what the loop checks before it logs or checkpoints a state.

A run stops (`DivergenceError`) at the first check that finds
- a non-finite training metric since the previous check (the loss, any term, ...), or
- parameters whose global L2 norm is not finite, or exceeds `config.max_param_norm_ratio`
  times the norm of the reference state: the newest checkpoint, or the state the run started
  from. A learning rate that blows up moves the parameters by orders of magnitude in a step
  or two while the loss can still be finite (the logged loss of step t is computed from the
  parameters before step t's update), which is why the parameters are checked too.

A checkpoint is written only after these checks pass for the state it holds, so every kept
checkpoint is one from before the divergence: finite metrics up to its step, finite
parameters, and a norm within the ratio of the checkpoint before it.
"""

from __future__ import annotations

import jax
import numpy as np
import optax


class DivergenceError(FloatingPointError):
  """Training diverged; the message is one line naming the step, the value and what is kept."""


@jax.jit
def parameter_norm(params) -> jax.Array:
  """The global L2 norm of a parameter pytree (a scalar, replicated)."""
  return optax.tree.norm(params)


def _kept(latest: int | None) -> str:
  if latest is None:
    return "no checkpoint was saved before it, so a rerun starts from step 0"
  return (f"checkpoint {latest}, saved before it, is kept and the run resumes from it "
          "(a changed learning rate needs --config.resume_policy=allow_changes)")


class DivergenceGuard:
  """Holds the reference norm; `check_metrics` and `check_params` raise DivergenceError."""

  def __init__(self, max_param_norm_ratio: float, reference_norm: float, reference_step: int):
    self.max_ratio = max_param_norm_ratio
    self.reference_norm, self.reference_step = reference_norm, reference_step

  def check_metrics(self, host_metrics: list[dict], first_step: int,
                    latest_checkpoint: int | None) -> None:
    """`host_metrics[i]` are step `first_step + i + 1`'s metrics, as numbers."""
    for offset, metrics in enumerate(host_metrics):
      for name, value in metrics.items():
        if not np.isfinite(value):
          raise DivergenceError(
              f"{name} = {value} at step {first_step + offset + 1}: the run stopped; "
              f"{_kept(latest_checkpoint)}. Lower config.optimizer.learning_rate or check the "
              "data.")

  def check_params(self, norm: float, step: int, latest_checkpoint: int | None) -> None:
    """Raises unless the parameters' norm at `step` is finite and within the ratio."""
    if not np.isfinite(norm):
      raise DivergenceError(
          f"the parameters' norm is {norm} at step {step}: the run stopped; "
          f"{_kept(latest_checkpoint)}. Lower config.optimizer.learning_rate.")
    if self.max_ratio > 0 and norm > self.max_ratio * self.reference_norm:
      raise DivergenceError(
          f"the parameters' norm grew from {self.reference_norm:.4g} at step "
          f"{self.reference_step} to {norm:.4g} at step {step}, more than "
          f"config.max_param_norm_ratio={self.max_ratio:g} times: the run stopped as diverged; "
          f"{_kept(latest_checkpoint)}. Lower config.optimizer.learning_rate (or raise the "
          "ratio if such growth is expected).")

  def accept(self, norm: float, step: int) -> None:
    """Makes the state just checkpointed the reference."""
    self.reference_norm, self.reference_step = norm, step
