"""Tests of the PyTorch reference itself (tests/torch_reference.py).

The reference is the ground truth for the JAX port, so its structure (key layout,
parameter counts, shapes) and objective (spec B.1-B.4) are checked against the spec
/work/shared/spec/mixskd-reference.md before anything is compared to it.
"""

import math
import re

import pytest

torch = pytest.importorskip("torch")

from tests import torch_reference as R  # noqa: E402

torch.set_num_threads(2)

# Builds the full-size PyTorch models: the slow tier (pytest --slow), run by CI.
pytestmark = pytest.mark.slow


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def cifar18():
    torch.manual_seed(0)
    return R.build_cifar_mixskd(18, 100)


@pytest.fixture(scope="module")
def imagenet50():
    torch.manual_seed(0)
    return R.build_imagenet_mixskd_resnet50(1000)


def _batch(B=4, hw=32, C=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, hw, hw, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    perm = torch.randperm(B, generator=g)
    return x, y, perm


# ---------------------------------------------------------------------------
# Checkpoint key layout (spec section 10)
# ---------------------------------------------------------------------------


def test_cifar18_state_dict_layout(cifar18):
    sd = cifar18.state_dict()
    assert len(sd) == 311

    expected_shapes = {
        "backbone.conv1.weight": (64, 3, 3, 3),
        "backbone.bn1.running_var": (64,),
        "backbone.layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "backbone.layer2.0.downsample.1.running_mean": (128,),
        "backbone.layer4.1.conv2.weight": (512, 512, 3, 3),
        "backbone.fc.weight": (100, 512),
        "backbone.fc.bias": (100,),
        # branch 1 = copies of stages 2, 3, 4 (j = 0, 1, 2); its first block sees F1 (64 ch).
        "auxiliary_classifier.block_extractor1.0.0.conv1.weight": (128, 64, 3, 3),
        "auxiliary_classifier.block_extractor1.0.0.downsample.0.weight": (128, 64, 1, 1),
        "auxiliary_classifier.block_extractor1.2.1.bn2.weight": (512,),
        "auxiliary_classifier.block_extractor2.0.0.conv1.weight": (256, 128, 3, 3),
        "auxiliary_classifier.block_extractor3.0.0.conv1.weight": (512, 256, 3, 3),
        "auxiliary_classifier.block_extractor3.0.1.bn2.running_var": (512,),
        "auxiliary_classifier.fc1.weight": (100, 512),
        "auxiliary_classifier.fc3.bias": (100,),
        "final_aux_classifier.conv.weight": (512, 2048, 1, 1),
        "final_aux_classifier.fc.weight": (100, 512),
        "final_aux_classifier.fc.bias": (100,),
    }
    for key, shape in expected_shapes.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key

    # Identity shortcuts have no keys; the self-teacher conv has no bias; no 'module.' prefix.
    absent = [
        "backbone.layer1.0.downsample.0.weight",
        "backbone.layer2.1.downsample.0.weight",
        "auxiliary_classifier.block_extractor1.0.1.downsample.0.weight",
        "final_aux_classifier.conv.bias",
        "backbone.relu.weight",
    ]
    for key in absent:
        assert key not in sd, key
    assert "backbone.bn1.num_batches_tracked" in sd

    block = r"\d+\.(conv[12]\.weight|bn[12]\.(weight|bias|running_mean|running_var|num_batches_tracked)" \
            r"|downsample\.0\.weight|downsample\.1\.(weight|bias|running_mean|running_var|num_batches_tracked))"
    bn = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
    patterns = [
        r"backbone\.conv1\.weight",
        rf"backbone\.bn1\.{bn}",
        rf"backbone\.layer[1-4]\.{block}",
        r"backbone\.fc\.(weight|bias)",
        rf"auxiliary_classifier\.block_extractor1\.[0-2]\.{block}",
        rf"auxiliary_classifier\.block_extractor2\.[0-1]\.{block}",
        rf"auxiliary_classifier\.block_extractor3\.0\.{block}",
        r"auxiliary_classifier\.fc[1-3]\.(weight|bias)",
        r"final_aux_classifier\.conv\.weight",
        r"final_aux_classifier\.fc\.(weight|bias)",
    ]
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    bad = [k for k in sd if not regex.fullmatch(k)]
    assert not bad, bad[:10]


def test_bottleneck_keys_have_conv3():
    torch.manual_seed(0)
    sd = R.build_cifar_mixskd(50, 10).state_dict()
    assert tuple(sd["backbone.layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    # layer1 block 0 changes channels 64 -> 256, so it has a stride-1 projection.
    assert tuple(sd["backbone.layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    # V1.5: the stride-2 conv is the 3x3 (conv2); conv1 is 1x1.
    assert tuple(sd["backbone.layer2.0.conv1.weight"].shape) == (128, 256, 1, 1)
    assert tuple(sd["auxiliary_classifier.block_extractor1.1.5.bn3.weight"].shape) == (1024,)
    assert tuple(sd["final_aux_classifier.conv.weight"].shape) == (2048, 8192, 1, 1)


# ---------------------------------------------------------------------------
# Parameter counts (spec table A.9)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, backbone, branches, teacher",
    [
        (lambda: R.build_cifar_mixskd(18, 100), 11_220_132, 30_060_076, 1_099_876),
        (lambda: R.build_cifar_mixskd(50, 100), 23_705_252, 60_925_228, 16_982_116),
        (lambda: R.build_imagenet_mixskd_resnet50(1000), 25_557_032, 66_457_528, 18_826_216),
    ],
    ids=["cifar18", "cifar50", "imagenet50"],
)
def test_parameter_counts(builder, backbone, branches, teacher):
    model = builder()
    assert _count(model.backbone) == backbone
    assert _count(model.auxiliary_classifier) == branches
    assert _count(model.final_aux_classifier) == teacher
    assert _count(model) == backbone + branches + teacher


@pytest.mark.parametrize("in_dim, total", [(512, 263_688), (2048, 1_050_120)])
def test_discriminator_counts(in_dim, total):
    ds = R.make_discriminators(in_dim)
    assert len(ds) == 4
    assert sum(_count(d) for d in ds) == total
    out = ds[0](torch.zeros(6, in_dim))
    assert tuple(out.shape) == (6, 2)


# ---------------------------------------------------------------------------
# Forward shapes and architecture quirks
# ---------------------------------------------------------------------------


def test_cifar18_forward_shapes(cifar18):
    cifar18.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = cifar18(x)
        st = cifar18.self_teacher(feats)
    assert len(logits) == 4 and len(feats) == 4
    for z in logits:
        assert tuple(z.shape) == (2, 100)
    for g in feats:
        assert tuple(g.shape) == (2, 512, 4, 4)
    assert tuple(st.shape) == (2, 100)


def test_cifar50_forward_shapes():
    torch.manual_seed(0)
    model = R.build_cifar_mixskd(50, 100).train()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(z.shape) for z in logits] == [(2, 100)] * 4
    assert [tuple(g.shape) for g in feats] == [(2, 2048, 4, 4)] * 4


def test_cifar_stem_has_no_relu(cifar18):
    """The official CIFAR MixSKD stem is conv-BN without ReLU: layer1's input can be < 0."""
    seen = {}
    handle = cifar18.backbone.layer1.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    try:
        cifar18.eval()
        with torch.no_grad():
            cifar18(torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert seen["x"].min() < 0
    assert tuple(seen["x"].shape) == (2, 64, 32, 32)


def test_imagenet_stem_and_shapes(imagenet50):
    """ImageNet stem is conv-BN-ReLU-maxpool (/4); all feature maps are /32."""
    seen = {}
    handle = imagenet50.backbone.layer1.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    try:
        imagenet50.eval()
        with torch.no_grad():
            logits, feats = imagenet50(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    assert tuple(seen["x"].shape) == (1, 64, 16, 16)
    assert seen["x"].min() >= 0
    assert [tuple(z.shape) for z in logits] == [(1, 1000)] * 4
    assert [tuple(g.shape) for g in feats] == [(1, 2048, 2, 2)] * 4


def test_imagenet_init(imagenet50):
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (C_out * k * k)).
    for w in (
        imagenet50.backbone.layer4[0].conv2.weight,
        imagenet50.auxiliary_classifier.block_extractor1[0][0].conv1.weight,
    ):
        c_out, _, kh, kw = w.shape
        expected = math.sqrt(2.0 / (c_out * kh * kw))
        assert abs(w.std().item() / expected - 1.0) < 0.05
    bn = imagenet50.auxiliary_classifier.block_extractor2[1][2].bn3
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # The self-teacher conv keeps the PyTorch default U(+-1/sqrt(fan_in)) (fan_in = 8192).
    w = imagenet50.final_aux_classifier.conv.weight
    assert w.abs().max().item() <= 1.0 / math.sqrt(8192) + 1e-7


# ---------------------------------------------------------------------------
# One-step objective (spec B)
# ---------------------------------------------------------------------------

SCALARS = [
    "clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
    "feature_mse", "discriminator", "loss_cifar", "loss_imagenet",
]


def test_reference_terms_finite_and_consistent(cifar18):
    torch.manual_seed(2)
    discs = R.make_discriminators(512)
    x, y, perm = _batch()
    out = R.reference_terms(cifar18, discs, x, y, lam=0.7, perm=perm)
    for name in SCALARS:
        assert out[name].dim() == 0, name
        assert torch.isfinite(out[name]), name
    for name in ("clean_ce", "mixup_ce", "self_teacher_ce", "discriminator"):
        assert out[name] > 0, name
    assert [tuple(z.shape) for z in out["logits"]] == [(8, 100)] * 4
    assert [tuple(g.shape) for g in out["features"]] == [(8, 512, 4, 4)] * 4
    torch.testing.assert_close(out["loss_imagenet"] - out["loss_cifar"], out["mixup_ce"] + out["self_teacher_ce"])
    torch.testing.assert_close(
        out["loss_cifar"],
        out["clean_ce"] + out["kl_self_teacher"] + out["kl_branches"] + out["feature_mse"] + out["discriminator"],
    )


def test_reference_terms_match_manual_recomputation(cifar18):
    """Recompute a few terms from the returned raw logits/features with explicit formulas."""
    torch.manual_seed(3)
    discs = R.make_discriminators(512)
    x, y, perm = _batch(seed=5)
    lam, T, B = 0.35, 3.0, x.shape[0]
    out = R.reference_terms(cifar18, discs, x, y, lam=lam, perm=perm, T=T)
    with torch.no_grad():
        logits, feats = out["logits"], out["features"]

        def ce(z, t):
            return -(torch.log_softmax(z, 1).gather(1, t[:, None])).mean()

        def kl(s, t):
            p = torch.softmax(t / T, 1)
            return (p * (torch.log(p) - torch.log_softmax(s / T, 1))).sum(1).mean() * T * T

        clean_ce = sum(ce(z[:B], y) for z in logits)
        mixup_ce = sum(lam * ce(z[B:], y) + (1 - lam) * ce(z[B:], y[perm]) for z in logits)
        z_hat = [lam * z[:B] + (1 - lam) * z[:B][perm] for z in logits]
        kl_br = sum(kl(z_hat[k], logits[k][B:]) + kl(logits[k][B:], z_hat[k]) for k in range(3))
        g_hat = [lam * g[:B] + (1 - lam) * g[:B][perm] for g in feats]
        fmse = sum(((gh - g[B:]) ** 2).mean() for gh, g in zip(g_hat, feats))
        # Self-teacher by hand: 1x1 conv == matmul over channels; GAP commutes with it.
        w = cifar18.final_aux_classifier.conv.weight[:, :, 0, 0]
        fc = cifar18.final_aux_classifier.fc

        def teacher(gs):
            return fc(torch.cat([g.mean((2, 3)) for g in gs], 1) @ w.t())

        t_hat, t_tilde = teacher(g_hat), teacher([g[B:] for g in feats])
        kl_st = kl(z_hat[3], t_tilde) + kl(logits[3][B:], t_hat)
        st_ce = sum(lam * ce(t, y) + (1 - lam) * ce(t, y[perm]) for t in (t_hat, t_tilde))

        def bce(a, t):
            return (torch.clamp(a, min=0) - a * t + torch.log1p(torch.exp(-a.abs()))).mean()

        target = torch.tensor([[1.0, 0.0]] * B + [[0.0, 1.0]] * B)
        disc = sum(
            bce(d(torch.cat([gh.mean((2, 3)), g[B:].mean((2, 3))])), target) for d, gh, g in zip(discs, g_hat, feats)
        )
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["clean_ce"].detach(), clean_ce, **tol)
    torch.testing.assert_close(out["mixup_ce"].detach(), mixup_ce, **tol)
    torch.testing.assert_close(out["kl_branches"].detach(), kl_br, **tol)
    torch.testing.assert_close(out["feature_mse"].detach(), fmse, **tol)
    torch.testing.assert_close(out["kl_self_teacher"].detach(), kl_st, **tol)
    torch.testing.assert_close(out["self_teacher_ce"].detach(), st_ce, **tol)
    torch.testing.assert_close(out["discriminator"].detach(), disc, **tol)


def test_identity_mixup_degenerates(cifar18):
    """lam=1, perm=id: the mixup half equals the clean half, so the mutual terms vanish."""
    torch.manual_seed(4)
    discs = R.make_discriminators(512)
    x, y, _ = _batch()
    out = R.reference_terms(cifar18, discs, x, y, lam=1.0, perm=torch.arange(x.shape[0]))
    assert out["kl_branches"].abs() < 1e-4
    assert out["feature_mse"].abs() < 1e-8
    torch.testing.assert_close(out["mixup_ce"], out["clean_ce"], rtol=1e-5, atol=1e-5)
    assert out["kl_self_teacher"] > 0  # z4 vs the (random) self-teacher: not zero


def test_gradient_flow(cifar18):
    """Spec B.4: the CIFAR loss gives the self-teacher no gradient; the ImageNet loss does."""
    torch.manual_seed(6)
    discs = R.make_discriminators(512)
    x, y, perm = _batch()
    st = cifar18.final_aux_classifier

    cifar18.zero_grad(set_to_none=True)
    R.reference_terms(cifar18, discs, x, y, lam=0.6, perm=perm)["loss_cifar"].backward()
    assert st.conv.weight.grad is None and st.fc.weight.grad is None
    assert cifar18.backbone.conv1.weight.grad is not None
    assert cifar18.auxiliary_classifier.fc1.weight.grad is not None

    cifar18.zero_grad(set_to_none=True)
    R.reference_terms(cifar18, discs, x, y, lam=0.6, perm=perm)["loss_imagenet"].backward()
    assert st.conv.weight.grad is not None and st.conv.weight.grad.abs().sum() > 0
    cifar18.zero_grad(set_to_none=True)


def test_bn_running_stats_updated_jointly():
    """One forward on [clean; mixup]: running stats move by momentum 0.1 toward 2B-batch stats."""
    torch.manual_seed(7)
    model = R.build_cifar_mixskd(18, 10)
    discs = R.make_discriminators(512)
    x, y, perm = _batch(C=10)
    lam = 0.4
    with torch.no_grad():
        x_all = torch.cat([x, lam * x + (1 - lam) * x[perm]])
        h = model.backbone.conv1(x_all)
    R.reference_terms(model, discs, x, y, lam=lam, perm=perm)
    bn = model.backbone.bn1
    assert bn.num_batches_tracked.item() == 1
    n = h.numel() / h.shape[1]
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        bn.running_var, 0.9 + 0.1 * h.var((0, 2, 3), unbiased=False) * n / (n - 1), rtol=1e-4, atol=1e-6
    )


def test_checkpoint_roundtrip(tmp_path, cifar18):
    path = tmp_path / "MixSKD_CIFAR_ResNet18.pth.tar"
    R.save_official_checkpoint(cifar18, path)
    ckpt = torch.load(path, map_location="cpu")
    assert set(ckpt) == {"net", "acc", "epoch"}
    assert ckpt["acc"] == 0.0 and ckpt["epoch"] == 0
    assert len(ckpt["net"]) == 311
    fresh = R.build_cifar_mixskd(18, 100)
    fresh.load_state_dict(ckpt["net"], strict=True)
    torch.testing.assert_close(fresh.final_aux_classifier.conv.weight, cifar18.final_aux_classifier.conv.weight)
