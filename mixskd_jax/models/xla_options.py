"""XLA compiler options for a model's train step: `jax.jit(step, compiler_options=...)`.

Two choices for XLA:CPU, both measured on the 2-core development machine (jax 0.10.2, A/B
in one process; README "Benchmark"), both leaving the computed values unchanged:

* `config.model.conv_input_barrier` puts an optimization barrier on every convolution's input
  (`layers.conv`). XLA:CPU in jax 0.10 expands barriers (pass `cse_barrier_expander`) before
  fusion, where they have no effect; jax 0.12 expands them after scheduling. Disabling that
  pass keeps them through fusion on both (the CPU runtime runs a barrier as a no-op).
  CIFAR ResNet-18 MixSKD step -10%, plain step -16%; small_resnet MixSKD -8%.
* `config.model.cpu_convolutions` picks the convolution library: "eigen" (XLA's own Eigen
  kernels; YNNPACK then only runs matmuls), "xla_default" (YNNPACK convolutions in jax >=
  0.10), or "auto": "eigen" except for the models in `AUTO_XLA_DEFAULT`. With the barrier,
  Eigen is faster on the CIFAR ResNets (ResNet-18 MixSKD -15%, plain -3%; ResNet-50 plain -3%)
  and slower on small_resnet's 16-64-channel maps (+9%).

An option this jax version does not know is left out (checked once by compiling a tiny
function), so older and newer versions compile the step with what they support.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mixskd_jax.config.choices import CPU_CONVOLUTIONS
# Models measured faster with XLA's default convolutions ("auto" leaves them alone).
AUTO_XLA_DEFAULT = ("small_resnet",)
KEEP_BARRIERS = ("xla_disable_hlo_passes", "cse_barrier_expander")
EIGEN_CONVOLUTIONS = ("xla_cpu_experimental_ynn_fusion_type",
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


@functools.lru_cache(maxsize=None)
def _accepted(name: str, value: Any) -> bool:
  """Whether this jax's XLA accepts compiler option `name=value` (a tiny CPU compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception:  # pylint: disable=broad-except  (any rejection: leave the option out)
    return False
  return True


def compiler_options(model_config: Any, platform: str | None = None) -> dict[str, Any]:
  """The XLA options to compile `config.model`'s train step with (empty off CPU).

  Args:
    model_config: `config.model`: reads name, conv_input_barrier, cpu_convolutions.
    platform: "cpu", "gpu", "tpu"; None: the default backend's.
  """
  choice = model_config.get("cpu_convolutions", "auto")
  if choice not in CPU_CONVOLUTIONS:
    raise ValueError(f"config.model.cpu_convolutions={choice!r} must be one of "
                     f"{CPU_CONVOLUTIONS}.")
  if (platform or jax.default_backend()) != "cpu":
    return {}
  wanted = []
  if model_config.conv_input_barrier:
    wanted.append(KEEP_BARRIERS)
  if choice == "eigen" or (choice == "auto" and model_config.name not in AUTO_XLA_DEFAULT):
    wanted.append(EIGEN_CONVOLUTIONS)
  return {name: value for name, value in wanted if _accepted(name, value)}
