"""The family patterns of test_families.py as torch's exporters really write them: tiny copies of
timm's LeViT ``LinearNorm``, timm's ``MixedConv2d`` + BN (mixnet), torchvision's
``FrozenBatchNorm2d`` (its forward, verbatim) and a RepVGG block (dense and depthwise), exported by TorchScript and by dynamo
(``optimize=False``, which keeps every BN), folded completely and compared with the module.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from foldchecks import count_all, fold_checked
from helpers import assert_close, run_ort

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch


def _randomize_bn(bn: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = bn.running_mean.shape[0]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(
            (torch.rand(c, generator=gen) + 0.5) * torch.sign(torch.randn(c, generator=gen))
        )
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.5)


class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Levit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = LinearNorm(8, 16)
        self.ln2 = LinearNorm(16, 8)

    def forward(self, x):
        return x + self.ln2(nn.functional.hardswish(self.ln1(x)))


class MixedConvBN(nn.Module):
    """timm MixedConv2d (split, one Conv per slice, cat) followed by a BatchNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [4, 4]
        self.convs = nn.ModuleList(
            [nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 6, 5, padding=2)]
        )
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.relu(self.bn(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (its forward, verbatim)."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.rand(n, generator=gen) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=gen))
        self.register_buffer("running_mean", torch.randn(n, generator=gen))
        self.register_buffer("running_var", torch.rand(n, generator=gen) + 0.5)
        self.eps = 1e-5

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def _frozen() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        FrozenBatchNorm2d(8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        FrozenBatchNorm2d(8, 2),
    )


class RepVGGBlock(nn.Module):
    """timm/RepVGG's training-time block: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(x)
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.identity(x))


MODELS = {
    "levit": (Levit, (1, 4, 8), ["backward"] * 2),
    "mixnet": (MixedConvBN, (1, 8, 6, 6), ["backward"]),
    "frozen_bn": (_frozen, (1, 3, 6, 6), ["decomposed"] * 2),
    "repvgg": (lambda: RepVGGBlock(6, 1), (1, 6, 5, 5), ["backward"] * 2 + ["branch"]),
    "mobileone_dw": (lambda: RepVGGBlock(6, 6), (1, 6, 5, 5), ["backward"] * 2 + ["branch"]),
}


def _export(model: nn.Module, x, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(
                model, (x,), buf, dynamo=False, do_constant_folding=False, opset_version=17
            )
            return onnx.load_from_string(buf.getvalue())
        pytest.importorskip("onnxscript")
        return torch.onnx.export(
            model, (x,), dynamo=True, optimize=False, verbose=False
        ).model_proto


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(MODELS))
def test_family_pattern_folds_completely(name, exporter):
    build, shape, directions = MODELS[name]
    torch.manual_seed(0)
    model = build()
    for i, m in enumerate(model.modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(m, i)
    model.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    proto = _export(model, x, exporter)

    result = fold_checked(proto)

    assert sorted(d.direction for d in result.decisions) == directions, [
        (d.name, d.reason, d.detail) for d in result.decisions
    ]
    assert count_all(result.model, "BatchNormalization") == 0
    feeds = {proto.graph.input[0].name: x.numpy()}
    got = run_ort(result.model, feeds)
    assert_close(got, run_ort(proto, feeds))
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
