"""fold: every foldable case equal to the unfolded model in float64 (1e-12 relative to the
output's largest value, at least 1e-12 absolute), shared layers
unchanged on every path, inexact placements skipped with the reason, the original untouched.

The oracle is always the original model itself, run in eval in float64: nothing here is
computed by the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm.torch as bt
from batchnorm.torch.fold import fold

TOL = 1e-12


def _stats(norm: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics with the awkward values: negative and zero gamma, a running
    variance far below eps, large means."""
    g = torch.Generator().manual_seed(seed)
    c = norm.running_mean.numel()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(c, generator=g) * 3)
        var = torch.rand(c, generator=g) * 2 + 0.05
        var[0] = 1e-12
        norm.running_var.copy_(var)
        if norm.weight is not None:
            norm.weight.copy_(torch.randn(c, generator=g))
            norm.weight[1 % c] = 0.0
            norm.weight[2 % c] = -1.5
            norm.bias.copy_(torch.randn(c, generator=g))
    return norm


def _bias_params(layer: nn.Module, seed: int = 1) -> nn.Module:
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(
                torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(seed))
            )
    return layer


def _same(model: nn.Module, folded: nn.Module, *inputs: torch.Tensor) -> float:
    model = model.eval()
    with torch.no_grad():
        want, got = model(*inputs), folded(*inputs)
    if isinstance(want, torch.Tensor):
        want, got = (want,), (got,)
    # Relative to the output's size: a running variance of 1e-12 multiplies by ~300 per layer.
    scale = max(1.0, *(w.abs().max().item() for w in want))
    return max((w - g).abs().max().item() for w, g in zip(want, got, strict=True)) / scale


def _n_norms(model: nn.Module) -> int:
    kinds = (nn.modules.batchnorm._NormBase, bt.FrozenBatchNorm)
    n = sum(isinstance(m, kinds) for m in model.modules())
    if isinstance(model, torch.fx.GraphModule):
        n += sum(node.target is F.batch_norm for node in model.graph.nodes)
    return n


NORMS = {
    "torch": lambda c, d: nn.BatchNorm1d(c) if d == 1 else getattr(nn, f"BatchNorm{d}d")(c),
    "ours": lambda c, d: getattr(bt, f"BatchNorm{d}d")(c),
    "frozen": lambda c, d: getattr(bt, f"FrozenBatchNorm{d}d")(c),
    "torch_sync": lambda c, d: nn.SyncBatchNorm(c),
    "ours_sync": lambda c, d: bt.SyncBatchNorm(c),
    "ghost": lambda c, d: getattr(bt, f"GhostBatchNorm{d}d")(c, virtual_batch_size=2),
    "renorm": lambda c, d: getattr(bt, f"BatchRenorm{d}d")(c),
    "no_affine": lambda c, d: getattr(nn, f"BatchNorm{d}d")(c, affine=False),
}

# (layer before the norm, input shape): grouped, depthwise, bias-less, strided, padded.
BEFORE = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (3, 4, 9)),
    "conv2d_grouped_nobias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1, stride=2), (2, 6, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2, padding=1), (2, 3, 4, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 5)),
    "convT2d_grouped": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    "convT3d_nobias": (lambda: nn.ConvTranspose3d(2, 4, 2, bias=False), (2, 2, 3, 3, 3)),
    "linear": (lambda: nn.Linear(5, 6), (7, 5)),
}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("case", list(BEFORE))
def test_fold_into_previous_layer_is_exact_in_float64(case, norm):
    make, shape = BEFORE[case]
    torch.manual_seed(0)
    layer = _bias_params(make())
    dim = len(shape) - 2 or 1
    c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = nn.Sequential(layer, _stats(NORMS[norm](c, dim))).double()
    x = torch.randn(shape, dtype=torch.float64)
    folded, report = fold(model, x)
    assert [p.action for p in report.pairs] == ["folded"], str(report)
    assert _n_norms(folded) == 0
    assert _same(model, folded, x) < TOL
    assert report.original_error == 0.0
    with torch.no_grad():
        assert report.deviation <= TOL * max(1.0, model(x).abs().max().item())


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; the Sequential inside is folded by
    adjacency, the traceable block by its own graph."""

    def __init__(self, seq: nn.Module, block: nn.Module | None = None):
        super().__init__()
        self.seq, self.block = seq, block

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 1e9:  # never taken; fx cannot know that
            y = y * 0
        return y if self.block is None else self.block(y)


class _Block(nn.Module):
    """ResNet BasicBlock shape: conv-bn-relu-conv-bn plus the identity."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), _stats(nn.BatchNorm2d(c))
        self.conv2, self.bn2 = (
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            _stats(nn.BatchNorm2d(c), 3),
        )

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_untraceable_model_is_folded_by_module_patterns():
    torch.manual_seed(0)
    seq = nn.Sequential(
        _stats(nn.BatchNorm2d(3), 4),  # first in the Sequential: folds into the conv after it
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),
        _stats(bt.BatchNorm2d(4), 5),
    )
    model = _Untraceable(seq, _Block(4)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded, report = fold(model)
    assert report.discovery == "modules" and "control flow" in report.trace_error
    assert {p.norm for p in report.folded} == {"seq.0", "seq.4", "block.bn1", "block.bn2"}
    assert _n_norms(folded) == 0
    assert _same(model, folded, x) < TOL


AFTER_EXACT = {
    "conv2d_valid_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, stride=2), (2, 4, 9, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
    "conv1d_circular_nobias": (
        lambda: nn.Conv1d(4, 3, 3, padding=2, padding_mode="circular", bias=False),
        (2, 4, 7),
    ),
    "conv3d_1x1": (lambda: nn.Conv3d(4, 2, 1), (2, 4, 3, 3, 3)),
    "depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4), (2, 4, 6, 6)),
    "convT2d_1x1_grouped": (lambda: nn.ConvTranspose2d(4, 6, 1, groups=2), (2, 4, 5, 5)),
    "linear": (lambda: nn.Linear(4, 3), (6, 4)),
}


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize("case", list(AFTER_EXACT))
def test_fold_into_next_layer_where_exact(case, traced):
    make, shape = AFTER_EXACT[case]
    torch.manual_seed(0)
    dim = len(shape) - 2 or 1
    seq = nn.Sequential(_stats(getattr(nn, f"BatchNorm{dim}d")(4)), _bias_params(make()))
    model = (seq if traced else _Untraceable(seq)).double()
    x = torch.randn(shape, dtype=torch.float64)
    folded, report = fold(model, x)
    assert [(p.placement, p.action) for p in report.pairs] == [("after", "folded")], str(report)
    assert _n_norms(folded) == 0
    assert _same(model, folded, x) < TOL


AFTER_INEXACT = {
    "zero_padding": (lambda: nn.Conv2d(4, 4, 3, padding=1), (2, 4, 6, 6), "pads with zeros"),
    "same_padding": (lambda: nn.Conv1d(4, 4, 3, padding="same"), (2, 4, 6), "pads with zeros"),
    "convT_3x3": (lambda: nn.ConvTranspose2d(4, 4, 3), (2, 4, 5, 5), "fewer taps"),
    "convT_stride2": (lambda: nn.ConvTranspose1d(4, 4, 1, stride=2), (2, 4, 5), "fewer taps"),
    # (N, C, L) with L == C: the channel counts match, the axes do not.
    "linear_on_length": (lambda: nn.Linear(4, 3), (2, 4, 4), "last axis"),
}


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize("case", list(AFTER_INEXACT))
def test_inexact_placement_is_skipped_with_the_reason(case, traced):
    make, shape, reason = AFTER_INEXACT[case]
    dim = 1 if len(shape) == 3 else len(shape) - 2
    seq = nn.Sequential(_stats(getattr(nn, f"BatchNorm{dim}d")(4)), make())
    model = (seq if traced else _Untraceable(seq)).double()
    x = torch.randn(shape, dtype=torch.float64)
    folded, report = fold(model, x)
    (pair,) = report.pairs
    assert pair.action == "skipped" and reason in pair.reason, str(report)
    assert _n_norms(folded) == 1
    assert _same(model, folded, x) == 0.0  # nothing was changed


class _SharedConv(nn.Module):
    """One conv called twice, each call followed by its own norm (what fx's fuse gets wrong),
    and a second conv whose output feeds a norm and the residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a, self.bn_b = _stats(nn.BatchNorm2d(4), 1), _stats(nn.BatchNorm2d(4), 2)
        self.proj = nn.Conv2d(4, 4, 1)
        self.bn_c = _stats(nn.BatchNorm2d(4), 3)

    def forward(self, x):
        a, b = self.bn_a(self.conv(x)), self.bn_b(self.conv(x.flip(-1)))
        p = self.proj(a + b)
        return self.bn_c(p) + p, a, b


@pytest.mark.parametrize("recompute_shared", [False, True])
def test_shared_conv_unchanged_on_every_path(recompute_shared):
    model = _SharedConv().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, report = fold(model, x, recompute_shared=recompute_shared)
    actions = {p.norm: p.action for p in report.pairs}
    assert actions["bn_a"] == "cloned" and actions["bn_b"] in ("folded", "cloned")
    if recompute_shared:
        assert actions["bn_c"] == "cloned"
    else:
        assert actions["bn_c"] == "skipped"
        assert "also feeds" in next(p.reason for p in report.pairs if p.norm == "bn_c")
    assert _same(model, folded, x) < TOL  # every output: both branches and the residual


def test_shared_registration_is_cloned_not_edited():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(
        nn.Sequential(conv, _stats(nn.BatchNorm2d(4), 1)),
        nn.Sequential(conv, _stats(nn.BatchNorm2d(4), 2)),
    ).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded, report = fold(model)
    assert {p.action for p in report.pairs} == {"cloned"}, str(report)
    assert _same(model, folded, x) < TOL


class _Functional(nn.Module):
    """F.batch_norm after one conv and before another (1x1): both fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
        for prefix, seed in (("a", 1), ("b", 2)):
            stats = _stats(nn.BatchNorm2d(4), seed)
            self.register_buffer(f"{prefix}_mean", stats.running_mean.clone())
            self.register_buffer(f"{prefix}_var", stats.running_var.clone())
            self.register_parameter(f"{prefix}_weight", nn.Parameter(stats.weight.detach().clone()))
        self.a_bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = F.batch_norm(
            self.conv(x), self.a_mean, self.a_var, self.a_weight, self.a_bias, eps=1e-3
        )
        y = torch.relu(y)
        return self.head(F.batch_norm(y, self.b_mean, self.b_var, self.b_weight, None, False))


def test_functional_batch_norm_calls_fold():
    model = _Functional().double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    folded, report = fold(model)
    assert [(p.placement, p.action) for p in report.pairs] == [
        ("before", "folded"),
        ("after", "folded"),
    ], str(report)
    assert _n_norms(folded) == 0
    assert _same(model, folded, x) < TOL


class _FusedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = _stats(bt.BatchNormReLU2d(4), 1)
        self.bn2 = _stats(bt.BatchNormAddReLU2d(4), 2)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)


def test_fused_relu_layers_fold_and_keep_their_activation():
    model = _FusedLayers().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    folded, report = fold(model)
    assert [p.action for p in report.pairs] == ["folded", "folded"], str(report)
    assert _n_norms(folded) == 0
    assert _same(model, folded, x) < TOL


class _OddNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    "norm, reason",
    [
        (nn.BatchNorm2d(4, track_running_stats=False), "no running statistics"),
        (_OddNorm(4), "not a batch-norm class"),
    ],
)
def test_norms_that_are_not_affine_maps_are_skipped(norm, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).double()
    folded, report = fold(model)
    (pair,) = report.pairs
    assert pair.action == "skipped" and reason in pair.reason
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert _same(model, folded, x) == 0.0


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: (v.clone(), v.dtype) for k, v in model.state_dict(keep_vars=False).items()},
        "ids": [id(p) for p in model.parameters()] + [id(b) for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "repr": repr(model),
    }


@pytest.mark.parametrize(
    "make",
    [
        _SharedConv,
        _FusedLayers,
        _Functional,
        lambda: _Untraceable(
            nn.Sequential(nn.Conv2d(3, 4, 3), _stats(nn.BatchNorm2d(4))), _Block(4)
        ),
    ],
)
def test_original_model_is_untouched(make):
    model = make().double().train()
    before = _state(model)
    channels = 4 if isinstance(model, _FusedLayers) else 3
    fold(model, torch.randn(2, channels, 8, 8, dtype=torch.float64), recompute_shared=True)
    after = _state(model)
    assert after["ids"] == before["ids"] and after["modes"] == before["modes"]
    assert after["grad"] == before["grad"] and after["repr"] == before["repr"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, (value, dtype) in before["tensors"].items():
        assert after["tensors"][key][1] == dtype and torch.equal(after["tensors"][key][0], value)


def test_low_precision_parameters_are_rounded_once():
    """bfloat16 layer: each folded weight is the float64 product rounded once."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3), _stats(nn.BatchNorm2d(4))
    model = nn.Sequential(conv, norm).to(torch.bfloat16)
    folded, _ = fold(model)
    n64 = {k: v.double() for k, v in norm.state_dict().items() if v.is_floating_point()}
    scale = n64["weight"] / torch.sqrt(n64["running_var"] + norm.eps)
    want_w = (conv.weight.double() * scale[:, None, None, None]).to(torch.bfloat16)
    want_b = (scale * (conv.bias.double() - n64["running_mean"]) + n64["bias"]).to(torch.bfloat16)
    (new,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(new.weight, want_w) and torch.equal(new.bias, want_b)


def test_bad_arguments_raise_before_anything():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold("model")
    with pytest.raises(TypeError, match="example_inputs"):
        fold(model, example_inputs={"x": 1})
    with pytest.raises(TypeError, match="recompute_shared"):
        fold(model, recompute_shared="yes")
    assert model.training  # still in train mode


def test_report_text_names_every_pair():
    model = _SharedConv()
    _, report = fold(copy.deepcopy(model), torch.randn(1, 3, 5, 5))
    text = str(report)
    for name in ("bn_a", "bn_b", "bn_c", "max |folded - original|"):
        assert name in text


class _WrittenBetween(nn.Module):
    """The norm's input written in place between the norm and the conv that reads its
    output: folding into the conv would read the written value."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.bn(x)
        x += 1
        return self.conv(y) + x


def test_no_fold_past_an_in_place_write():
    """``y = bn(x); x += 1; conv(y) + x``: fold turned it into ``conv'(x)`` at the conv, after
    the write, off by 0.33 and reported "folded". Now skipped, saying which node writes."""
    torch.manual_seed(0)
    model = _WrittenBetween().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = model(x.clone())
    result = fold(model)
    (pair,) = result.report.pairs
    assert pair.action == "skipped" and "iadd writes in place" in pair.reason, pair
    torch.testing.assert_close(result.model(x.clone()), want, rtol=0, atol=0)


class _Branches(nn.Module):
    """An in-place write between the norm and its conv: of another branch's tensor (harmless)
    or of a view of the norm's input (not)."""

    def __init__(self, write: str) -> None:
        super().__init__()
        self.bn, self.conv, self.write = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), write
        self.other, self.relu = nn.Conv2d(3, 3, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.bn(x)
        z = self.relu(self.other(x))  # writes its own fresh tensor in place
        if self.write == "view":
            x[:, 0] += 1.0  # writes the norm's input through a view
        return self.conv(y) + z + x


def test_fold_tells_an_unrelated_in_place_write_from_one_of_the_input():
    """An in-place ReLU of another branch between the norm and its conv is no reason to skip;
    a write into the norm's input through a view (``x[:, 0] += 1``, which torch.fx's own
    tracer cannot trace) is."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for write, action in (("other branch", "folded"), ("view", "skipped")):
        model = _Branches(write).double().eval()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
        want = model(x.clone())
        result = fold(model)
        (pair,) = result.report.pairs
        assert result.report.discovery == "fx", result.report  # x[i] += v traces now
        assert pair.action == action, (write, pair)
        if action == "skipped":
            assert "iadd writes in place between the norm and conv" in pair.reason, pair
        torch.testing.assert_close(result.model(x.clone()), want)
