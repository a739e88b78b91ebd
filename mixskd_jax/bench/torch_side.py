"""The PyTorch side of `--against=torch`: the project's independent PyTorch implementation of
the official model and objective (`interop.torch_reference`, spec §A-B) with the official
optimizer (Nesterov SGD, coupled weight decay), one step of MixSKD or plain CE on a fixed
batch, timed, and its memory read; and which configs it implements (`check_comparable`).
`bench.side_by_side` runs it against our step.

PyTorch is optional (test-only): without it, `TorchSide` raises `TorchUnavailable`, whose one
line says how to install its CPU build.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import ml_collections
import numpy as np

from mixskd_jax.data import datasets

INSTALL_TORCH = ("--against=torch needs PyTorch: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu")
# config.model.name -> (torch_reference builder, its arguments after num_classes)
TORCH_MODELS = {"cifar_resnet18": ("build_cifar_mixskd", (18,)),
                "cifar_resnet50": ("build_cifar_mixskd", (50,)),
                "imagenet_resnet50": ("build_imagenet_mixskd_resnet50", ())}
# The objective variant -> the official script's loss (interop.torch_reference.reference_terms).
TORCH_LOSSES = {"reference_cifar": "loss_cifar", "full": "loss_imagenet"}
LAYOUTS = ("nchw", "channels_last")


class TorchUnavailable(RuntimeError):
  """PyTorch is not installed; the message says how to install it."""


def load_torch():
  """(torch, interop.torch_reference); TorchUnavailable without PyTorch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise TorchUnavailable(INSTALL_TORCH) from e
  from mixskd_jax.interop import torch_reference  # pylint: disable=import-outside-toplevel
  return torch, torch_reference


def check_comparable(config: ml_collections.ConfigDict) -> None:
  """Refuses, in one line, a config the PyTorch side does not implement."""
  if config.model.name not in TORCH_MODELS:
    raise ValueError(f"--against=torch covers config.model.name in {sorted(TORCH_MODELS)} "
                     f"(the official MixSKD ResNets); got {config.model.name!r}.")
  if config.model.mixskd and config.objective.variant not in TORCH_LOSSES:
    raise ValueError(f"--against=torch covers config.objective.variant in "
                     f"{sorted(TORCH_LOSSES)} (the official scripts); got "
                     f"{config.objective.variant!r}.")
  if config.model.dtype != "float32":
    raise ValueError("--against=torch compares float32 steps: set --config.model.dtype=float32.")


class TorchSide:
  """The PyTorch model, discriminators and official optimizer, and one step of MixSKD or CE."""

  def __init__(self, config: ml_collections.ConfigDict, *, seed: int = 0):
    torch, ref = load_torch()
    self.torch, self.ref = torch, ref
    torch.manual_seed(seed)
    # Where JAX runs on a GPU, PyTorch's side does too (if its build has CUDA).
    self.device = torch.device("cuda" if jax.default_backend() == "gpu"
                               and torch.cuda.is_available() else "cpu")
    spec = datasets.get_spec(config.data.name)
    builder, args = TORCH_MODELS[config.model.name]
    self.model = getattr(ref, builder)(*args, spec.num_classes).to(self.device)
    # One discriminator per head, on the pooled final features (the backbone's last width).
    self.discriminators = [d.to(self.device) for d in ref.make_discriminators(
        self.model.backbone.fc.in_features, config.model.discriminator_hidden)]
    self.mixskd, self.temperature = bool(config.model.mixskd), config.objective.temperature
    self.loss_name = TORCH_LOSSES.get(config.objective.variant)
    opt = config.optimizer
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=opt.learning_rate,
                                     momentum=opt.momentum, nesterov=opt.nesterov,
                                     weight_decay=opt.weight_decay)
    rng = np.random.default_rng(seed)
    b = config.batch_size
    h, w, c = spec.image_shape
    self.images = rng.standard_normal((b, h, w, c)).astype(np.float32)   # normalized, NHWC
    self.labels = rng.integers(0, spec.num_classes, b).astype(np.int64)
    self.lam, self.perm = 0.3, rng.permutation(b)
    self.layout = "nchw"

  def set_layout(self, layout: str) -> None:
    """"nchw" (the official code) or "channels_last" (PyTorch's NHWC kernels)."""
    fmt = {"nchw": self.torch.contiguous_format, "channels_last": self.torch.channels_last}
    self.model.to(memory_format=fmt[layout])
    self.layout = layout

  def _inputs(self):
    torch = self.torch
    x = torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous().to(self.device)
    if self.layout == "channels_last":
      x = x.to(memory_format=torch.channels_last)
    return (x, torch.from_numpy(self.labels).to(self.device),
            torch.from_numpy(self.perm).to(self.device))

  def loss(self):
    """The step's loss on the batch (train mode: BatchNorm over the batch), differentiable."""
    x, y, perm = self._inputs()
    if self.mixskd:
      terms = self.ref.reference_terms(self.model, self.discriminators, x, y, self.lam, perm,
                                       T=self.temperature)
      return terms[self.loss_name]
    self.model.train()
    logits, _ = self.model.backbone(x)
    return self.torch.nn.functional.cross_entropy(logits, y)

  def step(self) -> None:
    """One training step: forward, backward, the official SGD update."""
    loss = self.loss()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()

  def _sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def time(self, *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones, each waited for."""
    for _ in range(warmup):
      self.step()
    self._sync()
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      self.step()
      self._sync()
      times.append(time.perf_counter() - t)
    return times

  def persistent_bytes(self) -> int:
    """Parameters, buffers, gradients and momentum: what lives between steps."""
    tensors = list(self.model.parameters()) + list(self.model.buffers())
    # One gradient per parameter, freed by zero_grad(set_to_none) and allocated again in the
    # backward pass, so the profiled step counts them too: the sum slightly overstates.
    tensors += [p for p in self.model.parameters()]
    tensors += [s["momentum_buffer"] for s in self.optimizer.state.values()
                if s.get("momentum_buffer") is not None]
    return sum(t.numel() * t.element_size() for t in tensors)

  def peak_step_bytes(self) -> int:
    """Peak of the bytes one step allocates beyond what lives between steps, read from
    PyTorch's profiler (allocations and frees in time order); on a GPU, CUDA's own count."""
    if self.device.type == "cuda":
      self.torch.cuda.reset_peak_memory_stats()
      before = self.torch.cuda.memory_allocated()
      self.step()
      self._sync()
      return self.torch.cuda.max_memory_allocated() - before
    profiler = self.torch.profiler
    with stderr_silenced(), profiler.profile(activities=[profiler.ProfilerActivity.CPU],
                                              profile_memory=True) as prof:
      self.step()
    # An op's own allocations net of its frees (children excluded), and "[memory]" records:
    # allocations and frees outside any op (the autograd engine's). In time order, their
    # running sum is what the step holds live, at the granularity of ops.
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
      live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
      peak = max(peak, live)
    return peak


@contextlib.contextmanager
def stderr_silenced():
  """File descriptor 2 to /dev/null: PyTorch's profiler (Kineto) prints a line to it at every
  start and stop, from C++, whatever the log level."""
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
      yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
