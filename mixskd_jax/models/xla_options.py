"""XLA compiler options for a model's train step: `jax.jit(step, compiler_options=...)`.

Two choices for XLA:CPU, both measured on the 2-core development machine (jax 0.10.2, A/B
in one process; docs/benchmarking.md), both leaving the computed values unchanged:

* `config.model.conv_input_barrier` puts an optimization barrier on every convolution's input
  (`layers.conv`). XLA:CPU in jax 0.10 expands barriers (pass `cse_barrier_expander`) before
  fusion, where they have no effect; jax 0.12 expands them after scheduling. Disabling that
  pass keeps them through fusion on both (the CPU runtime runs a barrier as a no-op).
  CIFAR ResNet-18 MixSKD step -10%, plain step -16%; small_resnet MixSKD -8%.
* `config.model.cpu_convolutions` picks the convolution library: "eigen" (XLA's own Eigen
  kernels; YNNPACK keeps matmuls and reductions), "xla_default" (YNNPACK convolutions in jax
  >= 0.10), or "auto": "eigen" except for the models in `AUTO_XLA_DEFAULT`. Measured with the
  barrier (jax 0.10.2, 2-core Xeon, A/B in one process): Eigen is faster on the ResNets
  (small_resnet MixSKD step 648 -> 433 ms, plain 178 -> 124 ms; CIFAR ResNet-18 MixSKD
  -15%), slower on ConvNeXt's depthwise 7x7 convolutions (1620 -> 1957 ms) and equal on the
  ViT (825 vs 827 ms), whose only convolution is the patch embedding.

An option this jax version does not know is left out (checked once by compiling a tiny
function), so older and newer versions compile the step with what they support.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mixskd_jax.config.choices import CPU_CONVOLUTIONS
# Models measured no faster with Eigen's convolutions ("auto" leaves them to XLA's default).
AUTO_XLA_DEFAULT = ("small_convnext", "small_vit")
KEEP_BARRIERS = ("xla_disable_hlo_passes", "cse_barrier_expander")
# YNNPACK keeps the dots and the reductions, Eigen gets the convolutions. Naming only the dots
# would also take the reductions from YNNPACK, and XLA:CPU then splits every BatchNorm
# statistic into a `reduce-window` over 32-row windows (its tree-reduction rewrite), which ran
# at well under 1 GB/s: 65% of the CIFAR ResNet-18 MixSKD step's op time.
EIGEN_CONVOLUTIONS = ("xla_cpu_experimental_ynn_fusion_type",
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")


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
