"""Real exporter output: tiny random-weight torch models whose BNs the exporters keep, folded completely.

Both of torch's exporters: TorchScript (``dynamo=False, do_constant_folding=False``, which otherwise
fuses Conv+BN itself) and dynamo (``dynamo=True, optimize=False``; needs ``onnxscript``). Every model
is in eval mode with non-trivial BN statistics and affine parameters, so a wrong fold shows.
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


# ============================================================================================ models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8, 1),
        BasicBlock(8, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


def mobilenet_v2_like() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        InvertedResidual(8, 8, 1, 2),
        InvertedResidual(8, 12, 2, 3),
        nn.Conv2d(12, 24, 1, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


class UNetDecoder(nn.Module):
    """Two up-steps of a UNet decoder: grouped, bias-less ConvTranspose up-sampling, skip concat."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2, bias=False)
        self.bn_up1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=4)
        self.bn_up2 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x, skip):
        y = torch.relu(self.bn_up1(self.up1(x)))
        y = torch.relu(self.bn1(self.conv1(torch.cat([y, skip], dim=1))))
        y = torch.relu(self.bn_up2(self.up2(y)))
        return self.head(y)


def mlp_bn1d() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def keras_style() -> nn.Module:
    """Conv → ReLU → BN → MaxPool → Conv: BNs that only a forward fold (through MaxPool) removes."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def cnn1d_bn_before_linear() -> nn.Module:
    """A 1-D CNN whose last BN comes after the activation, right before Flatten → Linear."""
    return nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Conv1d(6, 4, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm1d(4),
        nn.Flatten(),
        nn.Linear(4 * 12, 5),
    )


MODELS = {
    "resnet_like": (resnet_like, [(2, 3, 16, 16)]),
    "mobilenet_v2_like": (mobilenet_v2_like, [(2, 3, 16, 16)]),
    "unet_decoder": (UNetDecoder, [(2, 16, 4, 4), (2, 8, 8, 8)]),
    "mlp_bn1d": (mlp_bn1d, [(3, 12)]),
    "keras_style": (keras_style, [(2, 3, 16, 16)]),
    "cnn1d_bn_before_linear": (cnn1d_bn_before_linear, [(2, 3, 12)]),
}
#: Models whose BNs fold forward; their γ is kept positive (as in most trained nets) for MaxPool.
FORWARD = {"keras_style", "cnn1d_bn_before_linear"}


def build(name: str) -> tuple[nn.Module, tuple]:
    factory, shapes = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_(
                    (torch.rand(c, generator=gen) + 0.5) * (1.0 if name in FORWARD else sign)
                )
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    inputs = tuple(torch.randn(s, generator=gen) for s in shapes)
    return model.eval(), inputs


def export(model: nn.Module, inputs: tuple, exporter: str) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(inputs))]
    if exporter == "torchscript":
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                inputs,
                buf,
                dynamo=False,
                do_constant_folding=False,
                opset_version=17,
                input_names=names,
                output_names=["out"],
                dynamic_axes={**{n: {0: "N"} for n in names}, "out": {0: "N"}},
            )
        return onnx.load_from_string(buf.getvalue())
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, optimize=False, verbose=False)
    return program.model_proto


# ============================================================================================ tests
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_folds_completely(name, exporter):
    model, inputs = build(name)
    proto = export(model, inputs, exporter)
    n_bn = count_all(proto, "BatchNormalization")
    want = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert n_bn == want, "the exporter kept every BN"

    # Forcing the folds the cost rule would keep (keras_style's padded Conv): this test is about
    # what the exporters emit, every BN must be foldable.
    result = fold_checked(proto, allow_slower_folds=True)

    assert len(result.decisions) == n_bn and not result.report.kept, [
        (d.name, d.reason, d.detail) for d in result.report.kept
    ]
    assert count_all(result.model, "BatchNormalization") == 0
    directions = {d.direction for d in result.decisions}
    assert ("forward" in directions) == (name in FORWARD)
    feeds = {i.name: t.numpy() for i, t in zip(proto.graph.input, inputs, strict=False)}
    want_out = run_ort(proto, feeds)
    got = run_ort(result.model, feeds)
    assert_close(got, want_out)
    with torch.no_grad():
        reference = model(*inputs).numpy()
    np.testing.assert_allclose(
        got[0], reference, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(reference).max()))
    )
