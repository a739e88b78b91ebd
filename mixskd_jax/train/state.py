"""The train state: everything a resumed run needs, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step: () int32; params / batch_stats: the model's collections; opt_state: the optimizer's;
  method_state: what the training method carries between steps (PS-KD's predictions; {})."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  method_state: Any = struct.field(default_factory=dict)

  @classmethod
  def create(cls, variables: dict, tx: optax.GradientTransformation,
             method_state: Any = None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=variables["params"],
               batch_stats=variables.get("batch_stats", {}),
               opt_state=tx.init(variables["params"]),
               method_state={} if method_state is None else method_state)

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}
