"""BN+LeakyReLU that keeps only its output (In-Place ABN) on every backend: float64 gradcheck,
the unfused torch.nn ops as the peer, what is saved, the gamma guard, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_cases import require

from batchnorm.torch import BatchNormLeakyReLU2d, batch_norm_leaky_relu

SHAPE = (4, 3, 5, 6)
SLOPE = 0.1


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = (torch.randn(3, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return x, w, b


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, training):
    x, w, b = _params(torch.float64)
    require(backend, x)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3).double() + 0.5

    def f(x, w, b):
        return batch_norm_leaky_relu(
            x, running_mean.clone(), running_var.clone(), w, b, training,
            negative_slope=SLOPE, backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_module_equals_torch_nn_unfused(backend, dtype, layout):
    x0, _, _ = _params(dtype)
    require(backend, x0)
    ours = BatchNormLeakyReLU2d(3, negative_slope=SLOPE, backend=backend).to(dtype)
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.LeakyReLU(SLOPE)).to(dtype)
    with torch.no_grad():
        for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters(), strict=True):
            p_ours.uniform_(0.5, 1.5), p_theirs.copy_(p_ours)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {}
    for step, training in enumerate([True, True, True, False, False]):
        ours.train(training), theirs.train(training)
        x, _, _ = _params(dtype, seed=step)
        x = x.contiguous(memory_format=layout)
        dy = torch.randn_like(x)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [ours(xs[0]), theirs(xs[1])]
        assert outs[0].stride() == outs[1].stride()
        grads = [
            torch.autograd.grad(y, [xi, *m.parameters()], dy)
            for y, xi, m in zip(outs, xs, (ours, theirs), strict=True)
        ]
        torch.testing.assert_close(outs[0], outs[1], **tol)
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
            torch.testing.assert_close(a, b, **tol)
    assert ours.last_backend == f"{backend} (fused)"


def _saved_storages(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, {t.untyped_storage().data_ptr() for t in saved if t.dim() > 1}


def test_only_the_output_is_saved(backend):
    x, w, b = _params(torch.float32)
    require(backend, x)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y, big = _saved_storages(
        lambda: batch_norm_leaky_relu(x, None, None, w, b, True, backend=backend)
    )
    assert big == {y.untyped_storage().data_ptr()}
    # The guard: a tiny gamma saves x instead.
    w_small = w.detach().clone()
    w_small[1] = 1e-6
    w_small.requires_grad_()
    y, big = _saved_storages(
        lambda: batch_norm_leaky_relu(x, None, None, w_small, b, True, backend=backend)
    )
    assert big == {x.untyped_storage().data_ptr()}


def test_gamma_guard_keeps_the_gradient_accurate():
    """With |gamma| tiny and beta large, x_hat = (z - beta) / gamma is lost to cancellation in
    float32; the guard (saving x) keeps the float64 oracle's gradient, the recomputation not."""
    x, w, b = _params(torch.float32)
    with torch.no_grad():
        w[1], b[1] = 1e-4, 3.0
    dy = torch.randn(SHAPE)
    xd = x.double().requires_grad_()
    ref = F.leaky_relu(F.batch_norm(xd, None, None, w.double(), b.double(), True), SLOPE)
    (dx_oracle,) = torch.autograd.grad(ref, xd, dy.double())

    def dx_with(guard):
        xi = x.clone().requires_grad_()
        y = batch_norm_leaky_relu(
            xi, None, None, w, b, True, negative_slope=SLOPE, backend="reference",
            gamma_guard=guard,
        )  # fmt: skip
        return torch.autograd.grad(y, xi, dy)[0].double()

    guarded = (dx_with(1e-3) - dx_oracle)[:, 1].abs().max() / dx_oracle[:, 1].abs().max()
    recomputed = (dx_with(0.0) - dx_oracle)[:, 1].abs().max() / dx_oracle[:, 1].abs().max()
    assert guarded < 1e-5
    assert recomputed > 100 * guarded


@pytest.mark.parametrize(
    ("keyword", "bad"),
    [("negative_slope", v) for v in (0.0, -0.1, float("nan"), True, "0.1")]
    + [("gamma_guard", v) for v in (-1e-3, float("nan"), float("inf"), True, "1e-3")],
)
def test_bad_slope_or_gamma_guard_raises(keyword, bad):
    with pytest.raises((TypeError, ValueError), match=keyword):
        BatchNormLeakyReLU2d(3, **{keyword: bad})
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises((TypeError, ValueError), match=keyword):
        batch_norm_leaky_relu(
            torch.randn(SHAPE), running_mean, running_var, training=True, **{keyword: bad}
        )
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_gamma_guard_takes_any_real_number():
    import numpy as np

    layer = BatchNormLeakyReLU2d(3, gamma_guard=np.float32(0.01))
    assert layer.gamma_guard == pytest.approx(0.01) and type(layer.gamma_guard) is float


def test_module_gamma_guard_zero_always_saves_the_output():
    """The module's ``gamma_guard``: the default saves x for a tiny gamma; 0 turns the guard
    (and its host read of gamma) off, and the output is saved whatever gamma is."""
    x = torch.randn(SHAPE, requires_grad=True)
    for guard, saved in ((1e-3, "x saved"), (0.0, None)):
        layer = BatchNormLeakyReLU2d(SHAPE[1], backend="reference", gamma_guard=guard)
        with torch.no_grad():
            layer.weight[1] = 1e-6
        y, big = _saved_storages(lambda: layer(x))  # noqa: B023 (called at once)
        want = x if saved else y
        assert big == {want.untyped_storage().data_ptr()}
        assert layer.last_backend == (
            "reference (fused, x saved)" if saved else "reference (fused)"
        )
    assert "gamma_guard=0.0" in repr(layer)
