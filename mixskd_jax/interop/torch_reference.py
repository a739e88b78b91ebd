"""Independent PyTorch re-implementation of the official MixSKD model and step objective.

The ground truth the tests hold the JAX/Flax port against (logits, features, loss terms,
BatchNorm running statistics and the checkpoint key layout), and the PyTorch side of
`python -m mixskd_jax.benchmark --against=torch`. It is written from the project's
specification of the official code (sections A, B and 10); no code is taken from the
official repository. Importing it (or its two parts below) needs PyTorch, an optional
dependency: nothing else in the package imports them, except on demand.

Conventions: all tensors here are NCHW (PyTorch). ``B`` is the clean batch size, the
network always sees ``2B`` rows (clean half first, mixup half second), ``C`` is the
number of classes and ``exp`` the block expansion (1 for BasicBlock, 4 for Bottleneck).

The networks live in `torch_reference_networks`, the discriminators and the step's loss terms
in `torch_reference_objective`; every name below is importable from here.

Public API
----------
- ``build_cifar_mixskd(depth, num_classes)``            -> ``MixSKDResNet`` (depth 18 or 50)
- ``build_imagenet_mixskd_resnet50(num_classes)``      -> ``MixSKDResNet``
- ``make_discriminators(in_dim, hidden=128, count=4)`` -> list of ``nn.Sequential``
- ``kl_t(student, teacher, T)``                        -> scalar KL_T(s || t)
- ``reference_terms(model, discriminators, x, y, lam, perm, T=3.0)`` -> dict of loss terms
- ``save_official_checkpoint(model, path)``           -> writes the official file format
"""

from __future__ import annotations

import torch
from torch import nn

from mixskd_jax.interop import torch_reference_networks
from mixskd_jax.interop.torch_reference_networks import (
    AuxiliaryClassifier, BasicBlock, Bottleneck, MixSKDResNet, ResNetBackbone, SelfTeacher,
    build_cifar_mixskd, build_imagenet_mixskd_resnet50)
from mixskd_jax.interop.torch_reference_objective import kl_t, make_discriminators, reference_terms

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNetBackbone",
    "AuxiliaryClassifier",
    "SelfTeacher",
    "MixSKDResNet",
    "build_cifar_mixskd",
    "build_imagenet_mixskd_resnet50",
    "make_discriminators",
    "kl_t",
    "reference_terms",
    "save_official_checkpoint",
    "randomize_batchnorm",
]

# The residual-block type the networks are built from (a type alias, importable from here).
Block = torch_reference_networks.Block


# ---------------------------------------------------------------------------
# Checkpoint (spec section 10)
# ---------------------------------------------------------------------------


def save_official_checkpoint(model: nn.Module, path) -> None:
    """Write ``{'net': state_dict, 'acc': 0.0, 'epoch': 0}`` like the official scripts."""
    torch.save({"net": model.state_dict(), "acc": 0.0, "epoch": 0}, path)


def randomize_batchnorm(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm scales, biases and running statistics, so that comparisons of
    eval-mode outputs cannot pass on the identity initialization."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
