"""The official MixSKD networks in PyTorch, written from the spec (sections A.1-A.4, A.7).

Part of the independent PyTorch reference (`mixskd_jax.interop.torch_reference`, whose
docstring has the conventions and the public API): residual blocks, the ResNet backbone, the
three auxiliary branches and the self-teacher, with attribute names that reproduce the official
state_dict layout (spec section 10), and the CIFAR and ImageNet builders. Importing it needs
PyTorch; nothing in the package imports it except the reference itself.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

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
