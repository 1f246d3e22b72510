"""bnfold.torch on real model families (issue 14): timm's BatchNormAct2d, torchvision's
FrozenBatchNorm2d, user-named BN-like classes, forward folds (the Keras order) and the dynamo
exporter's accounting of every BatchNorm module.

timm and torchvision are optional: the real classes are used when they import, and equivalent
classes written here (same buffers, same forward) otherwise, so the suite runs without them.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import logging  # noqa: E402

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.report import SkipReason  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------- the classes
class BatchNormAct2dLike(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d's forward: batch_norm, then ``drop``, then ``act``."""

    def __init__(self, c: int, act: type[nn.Module] | None = nn.SiLU) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        x = self.drop(x)
        return self.act(x)


class FrozenBatchNorm2dLike(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: buffers only, not a _BatchNorm."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def _timm_bnact():
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except Exception:  # noqa: BLE001 - timm missing or broken: use the equivalent class
        return None
    return lambda c, act=nn.SiLU: BatchNormAct2d(c, act_layer=act, apply_act=act is not None)


def _torchvision_frozen():
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except Exception:  # noqa: BLE001 - the index's torchvision is a CUDA build: often broken
        return None
    return FrozenBatchNorm2d


BNACT = [BatchNormAct2dLike] + ([_timm_bnact()] if _timm_bnact() else [])
FROZEN = [FrozenBatchNorm2dLike] + ([_torchvision_frozen()] if _torchvision_frozen() else [])


def randomize(model: nn.Module, seed: int = 0, positive: bool = False) -> nn.Module:
    """Statistics and affine parameters far from their defaults, on every BN-like module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is None or not hasattr(m, "weight"):
                continue
            c = m.running_var.shape[0]
            sign = torch.ones(c) if positive else torch.sign(torch.randn(c, generator=g))
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 1.8 + 0.2)
            m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
            m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def x_like(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.5


def calls(module: nn.Module, kinds: tuple[type, ...], x: torch.Tensor) -> int:
    """How many modules of ``kinds`` run in a forward of ``module``."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda *a: seen.append(1))
        for m in module.modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return len(seen)


# --------------------------------------------------------------------------- BatchNormAct2d
@pytest.mark.parametrize("make", BNACT, ids=lambda f: getattr(f, "__name__", "timm"))
def test_batchnormact_folds_into_the_conv_and_keeps_its_activation(make):
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            make(8),
            nn.Conv2d(8, 8, 3, groups=2, bias=False),
            make(8, act=None),
        )
    )
    x = x_like(2, 3, 10, 10)
    result = bt.fold_module(model, (x,))
    assert [d.status for d in result.decisions] == ["folded", "folded"]
    assert all(d.direction == "backward" and d.target_op == "Conv2d" for d in result.decisions)
    assert "act (SiLU)" in result.decisions[0].detail
    assert result.verification and result.verification.outputs[0].max_abs_error < 1e-4
    folded = result.module
    assert calls(folded, (nn.BatchNorm2d,), x) == 0
    assert calls(folded, (nn.SiLU,), x) == 1  # the activation is kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    # without example inputs the same: the recognition is structural
    assert all(d.folded for d in bt.fold_module(model).decisions)


def test_batchnormact_at_a_shared_call_site_keeps_the_activation_there():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = BatchNormAct2dLike(4, act=nn.ReLU)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)  # the Conv is also used without the BN

    model = randomize(Twice())
    x = x_like(2, 3, 7, 7)
    result = bt.fold_module(model, (x,))
    (d,) = result.decisions
    assert d.folded and "private copy" in d.detail
    assert result.verification.passed
    assert calls(result.module, (nn.ReLU,), x) == 1


def test_bn_subclass_with_another_forward_is_kept_with_a_true_reason():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2.0  # not "batch_norm then modules"

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4)))
    (d,) = bt.fold_module(model, (x_like(1, 3, 6, 6),)).decisions
    assert not d.folded and d.reason is SkipReason.CUSTOM_FORWARD
    assert "Scaled" in d.detail


# ------------------------------------------------------------------------ frozen / registered
@pytest.mark.parametrize("make", FROZEN, ids=lambda c: c.__module__.split(".")[0])
def test_frozen_batchnorm_folds_and_is_reported(make):
    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), make(6), nn.ReLU(), nn.Conv2d(6, 2, 1)))
    x = x_like(2, 3, 8, 8)
    result = bt.fold_module(model, (x,))
    (d,) = result.decisions
    assert d.folded and d.direction == "backward" and "frozen" in d.detail
    assert result.verification and result.verification.outputs[0].max_abs_error < 1e-4
    assert calls(result.module, (make,), x) == 0


def test_buffers_alone_do_not_make_a_frozen_batchnorm():
    class NotFrozen(FrozenBatchNorm2dLike):
        def forward(self, x):  # same buffers, other function
            return x * self.weight.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1)

    model = randomize(nn.Sequential(nn.Conv2d(3, 6, 3), NotFrozen(6)))
    (d,) = bt.fold_module(model, (x_like(1, 3, 5, 5),)).decisions
    assert not d.folded and d.reason is SkipReason.CUSTOM_FORWARD


class ChannelAffine(nn.Module):
    """A user's own frozen BN variant (no BN buffer names): y = x · a + b along channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.rand(c) + 0.5, requires_grad=False)
        self.b = nn.Parameter(torch.randn(c), requires_grad=False)

    def forward(self, x):
        return x * self.a.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)


def test_bn_like_extension_point_per_call_and_registered():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), ChannelAffine(5)).eval()
    x = x_like(2, 3, 6, 6)
    assert bt.fold_module(model, (x,)).decisions == []  # unknown class: not a BN
    per_call = bt.fold_module(model, (x,), bn_like={ChannelAffine: lambda m: (m.a, m.b)})
    (d,) = per_call.decisions
    assert d.folded and "registered affine" in d.detail and per_call.verification.passed
    assert calls(per_call.module, (ChannelAffine,), x) == 0
    bt.register_bn_like(ChannelAffine, lambda m: (m.a, m.b))
    try:
        assert bt.fold_module(model, (x,)).decisions[0].folded
    finally:
        bt.unregister_bn_like(ChannelAffine)
    assert bt.fold_module(model, (x,)).decisions == []
    # a wrong claim is caught by the verification, not silently written
    wrong = bt.fold_module(model, (x,), bn_like={ChannelAffine: lambda m: (m.a, m.b * 0)})
    assert not wrong.verification.passed


# ------------------------------------------------------------------------------ forward folds
def keras_order() -> nn.Module:
    """Conv → ReLU → BN → MaxPool → Conv → ReLU → BN → Flatten → Linear → ReLU → BN1d → Dropout
    → Linear: no BN has a foldable producer; each folds into the layer after it."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 16),
        nn.ReLU(),
        nn.BatchNorm1d(16),
        nn.Dropout(0.3),
        nn.Linear(16, 4),
    )
    return randomize(model, positive=True)  # max-pooling commutes with positive scales only


@pytest.mark.parametrize("with_inputs", [True, False])
def test_keras_order_model_folds_completely(with_inputs):
    model = keras_order()
    x = x_like(3, 3, 16, 16)
    result = bt.fold_module(model, (x,) if with_inputs else None)
    assert [(d.folded, d.direction, d.target) for d in result.decisions] == [
        (True, "forward", "4"),
        (True, "forward", "8"),
        (True, "forward", "12"),
    ]
    assert "MaxPool2d" in result.decisions[0].detail
    assert calls(result.module, (nn.BatchNorm1d, nn.BatchNorm2d), x) == 0
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-4)


def test_forward_fold_refuses_what_would_not_be_exact():
    model = keras_order()
    with torch.no_grad():
        model[2].weight[0] = -1.0  # a negative scale before the MaxPool
    x = x_like(2, 3, 16, 16)
    first = bt.fold_module(model, (x,)).decisions[0]
    assert not first.folded and first.reason is SkipReason.NON_POSITIVE_SCALE

    padded = randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)))
    padded.append(nn.Conv2d(4, 4, 3, padding=1))
    (d,) = bt.fold_module(padded, (x,)).decisions
    assert not d.folded and d.reason is SkipReason.PADDED_CONSUMER


def test_mean_then_batchnorm1d_head_folds_forward():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm1d(6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x).mean((2, 3))))

    model = randomize(Head())
    x = x_like(4, 3, 8, 8)
    result = bt.fold_module(model, (x,))
    (d,) = result.decisions
    assert d.folded and d.direction == "forward" and d.target == "fc"
    assert result.verification.passed
    # without inputs the rank after .mean() is unknown: kept, and it says so
    (kept,) = bt.fold_module(model).decisions
    assert not kept.folded and kept.reason is SkipReason.UNKNOWN_LAYOUT


# ------------------------------------------------------------------------------ the exporter
class Families(nn.Module):
    """One BN of each kind the dynamo export has to account for."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn_shared = nn.BatchNorm2d(8)  # its Conv's output also feeds the Add: kept
        self.c2 = nn.Conv2d(8, 8, 1)
        self.bn_plain = nn.BatchNorm2d(8)  # fused by the exporter's optimizer
        self.c3 = nn.Conv2d(8, 8, 1)
        self.frozen = FrozenBatchNorm2dLike(8)  # exported as Mul + Add: folded by bnfold
        self.c4 = nn.Conv2d(8, 8, 1)
        self.bn_act = BatchNormAct2dLike(8)
        self.unused = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.c1(x)
        z = torch.relu(self.bn_shared(y) + y)
        return self.bn_act(self.c4(self.frozen(self.c3(self.bn_plain(self.c2(z))))))


def test_export_uses_the_dynamo_exporter_and_accounts_for_every_bn_module(tmp_path):
    model = randomize(Families())
    out = tmp_path / "f.onnx"
    result = bt.export(model, (x_like(2, 3, 12, 12),), out)
    assert result and result.report.written
    report = result.report
    by_module = {}
    for d in report.decisions:
        for path in ("bn_shared", "bn_plain", "frozen", "bn_act", "unused"):
            if d.name.startswith(path) or f"module {path!r}" in d.detail:
                by_module.setdefault(path, []).append(d)
    assert sorted(by_module) == ["bn_act", "bn_plain", "bn_shared", "frozen", "unused"]
    assert all(len(ds) == 1 for ds in by_module.values()), by_module
    status = {p: ds[0].status for p, ds in by_module.items()}
    assert status["bn_plain"] == "fused_by_exporter" and status["bn_act"] == "fused_by_exporter"
    assert status["frozen"] == "folded" and by_module["frozen"][0].direction == "decomposed"
    assert status["bn_shared"] == "kept"
    assert by_module["unused"][0].reason is SkipReason.NOT_CALLED
    as_json = report.to_dict()
    assert {b["status"] for b in as_json["batchnorms"]} == {"folded", "kept", "fused_by_exporter"}
    assert as_json["totals"]["batchnorms"] == len(as_json["batchnorms"]) == 5
    assert report.verification.passed and report.verification.samples == 2


def test_torchscript_exporter_is_an_explicit_fallback_that_logs_its_deprecation(tmp_path, caplog):
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with caplog.at_level(logging.WARNING, logger="bnfold"):
        result = bt.export(model, x_like(1, 3, 6, 6), tmp_path / "t.onnx", exporter="torchscript")
    assert result and [d.status for d in result.decisions] == ["folded"]
    text = caplog.text
    assert "legacy TorchScript exporter" in text
    assert "torch.onnx.export:" in text  # torch's own deprecation warning, routed to the log
    with pytest.raises(Exception, match="exporter must be 'dynamo' or 'torchscript'"):
        bt.export(model, x_like(1, 3, 6, 6), tmp_path / "u.onnx", exporter="onnx")


# ------------------------------------------------------------------- LeViT's Linear -> flatten
class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm: Linear on [B, T, C], BatchNorm1d on [B·T, C], back to 3-D."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o, bias=False)
        self.bn = nn.BatchNorm1d(o)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_levit_linear_flatten_batchnorm1d_folds_into_the_linear():
    model = randomize(nn.Sequential(LinearNorm(8, 16), nn.GELU(), LinearNorm(16, 4)))
    x = x_like(2, 5, 8)
    result = bt.fold_module(model, (x,))
    assert [(d.folded, d.target) for d in result.decisions] == [
        (True, "0.linear"),
        (True, "2.linear"),
    ]
    assert result.verification.passed
    assert calls(result.module, (nn.BatchNorm1d,), x) == 0
    # without example inputs, the rank after flatten(0, 1) is unknown: kept, and it says so
    assert {d.reason for d in bt.fold_module(model).decisions} == {SkipReason.UNKNOWN_LAYOUT}
    # on a 4-D input, flatten(0, 1) leaves [B·T, U, C]: BatchNorm1d normalises U, not C
    four = randomize(nn.Sequential(LinearNorm(4, 3)))
    (d,) = bt.fold_module(four, (x_like(2, 3, 3, 4),)).decisions
    assert not d.folded and d.reason is SkipReason.UNSUPPORTED_LAYOUT


def test_exporter_option_is_checked_and_refused_where_it_cannot_apply(tmp_path):
    from bnfold import FoldOptions, fold
    from bnfold.errors import UsageError

    with pytest.raises(UsageError, match="exporter must be 'dynamo' or 'torchscript'"):
        FoldOptions(exporter="tracing")
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(UsageError, match="exporter"):
        bt.fold_module(model, options=FoldOptions(exporter="torchscript"))
    onnx_in = tmp_path / "m.onnx"
    bt.export(model, x_like(1, 3, 6, 6), onnx_in, verify=False)
    with pytest.raises(UsageError, match=r"exporter \(--exporter\)"):
        fold(onnx_in, tmp_path / "o.onnx", options=FoldOptions(exporter="torchscript"))


# ------------------------------------------------------------------------ concat of Convs
class MixedConv(nn.Module):
    """mixnet's MixedConv2d + BatchNormAct2d: split, one depthwise Conv per slice, cat, BN."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(4, 4, k, padding=k // 2, groups=4, bias=False) for k in (3, 5, 7)]
        )
        self.bn = BatchNormAct2dLike(12)
        self.shared = shared

    def forward(self, x):
        a, b, c = torch.split(x, [4, 4, 4], 1)
        first = self.convs[0](a)
        y = self.bn(torch.cat([first, self.convs[1](b), self.convs[2](c)], 1))
        return y + first.mean() if self.shared else y


def test_bn_after_a_concat_of_convs_is_split_by_channel_slices():
    model = randomize(MixedConv())
    x = x_like(2, 12, 9, 9)
    result = bt.fold_module(model, (x,))
    (d,) = result.decisions
    assert d.folded and d.target == "convs.0, convs.1, convs.2"
    assert result.verification.passed
    assert calls(result.module, (nn.BatchNorm2d,), x) == 0
    # a Conv whose output is also used elsewhere: kept, the concat is not foldable
    (kept,) = bt.fold_module(randomize(MixedConv(shared=True)), (x,)).decisions
    assert not kept.folded and kept.reason is SkipReason.PRODUCER_OUTPUT_SHARED
