"""Layers that reproduce PyTorch's numerics: initializers, padding, BatchNorm.

Flax defaults differ from PyTorch in three ways that change results: weight/bias init,
"SAME" padding of stride-2 convolutions (Flax pads (0, 1) on even sizes, PyTorch (1, 1)),
and BatchNorm's running variance (PyTorch stores the unbiased batch variance). Everything
the models build goes through this file so those choices are made once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mixskd_jax.config.choices import RUNNING_STATS
Dtype = Any

INIT_SCHEMES = ("torch_default", "kaiming_fan_out")

# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)), is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision's ResNet init, kaiming_normal(fan_out, relu); jax's "normal" is untruncated.
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv_kernel_init(scheme: str) -> Callable:
  if scheme == "torch_default":
    return torch_default_kernel_init
  if scheme == "kaiming_fan_out":
    return kaiming_fan_out_init
  raise ValueError(f"init_scheme={scheme!r} is not one of {INIT_SCHEMES}.")


def conv(features: int, kernel: int, strides: int = 1, *, init_scheme: str, dtype: Dtype,
         name: str, input_barrier: bool = False) -> Callable[[jax.Array], jax.Array]:
  """A bias-free convolution with PyTorch's symmetric padding of (kernel - 1) // 2.

  Args:
    input_barrier: put `jax.lax.optimization_barrier` on the input, (N, H, W, C) -> the same
      values. The weight gradient of a convolution reads its input; without the barrier XLA
      may fuse the producer (BatchNorm + ReLU + residual add) into the layout transpose of
      that gradient and recompute it there, which on CPU costs more than storing the input
      once. The barrier makes the input a materialized value. Numerics are unchanged. XLA:CPU
      in jax 0.10 drops barriers before fusion unless the step is compiled with
      `xla_options.compiler_options(config.model)`.

  Returns:
    The `nn.Conv` (named `name`, so parameter paths do not depend on the barrier), or a
    function applying it after the barrier.
  """
  pad = (kernel - 1) // 2
  module = nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=conv_kernel_init(init_scheme), dtype=dtype, name=name)
  if not input_barrier:
    return module
  return lambda x: module(jax.lax.optimization_barrier(x))


def linear(features: int, fan_in: int, *, dtype: Dtype, name: str) -> nn.Dense:
  """A Linear layer initialized as PyTorch's default (both weight and bias)."""
  return nn.Dense(features, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), dtype=dtype, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch MaxPool2d(3, stride=2, padding=1): the padding is -inf, never a winner."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))




class BatchNorm(nn.Module):
  """BatchNorm over all but the channel axis with PyTorch's exact semantics.

  Train mode normalizes with the biased batch variance (two-pass, float32) and updates the
  running variance with the *unbiased* one, as `torch.nn.BatchNorm2d` does; Flax's
  BatchNorm stores the biased variance, which would drift eval results from the
  reference's.

  With `groups` > 1 the rows are split into that many contiguous groups and each group is
  normalized with its own statistics, as every GPU of a DistributedDataParallel run without
  SyncBN normalizes its own rows. Under `jax.jit` with the rows sharded over devices, groups
  that lie within one device need no communication; `groups = 1` takes statistics over the
  whole (global) batch, which XLA all-reduces across devices (SyncBN).

  Attributes:
    momentum: weight of the old running statistics (PyTorch momentum 0.1 == 0.9 here).
    epsilon: added to the variance.
    groups: contiguous row groups with their own statistics in train mode; must divide the
      rows.
    running_stats: what updates the running statistics when `groups` > 1: "mean_of_groups"
      (the mean of the groups' means and of their unbiased variances) or "first_group"
      (group 0's alone: what a DDP run saves, rank 0's buffers, which DDP also broadcasts to
      the other ranks every step).
    dtype: output dtype; statistics are computed in at least float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  groups: int = 1
  running_stats: str = "mean_of_groups"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: (N, ..., C) -> the same shape, normalized per channel (and per group in train)."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    # Statistics in at least float32 (float64 stays float64 under x64).
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if not train:
      y = (x32 - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return y.astype(self.dtype)
    if self.running_stats not in RUNNING_STATS:
      raise ValueError(f"BatchNorm running_stats={self.running_stats!r} must be one of "
                       f"{RUNNING_STATS}.")
    if self.groups < 1 or x.shape[0] % self.groups:
      raise ValueError(f"BatchNorm groups={self.groups} must divide the {x.shape[0]} rows of the "
                       "batch (config.model.batchnorm_groups).")
    grouped = x32.reshape((self.groups, x.shape[0] // self.groups) + x.shape[1:])
    axes = tuple(range(1, grouped.ndim - 1))
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    if not self.is_initializing():
      count = math.prod(grouped.shape[1:-1])
      unbiased = (var * (count / max(count - 1, 1))).reshape(self.groups, features)
      group_mean = mean.reshape(self.groups, features)
      pick = ((lambda s: s[0]) if self.running_stats == "first_group"
              else (lambda s: jnp.mean(s, axis=0)))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * pick(group_mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * pick(unbiased)
    y = (grouped - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.reshape(x.shape).astype(self.dtype)


def batch_norm(*, momentum: float, epsilon: float, dtype: Dtype, groups: int = 1,
               running_stats: str = "mean_of_groups") -> Callable[..., BatchNorm]:
  return functools.partial(BatchNorm, momentum=momentum, epsilon=epsilon, groups=groups,
                           running_stats=running_stats, dtype=dtype)
