"""One MixSKD training step's loss terms in PyTorch, as the official scripts compute them
(spec A.5, B.1-B.3).

Part of the independent PyTorch reference (`mixskd_jax.interop.torch_reference`, whose
docstring has the conventions and the public API): the fixed random discriminators, the
temperature KL, and `reference_terms`, every term of one step from a single forward pass over
[clean ; mixup]. Importing it needs PyTorch; nothing in the package imports it except the
reference itself.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mixskd_jax.interop.torch_reference_networks import MixSKDResNet


# ---------------------------------------------------------------------------
# Discriminators (spec A.5)
# ---------------------------------------------------------------------------


def make_discriminators(in_dim: int, hidden: int = 128, count: int = 4) -> List[nn.Sequential]:
    """``count`` MLPs Linear(in_dim, hidden)-ReLU-Linear(hidden, 2): (M, in_dim) -> (M, 2).

    Returned as a plain Python list, mirroring the official code: they are not registered
    sub-modules, never optimised and never checkpointed (spec A.5).
    """
    return [nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2)) for _ in range(count)]


# ---------------------------------------------------------------------------
# One training step's objective (spec B.1-B.3)
# ---------------------------------------------------------------------------


def kl_t(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL_T(s || t) = T^2 * batchmean KL(softmax(t/T) || softmax(s/T)); (B, C), (B, C) -> ()."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="batchmean") * (T * T)


def _gap(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C)."""
    return x.mean(dim=(2, 3))


class _Views(NamedTuple):
    """The heads' outputs of the 2B-row forward pass split into the two views (lists over
    heads: branch1, branch2, branch3, backbone)."""

    clean: List[torch.Tensor]  # logits on the clean images, each (B, C)
    mixed: List[torch.Tensor]  # logits on the mixup images, each (B, C)
    interp: List[torch.Tensor]  # the clean logits interpolated with (lam, perm)
    g_interp: List[torch.Tensor]  # the clean feature maps interpolated with (lam, perm)
    g_mix: List[torch.Tensor]  # feature maps of the mixup images


def _split_views(logits: Sequence[torch.Tensor], feats: Sequence[torch.Tensor], lam: float,
                 perm: torch.Tensor, B: int) -> _Views:
    """Clean half vs mixup half of every head, and the clean half's interpolation."""
    clean = [z[:B] for z in logits]
    mixed = [z[B:] for z in logits]
    # Interpolation of pre-softmax logits / feature maps of the clean half (spec B.2).
    interp = [lam * c + (1.0 - lam) * c[perm] for c in clean]
    g_clean = [g[:B] for g in feats]
    g_mix = [g[B:] for g in feats]
    g_interp = [lam * g + (1.0 - lam) * g[perm] for g in g_clean]
    return _Views(clean=clean, mixed=mixed, interp=interp, g_interp=g_interp, g_mix=g_mix)


def _cross_entropy_terms(views: _Views, t_hat: torch.Tensor, t_tilde: torch.Tensor,
                         y: torch.Tensor, y_b: torch.Tensor, lam: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean_ce, mixup_ce, self_teacher_ce): CE on the clean halves, mixup CE on the mixup
    halves and on both self-teacher outputs."""

    def mix_ce(z: torch.Tensor) -> torch.Tensor:
        return lam * F.cross_entropy(z, y) + (1.0 - lam) * F.cross_entropy(z, y_b)

    clean_ce = sum(F.cross_entropy(c, y) for c in views.clean)
    mixup_ce = sum(mix_ce(m) for m in views.mixed)
    self_teacher_ce = mix_ce(t_hat) + mix_ce(t_tilde)
    return clean_ce, mixup_ce, self_teacher_ce


def _distillation_terms(views: _Views, t_hat: torch.Tensor, t_tilde: torch.Tensor,
                        T: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kl_self_teacher, kl_branches): the cross-view KL terms, teacher side detached."""
    interp, mixed = views.interp, views.mixed
    # Backbone head: cross-view distillation from the self-teacher (teacher side detached).
    kl_self_teacher = kl_t(interp[3], t_tilde.detach(), T) + kl_t(mixed[3], t_hat.detach(), T)
    # Auxiliary heads: mutual, symmetric, teacher side detached.
    kl_branches = sum(
        kl_t(interp[k], mixed[k].detach(), T) + kl_t(mixed[k], interp[k].detach(), T) for k in range(3)
    )
    return kl_self_teacher, kl_branches


def _discriminator_term(discriminators: Sequence[nn.Module], views: _Views,
                        x: torch.Tensor) -> torch.Tensor:
    """The summed BCE of the discriminators on each head's pooled [interpolated ; mixup]."""
    B = x.shape[0]
    # Fixed random discriminators: interpolated rows -> [1, 0], mixup rows -> [0, 1].
    target = torch.cat(
        [x.new_tensor([[1.0, 0.0]]).expand(B, 2), x.new_tensor([[0.0, 1.0]]).expand(B, 2)], dim=0
    )
    return sum(
        F.binary_cross_entropy_with_logits(d(torch.cat([_gap(gi), _gap(gm)], dim=0)), target)
        for d, gi, gm in zip(discriminators, views.g_interp, views.g_mix)
    )


def reference_terms(
    model: MixSKDResNet,
    discriminators: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    perm: torch.Tensor,
    T: float = 3.0,
) -> Dict[str, Union[torch.Tensor, List[torch.Tensor]]]:
    """Loss terms of one MixSKD training step, exactly as the official scripts compute them.

    Args:
      model: a ``MixSKDResNet``; it is put in train mode (BN running stats get updated once).
      discriminators: the 4 discriminator MLPs (frozen in the official code, applied as-is).
      x: clean images (B, 3, H, W); y: labels (B,) int64.
      lam: mixup coefficient (one scalar per batch); perm: permutation (B,) int64.
      T: KD temperature.

    Returns a dict of scalar tensors ``clean_ce, mixup_ce, self_teacher_ce, kl_self_teacher,
    kl_branches, feature_mse, discriminator, loss_cifar, loss_imagenet`` (all differentiable),
    plus ``logits`` ([z1..z4], each (2B, C)) and ``features`` ([A1, A2, A3, F4], each
    (2B, 512*exp, h, w)) from the single forward pass.
    """
    model.train()
    B = x.shape[0]
    y_b = y[perm]
    x_mix = lam * x + (1.0 - lam) * x[perm]
    # One forward over [clean ; mixup]: BN statistics are computed jointly over both halves.
    logits, feats = model(torch.cat([x, x_mix], dim=0))
    views = _split_views(logits, feats, lam, perm, B)

    t_hat = model.self_teacher(views.g_interp)  # self-teacher on interpolated features
    t_tilde = model.self_teacher(views.g_mix)  # self-teacher on mixup-image features

    clean_ce, mixup_ce, self_teacher_ce = _cross_entropy_terms(views, t_hat, t_tilde, y, y_b, lam)
    kl_self_teacher, kl_branches = _distillation_terms(views, t_hat, t_tilde, T)
    # Mutual feature MSE: no stop-gradient on either side (spec B.5 item 4).
    feature_mse = sum(F.mse_loss(gi, gm) for gi, gm in zip(views.g_interp, views.g_mix))
    discriminator = _discriminator_term(discriminators, views, x)

    loss_cifar = clean_ce + kl_self_teacher + kl_branches + feature_mse + discriminator
    loss_imagenet = loss_cifar + mixup_ce + self_teacher_ce
    return {
        "clean_ce": clean_ce,
        "mixup_ce": mixup_ce,
        "self_teacher_ce": self_teacher_ce,
        "kl_self_teacher": kl_self_teacher,
        "kl_branches": kl_branches,
        "feature_mse": feature_mse,
        "discriminator": discriminator,
        "loss_cifar": loss_cifar,
        "loss_imagenet": loss_imagenet,
        "logits": logits,
        "features": feats,
    }
