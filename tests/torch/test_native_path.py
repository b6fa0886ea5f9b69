"""``backend="auto"`` on PyTorch's own kernel (``native.py``): the same layer as torch.nn, with
our guarantees (errors before state changes, non-finite batches kept out of the running
statistics), and ``explain_backend`` agreeing with what ran."""

from __future__ import annotations

import warnings

import pytest
import torch

import batchnorm.torch as bt
from batchnorm.torch import native


def _buffers(module):
    return {name: b.clone() for name, b in module.named_buffers()}


def _steps(module, xs, training):
    module.train(training)
    outputs, grads = [], []
    for x in xs:
        leaf = x.clone().requires_grad_()
        y = module(leaf)
        params = [p for p in (module.weight, module.bias) if p is not None]
        grads.append(torch.autograd.grad(y, [leaf, *params], torch.ones_like(y) + y.detach()))
        outputs.append(y.detach())
    return outputs, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    ("momentum", "affine", "track"), [(0.1, True, True), (None, True, True), (0.3, False, False)]
)
def test_small_layer_runs_pytorch_kernel_and_matches_torch_nn(dtype, momentum, affine, track):
    torch.manual_seed(0)
    xs = [(torch.randn(4, 3, 5, 5) * 2 + 0.5).to(dtype) for _ in range(3)]
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine, track_running_stats=track)
    ours = bt.BatchNorm2d(3, momentum=momentum, affine=affine, track_running_stats=track)
    theirs.to(dtype), ours.to(dtype)
    for training in (True, False):
        y_theirs, g_theirs = _steps(theirs, xs, training)
        y_ours, g_ours = _steps(ours, xs, training)
        assert ours.last_backend == "torch"
        mode = "train" if training else "eval"
        assert bt.explain_backend(xs[0], training=training).startswith("torch ("), mode
        for a, b in zip([*y_ours, *sum(g_ours, ())], [*y_theirs, *sum(g_theirs, ())], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name, b in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], b, rtol=0, atol=0)


def test_gradients_and_second_derivatives_in_float64():
    module = bt.BatchNorm2d(3).double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = module.weight
    module.track_running_stats = False  # gradcheck calls the layer many times

    def f(x, w):
        return module(x) * w.view(1, -1, 1, 1)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))
    assert module.last_backend == "torch"


def test_switches_and_sinks_take_our_stages():
    x = torch.randn(4, 3, 2, 2)
    assert bt.BatchNorm2d(3, through_mean=False)(x) is not None
    for layer in (bt.BatchNorm2d(3, through_mean=False), bt.BatchNorm2d(3, through_var=False)):
        layer(x)
        assert layer.last_backend != "torch"
    named = bt.BatchNorm2d(3, backend="reference")
    named(x)
    assert named.last_backend == "reference"
    model = torch.nn.Sequential(bt.BatchNorm2d(3))
    with bt.accumulate_stats(model):
        model(x)
    assert model[0].last_backend != "torch"
    assert "switches" in bt.explain_backend(x, through_var=False)
    assert "faster" in bt.explain_backend(torch.zeros(1, 3, 1, 1).expand(4096, 3, 8, 8))
    # In evaluation the switches change nothing (the moments are constants): PyTorch's kernel.
    layer = bt.BatchNorm2d(3, through_mean=False).eval()
    layer(x)
    assert layer.last_backend == "torch"


def test_explain_backend_says_what_the_layer_ran(monkeypatch):
    monkeypatch.setattr(native, "NATIVE_BELOW", {"cpu": (100, 200)})
    for shape in [(2, 3, 4, 4), (4, 3, 2, 2), (2, 3, 2, 2)]:  # 96, 48, 24 values
        for dtype in (torch.float32, torch.float16):
            for layout in ("contiguous", "channels_last"):
                x = torch.randn(shape).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                for training in (True, False):
                    layer = bt.BatchNorm2d(3).to(dtype).train(training)
                    layer(x)
                    said = bt.explain_backend(x, training=training).split(" ")[0]
                    assert said == layer.last_backend, (shape, dtype, layout, training)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m: m(torch.randn(4, 5, 2, 2)), ValueError),  # 5 channels into a 3-channel layer
        (lambda m: m(torch.randn(1, 3, 1, 1)), ValueError),  # m = 1 in training
        (lambda m: m(torch.randn(4, 3, 2)), ValueError),  # rank
        (lambda m: setattr(m, "eps", 0.0) or m(torch.randn(4, 3, 2, 2)), ValueError),
        (lambda m: setattr(m, "momentum", 2.0) or m(torch.randn(4, 3, 2, 2)), ValueError),
        (lambda m: m(torch.randn(4, 3, 2, 2, dtype=torch.float64).to(torch.int64)), TypeError),
    ],
)
def test_bad_calls_raise_our_errors_before_any_state_change(call, error):
    module = bt.BatchNorm2d(3)
    module(torch.randn(4, 3, 2, 2))
    before = _buffers(module)
    with pytest.raises(error):
        call(module)
    for name, b in module.named_buffers():
        assert torch.equal(b, before[name]), name


def test_dtype_pytorch_refuses_is_computed_by_our_stages():
    module = bt.BatchNorm2d(3)  # float32 parameters
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    y = module(x)
    assert y.dtype == torch.float64 and module.last_backend != "torch"
    assert int(module.num_batches_tracked) == 1


def test_non_finite_batch_on_pytorch_kernel_keeps_old_statistics():
    ours, theirs = bt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    good = torch.randn(4, 3, 2, 2)
    ours(good), theirs(good)
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 2, 1, 1] = float("nan")
    before = _buffers(ours)
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[2\]"):
        y = ours(bad)
    assert ours.last_backend == "torch"
    torch.testing.assert_close(y, theirs(bad), equal_nan=True)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(ours, name)[2], before[name][2])
        torch.testing.assert_close(getattr(ours, name)[:2], getattr(theirs, name)[:2])
    assert int(ours.num_batches_tracked) == 2
    # The backward still runs (ATen's node saved the buffers the guard rewrote), as torch.nn's.
    leaf, theirs_leaf = bad.clone().requires_grad_(), bad.clone().requires_grad_()
    with pytest.warns(RuntimeWarning):
        y = ours(leaf)
    g_ours, g_theirs = (torch.autograd.grad(v, t, torch.ones_like(v))[0]
                        for v, t in ((y, leaf), (theirs(theirs_leaf), theirs_leaf)))  # fmt: skip
    torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)
    # A finite batch takes no detour and no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(good)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device"))],
)  # fmt: skip
@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
def test_device_side_guard_keeps_what_the_reference_keeps(momentum, device, monkeypatch):
    """Off the CPU the guard runs on the device (``native.keep_finite``, no host read): ATen
    updates a copy of the buffers, and each channel whose new mean or variance is finite is
    written, the others keep their old values. Oracle: ``reference.update_running_stats``,
    per channel, from the same buffers and batch: a NaN channel, an infinite one, a poisoned
    buffer, a batch whose variance overflows, and finite ones; on CUDA after ATen's CUDA
    update. On the CPU the device path is forced."""
    from batchnorm import reference as ref

    monkeypatch.setattr(native, "host_read_is_cheap", lambda t: False)
    torch.manual_seed(0)
    x = torch.randn(6, 6, 3, 3, dtype=torch.float64)
    x[1, 1, 0, 0] = float("nan")
    x[2, 2, 1, 1] = float("inf")
    x[:, 4] *= 1e154  # finite values whose variance overflows
    mean = torch.randn(6, dtype=torch.float64)
    var = torch.rand(6, dtype=torch.float64) + 0.5
    mean[3] = float("nan")  # buffers already poisoned
    x, mean, var = x.to(device), mean.to(device), var.to(device)
    seen = 4
    rm, rv = mean.clone(), var.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: the warning needs a host read
        native.native_batch_norm(x, None, None, rm, rv, True, momentum, 1e-5, seen)
    stats = ref.batch_stats(x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.update_running_stats(
            mean, var, seen, stats.mean, stats.var, stats.count, momentum=momentum
        )
    # Through autograd: the guard's writes must not stop ATen's backward.
    leaf = x.clone().requires_grad_()
    rm2, rv2 = mean.clone(), var.clone()
    y = native.native_batch_norm(leaf, None, None, rm2, rv2, True, momentum, 1e-5, seen)
    y.backward(torch.ones_like(y))
    assert torch.equal(rm2, rm) or torch.allclose(rm2, rm, equal_nan=True)
    kept = [1, 2, 3, 4]
    for got, expected, before in ((rm, want.running_mean, mean), (rv, want.running_var, var)):
        torch.testing.assert_close(got, expected, equal_nan=True)  # ATen's rounding: close
        for c in kept:  # the kept channels: bit for bit, NaN included
            assert got[c].isnan() if before[c].isnan() else got[c] == before[c]
    assert torch.isfinite(rm[[0, 5]]).all() and not torch.equal(rm[[0, 5]], mean[[0, 5]])


@pytest.mark.parametrize("host_read", [True, False], ids=["cpu-rule", "device-rule"])
def test_evaluation_graph_backward_after_a_training_step_as_torch_nn(host_read, monkeypatch):
    """An evaluation forward saves the running statistics for its backward; a training step
    in between changes them. torch.nn's backward still runs (ATen's update does not count as
    a change of the saved tensors) and uses the new values; a drop-in layer must not raise
    there ("modified by an inplace operation") and must give the same gradient."""
    monkeypatch.setattr(native, "host_read_is_cheap", lambda t: host_read)
    torch.manual_seed(0)
    x, batch = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 3 + 1
    grads = []
    for layer in (torch.nn.BatchNorm2d(3), bt.BatchNorm2d(3)):
        leaf = x.clone().requires_grad_()
        y = layer.eval()(leaf)
        layer.train()(batch)
        y.square().sum().backward()
        grads.append(leaf.grad)
    assert layer.last_backend == "torch"
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


class _Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_replaced_parameters_are_read_as_the_module_exposes_them():
    """The small-call path reads parameters and buffers from the module's dicts. A
    parametrization (``weight`` becomes a property) and ``torch.func.functional_call`` (the
    dicts' entries swapped for the call) must still be what the layer normalises with."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    for training in (True, False):
        ours, theirs = bt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5), theirs.bias.normal_()
        ours.load_state_dict(theirs.state_dict())
        for module in (ours, theirs):
            torch.nn.utils.parametrize.register_parametrization(module, "weight", _Doubled())
            module.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        for name, b in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], b, rtol=0, atol=0)

        ours, theirs = bt.BatchNorm2d(3).train(training), torch.nn.BatchNorm2d(3).train(training)
        swapped = {"weight": torch.full((3,), 3.0), "bias": torch.full((3,), -1.0)}
        y = torch.func.functional_call(ours, swapped, (x,))
        assert ours.last_backend == "torch"
        torch.testing.assert_close(y, torch.func.functional_call(theirs, swapped, (x,)))
        assert not torch.allclose(y, ours(x))  # the swap mattered


def test_functional_auto_uses_pytorch_kernel_with_the_guard():
    running_mean, running_var = torch.zeros(2), torch.ones(2)
    x = torch.randn(5, 2)
    y = bt.batch_norm(x, running_mean, running_var, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    x[0, 1] = float("inf")
    kept = running_mean[1].clone(), running_var[1].clone()
    with pytest.warns(RuntimeWarning):
        bt.batch_norm(x, running_mean, running_var, training=True)
    assert torch.equal(running_mean[1], kept[0]) and torch.equal(running_var[1], kept[1])
    assert torch.isfinite(running_mean).all() and torch.isfinite(running_var).all()


# ------------------------------------------------------------- fused layers on small calls


def _torch_pair(fused):
    """torch.nn's unfused sequence with ``fused``'s parameters and buffers (copies)."""
    bn = torch.nn.BatchNorm2d(fused.num_features, momentum=fused.momentum)
    bn.to(fused.weight.dtype).load_state_dict(fused.state_dict())
    return bn.train(fused.training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_small_fused_layer_is_torch_nn_bn_then_relu_exactly(dtype, with_residual):
    torch.manual_seed(1)
    fused = (bt.BatchNormAddReLU2d(3) if with_residual else bt.BatchNormReLU2d(3)).to(dtype)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5), fused.bias.uniform_(-0.5, 0.5)
    bn = _torch_pair(fused)
    for training in (True, False, True):
        fused.train(training), bn.train(training)
        x = (torch.randn(4, 3, 5, 5) * 2 + 0.5).to(dtype)
        r = torch.randn(4, 3, 5, 5).to(dtype)
        cotangent = torch.randn(4, 3, 5, 5).to(dtype)
        grads = []
        for module, layer in ((fused, fused), (bn, None)):
            leaf, res = x.clone().requires_grad_(), r.clone().requires_grad_()
            if layer is None:
                z = module(leaf)
                y = torch.relu(z + res if with_residual else z)
            else:
                y = module(leaf, res) if with_residual else module(leaf)
            params = [module.weight, module.bias]
            inputs = [leaf, res, *params] if with_residual else [leaf, *params]
            grads.append((y.detach(), *torch.autograd.grad(y, inputs, cotangent)))
        assert fused.last_backend == "torch"
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for name, b in bn.named_buffers():
            torch.testing.assert_close(dict(fused.named_buffers())[name], b, rtol=0, atol=0)


def test_large_fused_call_keeps_our_fused_stages(monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(native, "NATIVE_BELOW", {"cpu": (100, 100)})
    layer = bt.BatchNormReLU2d(3)
    layer(torch.randn(4, 3, 3, 3))  # 108 values
    assert layer.last_backend.endswith("(fused)")
    layer(torch.randn(4, 3, 2, 2))  # 48 values
    assert layer.last_backend == "torch"


def test_small_fused_layer_keeps_a_non_finite_batch_out_of_the_statistics():
    fused = bt.BatchNormReLU2d(3)
    fused(torch.randn(4, 3, 2, 2))
    before = _buffers(fused)
    bad = torch.randn(4, 3, 2, 2)
    bad[1, 0, 0, 1] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[0\]"):
        fused(bad)
    assert fused.last_backend == "torch"
    assert torch.equal(fused.running_mean[0], before["running_mean"][0])
    assert torch.equal(fused.running_var[0], before["running_var"][0])
    assert not torch.equal(fused.running_mean[1:], before["running_mean"][1:])


@pytest.mark.parametrize(
    "residual",
    [
        torch.randn(4, 3, 2, 3),  # shape
        torch.randn(4, 3, 2, 2, dtype=torch.float64),  # dtype
        torch.randn(4, 3, 2, 2, device="meta"),  # device
    ],
    ids=["shape", "dtype", "device"],
)
def test_small_fused_layer_rejects_a_bad_residual_before_any_state_change(residual):
    fused = bt.BatchNormAddReLU2d(3)
    fused(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    before = _buffers(fused)
    with pytest.raises((ValueError, TypeError), match="residual"):
        fused(torch.randn(4, 3, 2, 2), residual)
    for name, b in fused.named_buffers():
        assert torch.equal(b, before[name]), name


def test_long_contiguous_runs_take_our_stages_sooner_in_training(monkeypatch):
    """``NATIVE_BELOW_LONG_ROWS``: a contiguous float32/float64 input with >= 128 values per
    (n, c) leaves PyTorch's kernel at the lower limit; channels_last, short runs or a 16-bit
    dtype keep the general one."""
    pytest.importorskip("numba")
    monkeypatch.setattr(native, "NATIVE_BELOW", {"cpu": (1000, 1000)})
    monkeypatch.setattr(native, "NATIVE_BELOW_LONG_ROWS", {"cpu": 300})
    long_runs = torch.randn(2, 2, 8, 16)  # 512 values, 128 per (n, c)
    cases = [
        (long_runs, True, "reference"),  # our stages (the reference at this size)
        (long_runs, False, "torch"),  # evaluation: the general limit
        (long_runs.contiguous(memory_format=torch.channels_last), True, "torch"),
        (torch.randn(4, 4, 4, 8), True, "torch"),  # 512 values, 32 per (n, c)
        (long_runs.to(torch.bfloat16), True, "torch"),  # 16-bit: PyTorch's kernel is faster
    ]
    for x, training, ran in cases:
        layer = bt.BatchNorm2d(x.shape[1]).to(x.dtype).train(training)
        layer(x)
        assert layer.last_backend == ran, (tuple(x.shape), x.is_contiguous(), training)
        assert bt.explain_backend(x, training=training).split(" ")[0] == ran
    assert "long contiguous runs" in bt.explain_backend(long_runs)


def test_device_side_guard_launches_few_kernels(monkeypatch):
    """Off the CPU each training call of a small layer pays a launch per extra ATen op, which
    on a GPU costs the host more than the GPU's work (an H200, 2026-12-04: about 25 us each,
    0.3 ms per layer for the 12 extra ops the guard first had). Counted on the meta device
    (no data, same dispatch as CUDA through ``native``): at most 6 kernel-launching ops beyond
    torch.nn's (the copy of the buffers, a three-op finiteness test, two writes; it was 8
    before the test became one multi-tensor product, a sum and a comparison), and no host
    read."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"aten.detach.default", "aten.slice.Tensor", "aten.view.default", "aten.alias.default"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) not in views:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setitem(native.NATIVE_BELOW, "meta", native.NATIVE_BELOW["cuda"])
    counts = {}
    for name, layer in (("torch.nn", torch.nn.BatchNorm2d(64)), ("ours", bt.BatchNorm2d(64))):
        layer = layer.to("meta")
        x = torch.empty(16, 64, 8, 8, device="meta", requires_grad=True)
        with Count() as counter:
            y = layer(x)
            y.backward(torch.ones_like(y))
        counts[name] = counter.ops
    assert getattr(layer, "last_backend", None) == "torch"
    extra = counts["ours"] - counts["torch.nn"]
    assert sum(extra.values()) <= 6, extra
    assert "aten._local_scalar_dense.default" not in counts["ours"]
