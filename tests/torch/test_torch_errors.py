"""Bad input raises a clear ValueError/TypeError before any buffer changes; non-finite batches
leave those channels' running statistics alone; empty batches; backend selection."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import batchnorm.torch as bt
from batchnorm import kernels
from batchnorm.torch import native


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


def _assert_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, b in module.named_buffers():
        assert torch.equal(b, before[name]), f"{name} changed by a rejected call"


def _set(module: torch.nn.Module, **attributes) -> torch.nn.Module:
    """Settings refused at construction, set afterwards: refused again at the call."""
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


# (module factory, input, error type, a fragment the message must contain)
MODULE_CASES = [
    (lambda: bt.BatchNorm1d(3), torch.randn(4, 3, 2, 2), ValueError, "expected 2D or 3D input"),
    (lambda: bt.BatchNorm2d(3), torch.randn(4, 3, 5), ValueError, "expected 4D input"),
    (lambda: bt.BatchNorm3d(3), torch.randn(4, 3, 5, 5), ValueError, "expected 5D input"),
    (lambda: bt.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "1 value(s) per channel"),
    (lambda: bt.BatchNorm1d(3), torch.randn(1, 3), ValueError, "more than 1 value per channel"),
    (
        lambda: bt.BatchNorm2d(4),
        torch.randn(2, 3, 2, 2),
        ValueError,
        "BatchNorm2d(4) got an input with 3 channels (shape (2, 3, 2, 2))",
    ),
    (lambda: bt.BatchNorm2d(3), torch.randint(0, 5, (2, 3, 2, 2)), TypeError, "floating-point"),
    (lambda: bt.BatchNorm2d(3, eps=0.0), torch.randn(2, 3, 2, 2), ValueError, "eps must be"),
    (
        lambda: _set(bt.BatchNorm2d(3), eps=-1e-5),
        torch.randn(2, 3, 2, 2),
        ValueError,
        "eps must be",
    ),
    (
        lambda: _set(bt.BatchNorm2d(3), momentum=1.5),
        torch.randn(2, 3, 2, 2),
        ValueError,
        "momentum",
    ),
    (
        lambda: _set(bt.BatchNorm2d(3), momentum=-0.1),
        torch.randn(2, 3, 2, 2),
        ValueError,
        "momentum",
    ),
    (
        lambda: _set(bt.BatchNorm2d(3), momentum="0.1"),
        torch.randn(2, 3, 2, 2),
        TypeError,
        "momentum",
    ),
    (
        lambda: _set(bt.BatchNorm2d(3), momentum=True),
        torch.randn(2, 3, 2, 2),
        TypeError,
        "momentum",
    ),
]


@pytest.mark.parametrize(("factory", "x", "error", "fragment"), MODULE_CASES)
def test_module_bad_input_changes_nothing(factory, x, error, fragment):
    module = factory()
    with torch.no_grad():  # Non-default buffers, so that a reset would show too.
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 1.5)
        module.num_batches_tracked.fill_(7)
    before = _buffers(module)
    with pytest.raises(error, match=re.escape(fragment)):
        module(x)
    _assert_unchanged(module, before)


def test_module_rejects_unknown_backend_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        bt.BatchNorm2d(3, backend="nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        bt.BatchNorm2d(3, backend=None)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"momentum": 2.0}, ValueError, "momentum must be in [0, 1] or None, got 2.0"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a float"),
        ({"eps": -1.0}, ValueError, "eps must be finite and >= 0, got -1.0"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
    ],
)
def test_module_rejects_bad_settings_at_construction_and_convert_changes_nothing(
    kwargs, error, fragment
):
    """torch.nn builds ``BatchNorm2d(4, momentum=2.0)`` and fails (or computes nonsense) later;
    ours said so only at the first training call. Now at construction too; ``convert`` checks
    every layer before swapping any, naming the layer, and leaves the model as it was."""
    with pytest.raises(error, match=re.escape(fragment)):
        bt.BatchNorm2d(4, **kwargs)
    for valid in ({"eps": 0.0}, {"momentum": None}, {"momentum": 0}, {"momentum": 1}):
        bt.BatchNorm2d(4, **valid)  # eps = 0 serves evaluation; training refuses it at the call
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    )
    for name, value in kwargs.items():
        setattr(model[1][0], name, value)
    with pytest.raises(error, match=re.escape("1.0: " + fragment)):
        bt.convert(model)
    assert [type(m) for m in model.modules()][1:] == [
        torch.nn.BatchNorm2d, torch.nn.Sequential, torch.nn.BatchNorm2d
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown backend"):
        bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), backend="nope")


def _functional_cases():
    x = torch.randn(4, 3, 2)
    c3, c4 = torch.ones(3), torch.ones(4)
    return [
        (dict(input=x.numpy()), TypeError, "torch.Tensor"),
        (dict(running_var=None), ValueError, "both be given or both be None"),
        (dict(running_mean=None), ValueError, "both be given or both be None"),
        (
            dict(running_mean=None, running_var=None, training=False),
            ValueError,
            "must be given when training=False",
        ),
        (dict(weight=c4), ValueError, "weight (gamma) must have shape (3,)"),
        (dict(bias=c4), ValueError, "bias (beta) must have shape (3,)"),
        (dict(running_mean=torch.zeros(4)), ValueError, "running_mean must have shape (3,)"),
        (dict(running_var=torch.ones(3, 1)), ValueError, "running_var must have shape (3,)"),
        (dict(weight=c3.long()), TypeError, "weight (gamma) must have a floating-point dtype"),
        (dict(input=torch.randn(4)), ValueError, "rank >= 2"),
        (dict(input=torch.randn(1, 3)), ValueError, "1 value(s) per channel"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(eps="small"), TypeError, "eps must be a real number"),
        (dict(momentum=2.0), ValueError, "momentum must be in [0, 1]"),
        (dict(momentum=None), ValueError, "momentum=None"),
        (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    ]


def _relu(**args):
    return bt.batch_norm_relu(**args)


def _add_relu(**args):
    x = args["input"]
    residual = torch.zeros_like(x) if isinstance(x, torch.Tensor) else torch.zeros(4, 3, 2)
    return bt.batch_norm_add_relu(residual=residual, **args)


@pytest.mark.parametrize("fn", [bt.batch_norm, _relu, _add_relu], ids=["plain", "relu", "add"])
@pytest.mark.parametrize(("override", "error", "fragment"), _functional_cases())
def test_functional_bad_input_changes_nothing(override, error, fragment, fn):
    args = dict(
        input=torch.randn(4, 3, 2),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        weight=torch.ones(3),
        bias=torch.zeros(3),
        training=True,
        momentum=0.1,
        eps=1e-5,
        backend="auto",
    )
    args.update(override)
    running = [args["running_mean"], args["running_var"]]
    before = [None if r is None else r.clone() for r in running]
    with pytest.raises(error, match=re.escape(fragment)):
        fn(**args)
    for r, b in zip(running, before, strict=True):
        assert r is None or torch.equal(r, b)


class UnavailableBackend(kernels.ReferenceBackend):
    name = "never"

    def unavailable_reason(self, x):
        return f"no kernel for {x.dtype} on {x.device.type} in this test"


@pytest.fixture
def scratch_registry(monkeypatch):
    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))
    monkeypatch.setattr(kernels, "AUTO_ORDER", dict(kernels.AUTO_ORDER))
    monkeypatch.setattr(kernels, "_instances", dict(kernels._instances))
    kernels.REGISTRY["never"] = f"{__name__}:UnavailableBackend"
    kernels.REGISTRY["broken"] = "batchnorm.kernels.no_such_module:Backend"
    # These tests are about auto's choice among our stage backends, not PyTorch's kernel.
    monkeypatch.setattr(native, "NATIVE_BELOW", {})
    return kernels


def test_explicit_unavailable_backend_raises_with_reason(scratch_registry):
    module = bt.BatchNorm2d(3, backend="never")
    before = _buffers(module)
    with pytest.raises(bt.BackendUnavailable, match="no kernel for torch.float32 on cpu"):
        module(torch.randn(2, 3, 2, 2))
    _assert_unchanged(module, before)
    with pytest.raises(bt.BackendUnavailable, match="cannot be imported"):
        bt.batch_norm(torch.randn(2, 3), None, None, training=True, backend="broken")


def test_auto_falls_back_and_says_why(scratch_registry):
    scratch_registry.AUTO_ORDER["cpu"] = ("broken", "never", "reference")
    x = torch.randn(2, 3, 2, 2)
    explanation = bt.explain_backend(x)
    assert explanation.startswith("reference (")
    assert "'broken' cannot be imported" in explanation
    assert "no kernel for torch.float32" in explanation
    module = bt.BatchNorm2d(3)
    module(x)
    assert module.last_backend == "reference"


def test_auto_without_fast_backends_is_reference():
    """On this branch the numba/triton modules may be missing: auto must still work on CPU."""
    x = torch.randn(2, 3)
    assert bt.explain_backend(x).startswith("torch (")  # small: PyTorch's kernel (native.py)
    name = bt.explain_backend(x, through_mean=False).split(" ")[0]  # our stages
    assert name in kernels.REGISTRY
    assert kernels.available_backends(x)[name] is None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_non_finite_batch_leaves_running_stats_and_warns(momentum):
    torch_layer = torch.nn.BatchNorm2d(3, momentum=momentum)
    ours = bt.BatchNorm2d(3, momentum=momentum)
    good = torch.randn(4, 3, 2, 2)
    ours(good), torch_layer(good)
    x = torch.randn(4, 3, 2, 2)
    x[1, 1, 0, 1] = float("inf")
    before = _buffers(ours)
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        y = ours(x)
    y_torch = torch_layer(x)
    # Channel 1 kept its old statistics; PyTorch's are poisoned (that is the difference).
    assert torch.equal(ours.running_mean[1], before["running_mean"][1])
    assert torch.equal(ours.running_var[1], before["running_var"][1])
    assert not torch.isfinite(torch_layer.running_var[1])
    # The finite channels are updated exactly as PyTorch does, and the batch is still counted.
    for name in ("running_mean", "running_var"):
        keep = [0, 2]
        torch.testing.assert_close(getattr(ours, name)[keep], getattr(torch_layer, name)[keep])
    assert int(ours.num_batches_tracked) == int(torch_layer.num_batches_tracked) == 2
    # The output itself is what PyTorch gives (NaN where the channel's moments are not finite).
    torch.testing.assert_close(y, y_torch, equal_nan=True)


def test_non_finite_functional_warns():
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    x = torch.randn(5, 2)
    x[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bt.batch_norm(x, running_mean, running_var, training=True)
    assert any("channel(s) [0]" in str(w.message) for w in caught)
    assert running_mean[0] == 0 and running_var[0] == 1
    assert running_mean[1] != 0


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_matches_torch(training):
    ours, theirs = bt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y, y_theirs = ours(x), theirs(x)
    assert y.shape == y_theirs.shape == x.shape
    y.sum().backward()
    y_theirs.sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        assert torch.equal(a, b), name
