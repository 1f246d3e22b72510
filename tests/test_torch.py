"""bnfold.torch: fold nn.Modules, export them to ONNX, load .pt2/TorchScript/pickle files, verify.

Every test here needs the optional torch extra; the module is skipped as a whole without it, so the
ONNX-only suite runs without torch installed. Models are built and (briefly) trained in code, with
seeds, so that BatchNorm statistics and affine parameters are far from their defaults: folding a
default BatchNorm is close to an identity and would hide bugs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import copy  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from helpers import round_exact  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold import numerics  # noqa: E402
from bnfold.errors import BnfoldError, InvalidModelError, UsageError  # noqa: E402
from bnfold.options import FoldOptions  # noqa: E402
from bnfold.report import SkipReason  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _seeded():
    """Module initialisation draws from torch's global generator: seed it per test, so each test's
    models (and the errors it measures) do not depend on which tests ran before."""
    torch.manual_seed(0)


def _sample_builders():
    """The sample models' builders (``cnn1d``, ``cnn2d`` ...) from sample_models/make_models.py."""
    spec = importlib.util.spec_from_file_location(
        "make_models", ROOT / "sample_models" / "make_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_models", module)
    spec.loader.exec_module(module)
    return module


def randomize_bns(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics and affine parameters (γ of both signs, σ² in [0.2, 2])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.8 + 0.2)
                if m.affine:
                    m.weight.copy_(
                        (torch.rand(c, generator=g) + 0.5) * torch.sign(torch.randn(c, generator=g))
                    )
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def train_briefly(
    model: nn.Module, input_shape: tuple[int, ...], steps: int = 12, seed: int = 0
) -> nn.Module:
    """A few seeded SGD steps on a synthetic 10-class task, BNs in training mode; returns it in eval.

    Inputs have mean 0.5 and std 1.5 and the BNs average their batch statistics over all steps
    (momentum=None during training), so their running statistics are real and non-default."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(int(np.prod(input_shape)), 10, generator=g)
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = None
    bn_params = {id(p) for m in bns for p in m.parameters()}
    opt = torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if id(p) not in bn_params], "lr": 0.02},
            {"params": [p for p in model.parameters() if id(p) in bn_params], "lr": 0.4},
        ],
        momentum=0.9,
    )
    model.train()
    for _ in range(steps):
        x = torch.randn((16, *input_shape), generator=g) * 1.5 + 0.5
        loss = F.cross_entropy(model(x), (x.flatten(1) @ proj).argmax(1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def x_like(*shape: int, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def assert_close(
    got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Like the ONNX tests: atol is relative to the output's scale, max(1, max |want|)."""
    scale = max(1.0, float(want.double().abs().max()))
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale)


def fold(model: nn.Module, example=None, **kwargs) -> bt.ModuleFoldResult:
    """fold_module, plus what must hold for every call: the original is untouched (same parameter
    values, same modules), every decision has a unique name, and kept ones carry a reason."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    result = bt.fold_module(model, example, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the original's {k} changed"
    assert result.module is not model
    names = [d.name for d in result.decisions]
    assert len(set(names)) == len(names), names
    for d in result.decisions:
        assert d.detail.strip()
        assert d.folded == (d.reason is None)
    if example is not None:
        assert result.verification is not None
    return result


def bns_in(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BN)]


def reasons(result) -> dict[str, SkipReason]:
    return {d.name: d.reason for d in result.decisions if not d.folded}


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def onnx_ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# --------------------------------------------------------------------------------------- the tutorial CNNs
TUTORIAL = {"cnn1d": (3, 28), "cnn2d": (3, 28, 28)}


@pytest.fixture(scope="module")
def tutorial_models() -> dict[str, nn.Module]:
    builders = _sample_builders()
    return {
        name: train_briefly(getattr(builders, name)(), shape, seed=i)
        for i, (name, shape) in enumerate(TUTORIAL.items())
    }


@pytest.mark.parametrize("name", list(TUTORIAL))
def test_tutorial_cnn_folds_at_module_level(tutorial_models, name):
    model = tutorial_models[name]
    bn = model[1]
    assert bn.running_mean.abs().max() > 0.1 and (bn.running_var - 1).abs().max() > 0.1  # trained
    x = x_like(4, *TUTORIAL[name])
    result = fold(model, (x,))
    assert result and result.verification
    assert [d.name for d in result.decisions] == ["1", "4"]
    assert all(d.folded and d.target_op == type(model[0]).__name__ for d in result.decisions)
    assert [d.target for d in result.decisions] == ["0", "3"]
    assert not bns_in(result.module)
    assert type(result.module) is nn.Sequential  # folded in place: the module keeps its class
    with torch.no_grad():
        assert_close(result.module(x), model(x))
        x2 = x_like(7, *TUTORIAL[name], seed=5)
        assert_close(result.module(x2), model(x2))
    assert result.report.nodes_before == 8 and result.report.nodes_after == 6


@pytest.mark.parametrize("name", list(TUTORIAL))
def test_tutorial_cnn_folds_through_onnx(tutorial_models, name, tmp_path):
    model = tutorial_models[name]
    out = tmp_path / f"{name}.onnx"
    result = bt.export(model, (x_like(2, *TUTORIAL[name]),), out)
    assert result and result.report.written and out.is_file()
    assert result.model == out
    assert [d.folded for d in result.decisions] == [True, True]
    assert "BatchNormalization" not in onnx_ops(out)
    v = result.verification
    assert v and v.samples == 2  # the example batch and batch N+1 (the dynamic axis)
    assert v.outputs[0].max_abs_error < 1e-4
    onnx.checker.check_model(str(out), full_check=True)
    # The file takes other batch sizes and matches PyTorch there too.
    x = x_like(5, *TUTORIAL[name], seed=9)
    (got,) = run_ort(out, {"input": x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x))


# --------------------------------------------------------------------------------------- producers
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_with_groups_and_cin_ne_cout(dims):
    ct = getattr(nn, f"ConvTranspose{dims}d")(
        8, 6, kernel_size=3, stride=2, padding=1, groups=2, bias=False
    )
    bn = getattr(nn, f"BatchNorm{dims}d")(6)
    model = randomize_bns(nn.Sequential(ct, bn, nn.ReLU()))
    x = x_like(2, 8, *([5] * dims))
    result = fold(model, (x,))
    (d,) = result.decisions
    assert d.folded and d.target_op == f"ConvTranspose{dims}d" and "bias created" in d.detail
    assert result.verification
    with torch.no_grad():
        assert_close(result.module(x), model(x))
    # The weight [Cin, Cout/g, k...] scaled per output channel o = group * Cout/g + j.
    s, _ = numerics.bn_scale_shift(
        bn.weight.detach().double().numpy(),
        bn.bias.detach().double().numpy(),
        bn.running_mean.double().numpy(),
        bn.running_var.double().numpy(),
        bn.eps,
    )
    w = ct.weight.detach().double().numpy()
    want = w.reshape(2, 4, 3, *w.shape[2:]) * s.reshape(2, 1, 3, *([1] * dims))
    np.testing.assert_array_equal(
        result.module[0].weight.detach().numpy(), want.reshape(w.shape).astype(np.float32)
    )


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_grouped_conv_without_bias(dims):
    conv = getattr(nn, f"Conv{dims}d")(6, 8, kernel_size=3, padding=1, groups=2, bias=False)
    model = randomize_bns(nn.Sequential(conv, getattr(nn, f"BatchNorm{dims}d")(8)))
    x = x_like(2, 6, *([4] * dims))
    result = fold(model, (x,))
    assert result and result.decisions[0].folded and "bias created" in result.decisions[0].detail
    assert result.module[0].bias is not None and model[0].bias is None


def test_batchnorm_without_affine_parameters():
    model = randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    x = x_like(2, 3, 5, 5)
    result = fold(model, (x,))
    assert result and result.decisions[0].folded and result.verification


def test_linear_batchnorm1d():
    model = randomize_bns(
        nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    )
    x = x_like(5, 16)
    result = fold(model, (x,))  # the run shows the BN gets [N, C]
    (d,) = result.decisions
    assert d.folded and d.target_op == "Linear" and d.target == "0"
    assert result.verification.outputs[0].max_abs_error < 1e-5
    with torch.no_grad():
        assert_close(result.module(x), model(x))
    # Without example inputs nothing shows the rank of the forward's argument: kept, and said why.
    assert reasons(fold(model)) == {"1": SkipReason.UNKNOWN_LAYOUT}
    # ... unless the graph shows it: a flatten to [N, C] before the Linear.
    flat = randomize_bns(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12)))
    result = fold(flat)
    assert result.decisions[0].folded
    with torch.no_grad():
        assert_close(result.module(x.reshape(5, 4, 4)), flat(x.reshape(5, 4, 4)))


def test_linear_on_3d_input_is_not_folded_even_when_channels_match():
    # [N, L, C] with L == C: BatchNorm1d(8) normalises L, not the Linear's 8 output features.
    model = randomize_bns(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    x = x_like(2, 8, 8)
    result = fold(model, (x,))
    assert reasons(result) == {"1": SkipReason.UNSUPPORTED_LAYOUT}
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


# --------------------------------------------------------------------------------------- forward code
class ConvTwice(nn.Module):
    """One Conv called twice: once followed by the BN, once not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.relu(self.conv(x))


def test_conv_called_twice_is_not_corrupted():
    model = randomize_bns(ConvTwice())
    x = x_like(2, 4, 6, 6)
    result = fold(model, (x,))
    (d,) = result.decisions
    assert (
        d.folded
        and d.target == "conv"
        and "private copy" in d.detail
        and "called 2 times" in d.detail
    )
    assert isinstance(result.module, torch.fx.GraphModule)  # that call site was rewritten
    # The shared Conv keeps its weights for the other call; only the copy is folded.
    assert torch.equal(result.module.conv.weight, model.conv.weight)
    assert result.verification.outputs[0].max_abs_error < 1e-5
    with torch.no_grad():
        assert_close(result.module(x), model(x))
        assert_close(result.module(x[:1]), model(x[:1]))

    kept = fold(model, (x,), rewrite=False)
    assert reasons(kept) == {"bn": SkipReason.MODULE_REUSED}
    assert type(kept.module) is ConvTwice
    with torch.no_grad():
        assert torch.equal(kept.module(x), model(x))


class SharedWeights(nn.Module):
    """Two Convs share one weight Parameter; only the first is followed by a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.b(x)


def test_shared_weights_are_never_changed_in_place():
    model = randomize_bns(SharedWeights())
    x = x_like(2, 4, 5, 5)
    result = fold(model, (x,))
    (d,) = result.decisions
    assert d.folded and d.target == "a" and "shared with b" in d.detail
    folded = result.module
    assert type(folded) is SharedWeights
    assert folded.a.weight is not folded.b.weight
    assert torch.equal(folded.b.weight, model.b.weight)
    assert not torch.equal(folded.a.weight, model.a.weight)
    with torch.no_grad():
        assert_close(folded(x), model(x))


class BasicBlock(nn.Module):
    """A ResNet basic block with a downsampling shortcut and functional ReLUs."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_residual_network():
    model = train_briefly(TinyResNet(), (3, 12, 12), steps=6)
    x = x_like(3, 3, 12, 12)
    result = fold(model, (x,))
    assert len(result.decisions) == 7 and all(d.folded for d in result.decisions), result.decisions
    assert {d.name: d.target for d in result.decisions}[
        "layer.0.downsample.1"
    ] == "layer.0.downsample.0"
    assert type(result.module) is TinyResNet and type(result.module.layer[0]) is BasicBlock
    assert not bns_in(result.module)
    assert result.verification
    with torch.no_grad():
        assert_close(result.module(x), model(x))


class DataDependent(nn.Module):
    """forward branches on a tensor value: torch.fx cannot trace it, but its blocks can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # called directly by the untraceable forward

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_forward_folds_what_it_can_reach_and_says_what_it_cannot():
    model = randomize_bns(DataDependent())
    x = x_like(2, 3, 5, 5)
    result = fold(model, (x,))
    by_name = {d.name: d for d in result.decisions}
    assert by_name["block.1"].folded
    assert (
        by_name["bn"].reason is SkipReason.NOT_TRACEABLE and "DataDependent" in by_name["bn"].detail
    )
    assert type(result.module) is DataDependent and isinstance(result.module.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert_close(result.module(x), model(x))
    # Without a run, calls the untraceable code makes are unknown: nothing below it changes.
    blind = fold(model)
    assert reasons(blind) == {"block.1": SkipReason.NOT_TRACEABLE, "bn": SkipReason.NOT_TRACEABLE}
    assert "pass example_inputs" in {d.name: d.detail for d in blind.decisions}["block.1"]


class ReachesIn(nn.Module):
    """Untraceable code that calls a block's Conv directly, bypassing the block's BN."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > -1e9:
            return self.block(x) + self.block[0](x)
        return self.block(x)


def test_direct_calls_from_untraceable_code_are_counted():
    model = randomize_bns(ReachesIn())
    x = x_like(2, 3, 5, 5)
    result = fold(model, (x,))
    (d,) = result.decisions
    assert d.reason is SkipReason.MODULE_REUSED
    assert "2 times at run time but 1 times in the traced graphs" in d.detail
    assert type(result.module.block) is nn.Sequential
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, mask=None):
        y = self.conv(x)
        if mask is not None:
            return self.bn(y) * mask
        return y


def test_arguments_defaulting_to_none_are_traced_as_none():
    # Traced with mask as a tensor, `if mask is not None` would take the BN branch and the fold
    # would corrupt model(x), which returns the Conv's output.
    model = randomize_bns(OptionalMask())
    x = x_like(2, 3, 5, 5)
    result = fold(model)
    assert reasons(result) == {"bn": SkipReason.NOT_CALLED}
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        assert torch.equal(result.module(x, torch.ones(1)), model(x, torch.ones(1)))


class Kept(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)  # on the forward's argument, before a padded Conv
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_relu = nn.BatchNorm2d(4)  # between two ReLUs
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_shared = nn.BatchNorm2d(4)  # the Conv's output is also used by the residual add
        self.hooked = nn.Conv2d(4, 4, 1)
        self.bn_hooked = nn.BatchNorm2d(4)  # its Conv has a forward hook
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn_relu(F.relu(self.conv(self.bn_in(x)))))
        z = self.conv2(y)
        return self.bn_hooked(self.hooked(self.bn_shared(z) + z))


def test_kept_batchnorms_say_why_and_change_nothing():
    model = randomize_bns(Kept())
    seen = []
    model.hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = x_like(2, 3, 4, 4)
    result = fold(model, (x,))
    assert reasons(result) == {
        "bn_in": SkipReason.PADDED_CONSUMER,  # forward into the padded Conv: not exact
        "bn_relu": SkipReason.UNSUPPORTED_PRODUCER,
        "bn_shared": SkipReason.PRODUCER_OUTPUT_SHARED,
        "bn_hooked": SkipReason.HAS_HOOKS,
        "unused": SkipReason.NOT_CALLED,
    }
    assert "relu" in {d.name: d.detail for d in result.decisions}["bn_relu"]
    assert "forward argument" in {d.name: d.detail for d in result.decisions}["bn_in"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
    assert seen  # the hook still runs in the folded module


def test_bn_shared_by_two_convs_folds_into_two_private_copies():
    class TwoConvsOneBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.cat([self.bn(self.c1(x)).flatten(1), self.bn(self.c2(x)).flatten(1)], 1)

    model = randomize_bns(TwoConvsOneBN())
    x = x_like(2, 3, 5, 5)
    result = fold(model, (x,))
    assert [d.name for d in result.decisions] == ["bn (call 1 of 2)", "bn (call 2 of 2)"]
    assert all(d.folded for d in result.decisions) and result.verification


# --------------------------------------------------------------------------------------- refusals
def test_training_mode_is_refused(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    )  # a fresh module is in training mode
    for call in (
        lambda: bt.fold_module(model),
        lambda: bt.export(model, torch.zeros(1, 3, 5, 5), tmp_path / "o.onnx"),
    ):
        with pytest.raises(bt.TrainingModeError, match=r"training mode.*model\.eval\(\)") as info:
            call()
        assert isinstance(info.value, BnfoldError) and info.value.exit_code == 2
        assert "\n" not in str(info.value)
    assert not (tmp_path / "o.onnx").exists()
    model.eval()
    model[1].train()  # one BN left in training mode
    with pytest.raises(bt.TrainingModeError, match="'1'"):
        bt.fold_module(model)


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(bt.NoRunningStatsError, match="track_running_stats=False") as info:
        bt.fold_module(model)
    assert isinstance(info.value, BnfoldError) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_fold_in_float64_and_round_once(dtype):
    model = randomize_bns(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 16, 6),
            nn.BatchNorm1d(6),
        )
    ).to(dtype)
    x = x_like(4, 3, 4, 4, dtype=dtype)
    result = fold(model, (x,))
    assert all(d.folded for d in result.decisions) and result.verification, result.verification
    conv, bn = model[0], model[1]
    s, t = numerics.bn_scale_shift(
        *(
            p.detach().double().numpy()
            for p in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        ),
        bn.eps,
    )
    want_w = conv.weight.detach().double().numpy() * s[:, None, None, None]
    want_b = conv.bias.detach().double().numpy() * s + t
    got = result.module[0]
    assert got.weight.dtype == dtype and got.bias.dtype == dtype
    # Bit for bit the float64 value rounded once (torch's own float64 -> half cast goes through
    # float32, rounding twice, so an independent correct rounding is the reference).
    np_dtype = np.float16 if dtype == torch.float16 else ml_dtypes.bfloat16
    for tensor, want in ((got.weight, want_w), (got.bias, want_b)):
        bits = tensor.detach().view(torch.int16).numpy()
        np.testing.assert_array_equal(bits, round_exact(want, np_dtype).view(np.int16))


def test_float16_export_is_verified_and_bfloat16_export_says_why_not(tmp_path):
    model = randomize_bns(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    half = bt.export(
        copy.deepcopy(model).half(), x_like(1, 3, 6, 6, dtype=torch.float16), tmp_path / "h.onnx"
    )
    assert half and half.verification and half.verification.outputs[0].dtype == "float16"
    bf16 = bt.export(
        copy.deepcopy(model).bfloat16(),
        x_like(1, 3, 6, 6, dtype=torch.bfloat16),
        tmp_path / "b.onnx",
    )
    # ONNX Runtime's CPU provider has no bfloat16 Conv: the export is unverified (and says why), not
    # failed; unverified is not a pass, so nothing is written unless accepted.
    assert bf16.verification.skipped_reason and "ONNX Runtime" in bf16.verification.skipped_reason
    assert not bf16 and bf16.status == "unverified" and bf16.report.exit_code == 4
    assert not bf16.report.written and not (tmp_path / "b.onnx").exists()
    accepted = bt.export(
        copy.deepcopy(model).bfloat16(),
        x_like(1, 3, 6, 6, dtype=torch.bfloat16),
        tmp_path / "b.onnx",
        options=FoldOptions(accept_unverified=True),
    )
    assert not accepted and accepted.report.written and accepted.report.exit_code == 0
    assert all(d.folded for d in accepted.decisions)


# --------------------------------------------------------------------------------------- export
def test_export_writes_nothing_when_verification_fails(tmp_path):
    model = randomize_bns(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    out = tmp_path / "o.onnx"
    result = bt.export(
        model, x_like(2, 3, 6, 6), out, atol=0.0, rtol=0.0
    )  # no rounding difference allowed
    assert not result and not result.report.written and not out.exists()
    assert result.report.verification_failed
    assert list(tmp_path.iterdir()) == []  # no staging leftovers


def test_export_names_and_static_batch(tmp_path):
    class TwoInOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)

        def forward(self, signal, offset):
            y = self.bn(self.conv(signal))
            return y, y.mean(-1) + offset

    model = randomize_bns(TwoInOut())
    out = tmp_path / "o.onnx"
    result = bt.export(
        model, (x_like(3, 2, 9), x_like(3, 4)), out, output_names=["y", "m"], dynamic_batch=False
    )
    assert result and [o.name for o in result.verification.outputs] == ["y", "m"]
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["signal", "offset"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert result.verification.samples == 1


# --------------------------------------------------------------------------------------- files (the CLI's path)
def _small_model() -> nn.Module:
    return randomize_bns(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 1),
            nn.BatchNorm2d(4),
        )
    )


def test_exported_program_file(tmp_path):
    model = _small_model()
    pt2 = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x_like(2, 3, 8, 8),)), str(pt2))
    assert bt.is_torch_file(pt2) and not bt.is_torch_file(ROOT / "sample_models" / "cnn2d.onnx")
    out = tmp_path / "folded.onnx"
    result = bt.fold_file(pt2, out)  # shapes come from the program
    assert result and result.report.written and result.report.input == str(pt2)
    assert [d.folded for d in result.decisions] == [True, True]
    assert "BatchNormalization" not in onnx_ops(out)
    x = x_like(2, 3, 8, 8, seed=3)
    (got,) = run_ort(out, {"input": x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x))
    # Shapes that contradict the program: one line naming the input and what it expects.
    with pytest.raises(
        UsageError,
        match=r"input shape for 'input' has 4 in dimension 1 but .* expects \[2, 3, 8, 8\]",
    ):
        bt.fold_file(pt2, out, input_shapes={"input": (2, 4, 8, 8)})
    with pytest.raises(UsageError, match="'y', which is not an input .* 'input'"):
        bt.fold_file(pt2, out, input_shapes={"y": (2, 3, 8, 8)})


def test_exported_program_object(tmp_path):
    model = _small_model()
    program = torch.export.export(model, (x_like(2, 3, 8, 8),))
    result = bt.export(program, x_like(2, 3, 8, 8), tmp_path / "o.onnx")
    assert result and [d.folded for d in result.decisions] == [True, True]
    with pytest.raises(UsageError, match="no BatchNorm modules.*bnfold.torch.export"):
        bt.fold_module(program.module())


def test_exported_program_in_training_mode_is_refused(tmp_path):
    model = _small_model().train()
    pt2 = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (x_like(2, 3, 8, 8),)), str(pt2))
    with pytest.raises(bt.TrainingModeError, match="model.eval"):
        bt.fold_file(pt2, tmp_path / "o.onnx")


def test_torchscript_file_needs_shapes(tmp_path):
    model = _small_model()
    path = tmp_path / "model.ts"
    torch.jit.script(model).save(str(path))
    with pytest.raises(UsageError, match=r"--input-shape input=1,3,224,224"):
        bt.fold_file(path, tmp_path / "o.onnx")
    result = bt.fold_file(path, tmp_path / "o.onnx", input_shapes={"input": (2, 3, 8, 8)})
    assert result and [d.folded for d in result.decisions] == [True, True]
    with pytest.raises(UsageError, match="failed to run on inputs float32\\[2, 5, 8, 8\\]"):
        bt.fold_file(path, tmp_path / "o2.onnx", input_shapes={"input": (2, 5, 8, 8)})


def test_pickled_module_needs_explicit_trust(tmp_path):
    model = _small_model()
    path = tmp_path / "model.pt"
    torch.save(model, str(path))
    with pytest.raises(UsageError, match="runs code from the file.*--trust-pickle"):
        bt.fold_file(path, tmp_path / "o.onnx", input_shapes={"input": (1, 3, 8, 8)})
    result = bt.fold_file(
        path, tmp_path / "o.onnx", input_shapes={"input": (1, 3, 8, 8)}, trust_pickle=True
    )
    assert result and all(d.folded for d in result.decisions)


@pytest.mark.parametrize("trust", [False, True])
def test_state_dict_is_explained(tmp_path, trust):
    model = _small_model()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), str(path))
    with pytest.raises(
        InvalidModelError, match=r"state_dict .*no architecture.*bnfold\.torch\.fold_module"
    ) as info:
        bt.load_torch_file(path, trust_pickle=trust)
    assert "\n" not in str(info.value)
    torch.save({"model": model.state_dict(), "epoch": 3}, str(path))
    with pytest.raises(InvalidModelError, match="checkpoint or state_dict"):
        bt.load_torch_file(path)


def test_not_a_torch_file(tmp_path):
    with pytest.raises(InvalidModelError, match="not a PyTorch file"):
        bt.load_torch_file(ROOT / "sample_models" / "cnn2d.onnx")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02garbage")
    with pytest.raises(InvalidModelError, match="torch.load failed"):
        bt.load_torch_file(damaged)
    with pytest.raises(BnfoldError, match="no such file"):
        bt.load_torch_file(tmp_path / "missing.pt2")


def test_pytorch_skip_reasons_are_explained():
    for reason in (
        SkipReason.NOT_TRACEABLE,
        SkipReason.NOT_CALLED,
        SkipReason.MODULE_REUSED,
        SkipReason.UNKNOWN_LAYOUT,
        SkipReason.HAS_HOOKS,
    ):
        assert reason.explanation.strip()


def test_import_bnfold_does_not_import_torch():
    code = (
        "import sys, bnfold, bnfold.api, bnfold.report, bnfold.torch; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------ the CLI routes PyTorch files
@pytest.mark.torch
def test_cli_folds_pytorch_files_and_refuses_unsafe_ones(tmp_path):
    from typer.testing import CliRunner

    from bnfold.cli import app

    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2.0)
    torch.export.save(torch.export.export(m, (torch.randn(1, 3, 16, 16),)), tmp_path / "m.pt2")
    torch.save(m, tmp_path / "pickled.pt")
    torch.save(m.state_dict(), tmp_path / "state.pt")
    run = CliRunner().invoke

    ok = run(app, ["fold", str(tmp_path / "m.pt2"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m.folded.onnx").exists()
    refused = run(app, ["fold", str(tmp_path / "pickled.pt"), "-o", str(tmp_path / "p.onnx")])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.stderr
    state = run(app, ["fold", str(tmp_path / "state.pt"), "-o", str(tmp_path / "s.onnx")])
    assert state.exit_code == 2 and "state_dict" in state.stderr
    assert not (tmp_path / "p.onnx").exists() and not (tmp_path / "s.onnx").exists()
    trusted = run(
        app,
        [
            "fold",
            str(tmp_path / "pickled.pt"),
            "-o",
            str(tmp_path / "p.onnx"),
            "--trust-pickle",
            "--input-shape",
            "input=1,3,16,16",
            "-q",
        ],
    )
    assert trusted.exit_code == 0, trusted.output
