"""Independent PyTorch re-implementation of the official MixSKD model and step objective.

The ground truth the tests hold the JAX/Flax port against (logits, features, loss terms,
BatchNorm running statistics and the checkpoint key layout), and the PyTorch side of
`python -m mixskd_jax.benchmark --against=torch`. It is written from the project's
specification of the official code (sections A, B and 10); no code is taken from the
official repository. Importing it needs PyTorch, an optional dependency: nothing else in the
package imports it.

Conventions: all tensors here are NCHW (PyTorch). ``B`` is the clean batch size, the
network always sees ``2B`` rows (clean half first, mixup half second), ``C`` is the
number of classes and ``exp`` the block expansion (1 for BasicBlock, 4 for Bottleneck).

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

from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

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


# ---------------------------------------------------------------------------
# Residual blocks (post-activation, spec A.1)
# ---------------------------------------------------------------------------


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """1x1 conv (no bias, stride) + BN shortcut.

    An ``nn.Sequential`` so that the state_dict keys are ``downsample.0.weight`` and
    ``downsample.1.*`` exactly as in the official checkpoints (spec section 10).
    """
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


def _shortcut(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
    """The projection where the shape changes, else None: an identity shortcut has no keys."""
    if stride != 1 or in_planes != out_planes:
        return _projection(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU.

    (N, in_planes, H, W) -> (N, planes, H/stride, W/stride)
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet V1.5 bottleneck: 1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(x4)-BN, + shortcut, ReLU.

    (N, in_planes, H, W) -> (N, 4*planes, H/stride, W/stride)
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # V1.5: the stride sits on the 3x3 conv, not on the first 1x1.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]

# (planes, stride) of the four stages; the first block of a stage carries the stride.
_STAGES: Tuple[Tuple[int, int], ...] = ((64, 1), (128, 2), (256, 2), (512, 2))


def _make_stage(block: Block, in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """A stage = nn.Sequential of blocks (keys ``{b}.conv1.weight`` ...)."""
    blocks = [block(in_planes, planes, stride)]
    for _ in range(1, num_blocks):
        blocks.append(block(planes * block.expansion, planes, 1))
    return nn.Sequential(*blocks)


# ---------------------------------------------------------------------------
# Backbone (spec A.1 CIFAR / A.7 ImageNet)
# ---------------------------------------------------------------------------


class ResNetBackbone(nn.Module):
    """ResNet backbone returning logits and the four stage outputs.

    ``stem='cifar'``: 3x3 s1 p1 conv 3->64, BN, and deliberately **no ReLU** (a quirk of
    the official CIFAR MixSKD model, spec A.1 / B.5 item 9).
    ``stem='imagenet'``: 7x7 s2 p3 conv, BN, ReLU, 3x3 s2 p1 max-pool (torchvision style).

    forward: x (N, 3, H, W) -> (logits (N, C), [F1, F2, F3, F4]) with
    F_s of shape (N, planes_s*exp, H/r_s, W/r_s).
    """

    def __init__(self, block: Block, num_blocks: Sequence[int], num_classes: int, stem: str):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}")
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for s, ((planes, stride), n) in enumerate(zip(_STAGES, num_blocks), start=1):
            setattr(self, f"layer{s}", _make_stage(block, in_planes, planes, n, stride))
            in_planes = planes * block.expansion
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        out = self.bn1(self.conv1(x))
        if self.stem == "imagenet":
            out = F.max_pool2d(F.relu(out), kernel_size=3, stride=2, padding=1)
        # CIFAR stem: no ReLU here on purpose (official behaviour).
        feats = []
        for s in range(1, 5):
            out = getattr(self, f"layer{s}")(out)
            feats.append(out)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
        return logits, feats


# ---------------------------------------------------------------------------
# Auxiliary branches (spec A.2)
# ---------------------------------------------------------------------------


class AuxiliaryClassifier(nn.Module):
    """Three unshared copies of the later backbone stages, each with its own head.

    ``block_extractor{k}`` (k = 1..3) is an nn.Sequential of copies of stages k+1..4
    (indexed j = 0.. inside the branch) and ``fc{k}`` its Linear(512*exp -> C).

    forward: [F1, F2, F3] (F4 may be passed too and is ignored) ->
    (logits [z1, z2, z3] each (N, C), features [A1, A2, A3] each shaped like F4).
    """

    def __init__(self, block: Block, num_blocks: Sequence[int], num_classes: int):
        super().__init__()
        for k in range(1, 4):
            in_planes = _STAGES[k - 1][0] * block.expansion  # channels of F_k
            stages = []
            for s in range(k, 4):  # copies of backbone stages s+1 (0-based index s)
                planes, stride = _STAGES[s]
                stages.append(_make_stage(block, in_planes, planes, num_blocks[s], stride))
                in_planes = planes * block.expansion
            setattr(self, f"block_extractor{k}", nn.Sequential(*stages))
            setattr(self, f"fc{k}", nn.Linear(512 * block.expansion, num_classes))

    def forward(self, stage_feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, feats = [], []
        for k in range(1, 4):
            a = getattr(self, f"block_extractor{k}")(stage_feats[k - 1])
            feats.append(a)
            logits.append(getattr(self, f"fc{k}")(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)))
        return logits, feats


# ---------------------------------------------------------------------------
# Self-teacher (spec A.4)
# ---------------------------------------------------------------------------


class SelfTeacher(nn.Module):
    """concat(4 maps) -> 1x1 conv (no bias, no BN, no act) -> GAP -> Linear.

    forward: (N, 4*512*exp, h, w) -> (N, C)
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(4 * channels, channels, kernel_size=1, bias=False)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.conv(x), 1)
        return self.fc(torch.flatten(out, 1))


# ---------------------------------------------------------------------------
# Full MixSKD model (spec A.3)
# ---------------------------------------------------------------------------


class MixSKDResNet(nn.Module):
    """Backbone + 3 auxiliary branches + self-teacher.

    Attribute names reproduce the official state_dict layout (spec section 10):
    ``backbone``, ``auxiliary_classifier``, ``final_aux_classifier``.

    forward: x (N, 3, H, W) -> (logits [z1, z2, z3, z4], features [A1, A2, A3, F4]),
    ordered branch1, branch2, branch3, backbone. The self-teacher is NOT applied in
    forward; call :meth:`self_teacher` on a feature list instead.
    """

    def __init__(self, block: Block, num_blocks: Sequence[int], num_classes: int, stem: str):
        super().__init__()
        self.backbone = ResNetBackbone(block, num_blocks, num_classes, stem)
        self.auxiliary_classifier = AuxiliaryClassifier(block, num_blocks, num_classes)
        self.final_aux_classifier = SelfTeacher(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        z4, stage_feats = self.backbone(x)
        aux_logits, aux_feats = self.auxiliary_classifier(stage_feats[:3])
        return aux_logits + [z4], aux_feats + [stage_feats[3]]

    def self_teacher(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """[G1..G4] each (N, 512*exp, h, w) -> logits (N, C); channel order G1, G2, G3, G4."""
        return self.final_aux_classifier(torch.cat(list(features), dim=1))


def build_cifar_mixskd(depth: int, num_classes: int) -> MixSKDResNet:
    """CIFAR MixSKD ResNet-18 (BasicBlock [2,2,2,2]) or ResNet-50 (Bottleneck [3,4,6,3]).

    PyTorch default initialisation everywhere (the official CIFAR model has no custom init).
    """
    if depth == 18:
        return MixSKDResNet(BasicBlock, [2, 2, 2, 2], num_classes, stem="cifar")
    if depth == 50:
        return MixSKDResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem="cifar")
    raise ValueError(f"unsupported depth {depth}; expected 18 or 50")


def build_imagenet_mixskd_resnet50(num_classes: int) -> MixSKDResNet:
    """ImageNet MixSKD ResNet-50 V1.5 with full-depth branches (spec A.7).

    Init: kaiming-normal (fan_out, ReLU gain) for every Conv2d in the backbone and the
    branches, BN gamma=1 / beta=0. Linear layers and the self-teacher 1x1 conv keep the
    PyTorch default (the official self-teacher class has no custom init).
    """
    model = MixSKDResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem="imagenet")
    for part in (model.backbone, model.auxiliary_classifier):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


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

    def mix_ce(z: torch.Tensor) -> torch.Tensor:
        return lam * F.cross_entropy(z, y) + (1.0 - lam) * F.cross_entropy(z, y_b)

    clean = [z[:B] for z in logits]
    mixed = [z[B:] for z in logits]
    # Interpolation of pre-softmax logits / feature maps of the clean half (spec B.2).
    interp = [lam * c + (1.0 - lam) * c[perm] for c in clean]
    g_clean = [g[:B] for g in feats]
    g_mix = [g[B:] for g in feats]
    g_interp = [lam * g + (1.0 - lam) * g[perm] for g in g_clean]

    t_hat = model.self_teacher(g_interp)  # self-teacher on interpolated features
    t_tilde = model.self_teacher(g_mix)  # self-teacher on mixup-image features

    clean_ce = sum(F.cross_entropy(c, y) for c in clean)
    mixup_ce = sum(mix_ce(m) for m in mixed)
    self_teacher_ce = mix_ce(t_hat) + mix_ce(t_tilde)

    # Backbone head: cross-view distillation from the self-teacher (teacher side detached).
    kl_self_teacher = kl_t(interp[3], t_tilde.detach(), T) + kl_t(mixed[3], t_hat.detach(), T)
    # Auxiliary heads: mutual, symmetric, teacher side detached.
    kl_branches = sum(
        kl_t(interp[k], mixed[k].detach(), T) + kl_t(mixed[k], interp[k].detach(), T) for k in range(3)
    )
    # Mutual feature MSE: no stop-gradient on either side (spec B.5 item 4).
    feature_mse = sum(F.mse_loss(gi, gm) for gi, gm in zip(g_interp, g_mix))

    # Fixed random discriminators: interpolated rows -> [1, 0], mixup rows -> [0, 1].
    target = torch.cat(
        [x.new_tensor([[1.0, 0.0]]).expand(B, 2), x.new_tensor([[0.0, 1.0]]).expand(B, 2)], dim=0
    )
    discriminator = sum(
        F.binary_cross_entropy_with_logits(d(torch.cat([_gap(gi), _gap(gm)], dim=0)), target)
        for d, gi, gm in zip(discriminators, g_interp, g_mix)
    )

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
