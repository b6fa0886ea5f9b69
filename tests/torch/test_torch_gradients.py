"""Gradients of the autograd Function: float64 finite differences (gradcheck, gradgradcheck),
the moments-as-constants switches against autograd over a primitive-op graph with the moment
detached, and proof that the backward runs the backend's stages, not autograd."""

from __future__ import annotations

import pytest
import torch
from torch_cases import make_input, require

import batchnorm.torch as bt
from batchnorm.kernels import ReferenceBackend, register
from batchnorm.torch import native

SHAPES = [(4, 3), (2, 2, 3), (2, 3, 2, 2), (2, 2, 2, 1, 2)]


def _args(shape, affine, gen, layout="contiguous"):
    """``(x, weight, bias)`` in float64; ``affine`` is "both", "weight", "bias" or "none"."""
    _, x = make_input(shape, torch.float64, layout, gen)
    c = shape[1]
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_(True)
    return (
        x.detach().requires_grad_(True),
        w if affine in ("both", "weight") else None,
        b if affine in ("both", "bias") else None,
    )


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradcheck_and_gradgradcheck(backend, shape, training, affine):
    gen = torch.Generator().manual_seed(len(shape))
    x, w, b = _args(shape, affine, gen)
    require(backend, x)
    c = shape[1]
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64)
    running_var = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    params = [p for p in (w, b) if p is not None]

    def f(x, *args):
        given = iter(args)
        weight = None if w is None else next(given)
        bias = None if b is None else next(given)
        # Fresh copies: the training forward updates the running statistics in place.
        return bt.batch_norm(
            x,
            running_mean.clone(),
            running_var.clone(),
            weight,
            bias,
            training,
            backend=backend,
        )

    inputs = (x, *params)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradients_of_parameters_only(backend):
    """An input that needs no gradient (a first layer): weight/bias gradients still right."""
    gen = torch.Generator().manual_seed(2)
    x, w, b = _args((4, 3, 2), "both", gen)
    x = x.detach()
    require(backend, x)
    assert torch.autograd.gradcheck(
        lambda w, b: bt.batch_norm(x, None, None, w, b, True, backend=backend), (w, b)
    )


def test_gradgradcheck_channels_last(backend):
    gen = torch.Generator().manual_seed(7)
    x, w, b = _args((2, 3, 2, 2), "both", gen, layout="channels_last")
    x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    require(backend, x)

    def f(x, w, b):
        return bt.batch_norm(x, None, None, w, b, True, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _detached_graph(x, w, b, eps, through_mean, through_var):
    """Batch norm on primitive ops with a moment computed from the batch but then a constant.

    With the mean detached the variance is taken about that constant mean, as in the reference
    oracle ``tests/reference/oracles.py::bn_numpy``.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    if not through_mean:
        mean = mean.detach()
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    if not through_var:
        var = var.detach()
    return (x - mean) / torch.sqrt(var + eps) * w.view(shape) + b.view(shape)


@pytest.mark.parametrize(
    ("through_mean", "through_var"), [(False, True), (True, False), (False, False), (True, True)]
)
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 2)], ids=str)
def test_switches_first_and_second_derivatives(backend, shape, through_mean, through_var):
    """Both orders of derivative equal autograd's on the graph with the moment detached."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = _args(shape, "both", gen)
    require(backend, x)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = bt.batch_norm(
        x,
        None,
        None,
        w,
        b,
        True,
        backend=backend,
        through_mean=through_mean,
        through_var=through_var,
    )
    oracle = _detached_graph(x, w, b, 1e-5, through_mean, through_var)
    torch.testing.assert_close(ours, oracle)

    first_ours = torch.autograd.grad(ours, (x, w, b), dy, create_graph=True)
    first_oracle = torch.autograd.grad(oracle, (x, w, b), dy, create_graph=True)
    for a, e in zip(first_ours, first_oracle, strict=True):
        torch.testing.assert_close(a, e)
    # Without create_graph the backend's first-order path runs instead: same numbers.
    plain = torch.autograd.grad(
        bt.batch_norm(
            x,
            None,
            None,
            w,
            b,
            True,
            backend=backend,
            through_mean=through_mean,
            through_var=through_var,
        ),
        (x, w, b),
        dy,
    )
    for a, e in zip(plain, first_oracle, strict=True):
        torch.testing.assert_close(a, e)

    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    wrt = (x, w, dy)
    # With the variance detached dx no longer depends on x: unused inputs get zeros.
    second_ours = torch.autograd.grad((first_ours[0] * v).sum(), wrt, materialize_grads=True)
    second_oracle = torch.autograd.grad((first_oracle[0] * v).sum(), wrt, materialize_grads=True)
    for a, e in zip(second_ours, second_oracle, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(("through_mean", "through_var"), [(False, True), (True, False)])
def test_module_switches_reach_the_backward(backend, through_mean, through_var):
    gen = torch.Generator().manual_seed(5)
    x, _, _ = _args((4, 3, 2, 2), "none", gen)
    require(backend, x)
    module = bt.BatchNorm2d(
        3, dtype=torch.float64, backend=backend, through_mean=through_mean, through_var=through_var
    )
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dx = torch.autograd.grad(module(x), x, dy)[0]
    oracle = _detached_graph(x, module.weight, module.bias, module.eps, through_mean, through_var)
    torch.testing.assert_close(dx, torch.autograd.grad(oracle, x, dy)[0])
    full = _detached_graph(x, module.weight, module.bias, module.eps, True, True)
    assert not torch.allclose(dx, torch.autograd.grad(full, x, dy)[0])


class SpyBackend(ReferenceBackend):
    """The reference backend, recording which stages ran."""

    name = "spy"
    calls: list[str] = []

    def batch_stats(self, *args, **kwargs):
        self.calls.append("batch_stats")
        return super().batch_stats(*args, **kwargs)

    def elemt(self, *args, **kwargs):
        self.calls.append("elemt")
        return super().elemt(*args, **kwargs)

    def forward_infer(self, *args, **kwargs):
        self.calls.append("forward_infer")
        return super().forward_infer(*args, **kwargs)

    def backward_reduce(self, *args, **kwargs):
        self.calls.append("backward_reduce")
        return super().backward_reduce(*args, **kwargs)

    def backward_elemt(self, *args, **kwargs):
        self.calls.append("backward_elemt")
        return super().backward_elemt(*args, **kwargs)


@pytest.fixture
def spy(monkeypatch):
    from batchnorm import kernels

    monkeypatch.setitem(kernels.REGISTRY, "spy", f"{__name__}:SpyBackend")
    monkeypatch.setattr(kernels, "_instances", dict(kernels._instances))
    SpyBackend.calls = []
    return SpyBackend.calls


@pytest.mark.parametrize(
    ("training", "through_mean", "expected"),
    [
        (True, True, ["batch_stats", "elemt", "backward_reduce", "backward_elemt"]),
        (True, False, ["batch_stats", "elemt", "backward_reduce", "backward_elemt"]),
        (False, True, ["forward_infer", "backward_reduce", "backward_elemt"]),
    ],
)
def test_backward_runs_the_backend_stages(spy, training, through_mean, expected):
    x = torch.randn(4, 3, 2, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    y = bt.batch_norm(
        x,
        torch.zeros(3),
        torch.ones(3),
        w,
        None,
        training,
        backend="spy",
        through_mean=through_mean,
    )
    # Only x, weight, mean and invstd are kept for the backward.
    saved = y.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(4, 3, 2), (3,), (3,), (3,)]
    assert saved[0] is x and saved[1] is w
    y.backward(torch.randn_like(y))
    # A backend without fused compositions: its stages, each once, in order.
    assert spy == expected
    assert bt.explain_backend(x, "spy") == "spy"


def test_register_adds_to_auto_order(monkeypatch):
    from batchnorm import kernels

    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))
    monkeypatch.setattr(kernels, "AUTO_ORDER", dict(kernels.AUTO_ORDER))
    monkeypatch.setattr(kernels, "_instances", dict(kernels._instances))
    register("spy", f"{__name__}:SpyBackend", auto={"cpu": 0})
    # Small inputs go to PyTorch's kernel (native.py); this is about the stage backends' order.
    monkeypatch.setattr(native, "NATIVE_BELOW", {})
    module = bt.BatchNorm1d(3)
    module(torch.randn(4, 3))
    assert module.last_backend == "spy"


@pytest.mark.parametrize(
    ("training", "through_mean", "through_var"),
    [(True, True, True), (True, False, True), (True, True, False), (False, True, True)],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_mode_jvp_is_the_jacobian_times_the_tangent(
    backend, training, through_mean, through_var, layout
):
    """Forward-mode AD against the Jacobian built column by column from finite differences of
    the forward (float64), for x, weight and bias tangents together."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = _args((3, 2, 2, 3), "both", gen, layout)
    require(backend, x)
    x, w, b = x.detach(), w.detach(), b.detach()
    running = (torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5)

    def f(x, w, b):
        rm, rv = (r.clone() for r in running)
        return bt.batch_norm(
            x, rm, rv, w, b, training=training, backend=backend,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip

    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (x, w, b))
    y, jvp = torch.func.jvp(f, (x, w, b), tangents)
    h = 1e-6
    plus = f(*(p + h * t for p, t in zip((x, w, b), tangents, strict=True)))
    minus = f(*(p - h * t for p, t in zip((x, w, b), tangents, strict=True)))
    torch.testing.assert_close(y, f(x, w, b))
    if through_mean and through_var:  # the full derivative: finite differences are the oracle
        torch.testing.assert_close(jvp, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-7)
    # Any switch setting: the jvp is the transpose of the backward's vjp (<J t, u> = <t, J^T u>).
    u = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    _, vjp = torch.func.vjp(f, x, w, b)
    lhs = (jvp * u).sum()
    rhs = sum((t * g).sum() for t, g in zip(tangents, vjp(u), strict=True))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)
    assert jvp.is_contiguous(memory_format=bt.function.memory_format_of(x))


def test_torch_func_grad_and_jacrev_match_autograd(backend):
    gen = torch.Generator().manual_seed(6)
    x, w, b = _args((4, 3, 2), "both", gen)
    require(backend, x)
    # In training, buffers updated in place are refused by torch.func (as for torch.nn's own
    # layers; functorch's advice: no running statistics).
    free = bt.BatchNorm1d(3, backend=backend, track_running_stats=False).double()

    def loss(x):
        return (free(x) ** 3).sum()

    x = x.detach().requires_grad_(True)
    loss(x).backward()
    torch.testing.assert_close(torch.func.grad(loss)(x.detach()), x.grad)
    module = bt.BatchNorm1d(3, backend=backend).double()
    module(x.detach() * 2 + 1)
    module.eval()
    jac = torch.func.jacrev(module)(x.detach())
    scale = (module.weight / torch.sqrt(module.running_var + module.eps)).detach()
    want = torch.diag_embed(scale[None, :, None].expand(4, 3, 2).reshape(-1)).reshape(jac.shape)
    torch.testing.assert_close(jac, want)


def test_eval_without_grad_skips_autograd_but_grad_and_transforms_do_not(monkeypatch):
    """Where no gradient can be asked for, the forward is called without the autograd Function
    (its per-call cost exceeded a small layer's kernels); a gradient, forward-mode AD and a
    torch.func transform still go through it, and every path gives torch's numbers."""
    import torch.autograd.forward_ad as fwAD

    import batchnorm.torch.function as fn

    calls = []
    original = fn.BatchNormFunction.apply
    monkeypatch.setattr(fn.BatchNormFunction, "apply", lambda *a: calls.append(1) or original(*a))
    # Outside torch.func the C++ apply is called directly (``function._APPLY``).
    original_cpp = fn._APPLY
    monkeypatch.setattr(fn, "_APPLY", lambda *a: calls.append(1) or original_cpp(*a))
    ours, theirs = bt.BatchNorm2d(3, backend="reference"), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1)
        ours.running_var.uniform_(0.5, 2)
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    assert calls == []
    ours.weight.requires_grad_(False), theirs.weight.requires_grad_(False)
    ours.bias.requires_grad_(False), theirs.bias.requires_grad_(False)
    torch.testing.assert_close(ours(x), theirs(x))  # grad mode on, nothing requires grad
    assert calls == []
    xg = x.clone().requires_grad_()
    ours(xg).sum().backward()
    assert len(calls) == 1 and xg.grad is not None
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent))).tangent
        want = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent))).tangent
    torch.testing.assert_close(got, want)
    assert len(calls) == 2
    got = torch.func.jvp(ours, (x,), (tangent,))[1]
    torch.testing.assert_close(got, torch.func.jvp(theirs, (x,), (tangent,))[1])
    assert len(calls) > 2


@pytest.mark.parametrize("case", ["eval", "train, switches off"])
def test_gradient_penalty_where_dx_does_not_depend_on_x(backend, case):
    """A ``create_graph=True`` gradient whose dx does not depend on x (evaluation without
    affine parameters, or both moments switches off) and a dy that needs no gradient: the
    graph ended there and a gradient penalty's backward raised "does not require grad" on
    our stages, where torch.nn's runs (its derivative for x is None). Now as torch.nn."""
    gen = torch.Generator().manual_seed(5)
    x, _, _ = _args((4, 3, 2, 2), "none", gen)
    require(backend, x)
    w = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    training = case != "eval"
    layer = bt.BatchNorm2d(3, affine=False, backend=backend, through_mean=not training,
                           through_var=not training).double().train(training)  # fmt: skip
    peer = torch.nn.BatchNorm2d(3, affine=False).double().train(training)
    (gx,) = torch.autograd.grad((layer(x) * w).sum(), x, create_graph=True)
    assert layer.last_backend != "torch"
    assert gx.requires_grad and not gx._is_view()
    gx.square().sum().backward()
    assert x.grad is None
    if not training:
        (peer_gx,) = torch.autograd.grad((peer(x) * w).sum(), x, create_graph=True)
        torch.testing.assert_close(gx, peer_gx)
    gx.mul_(2)  # a user may change it in place, as torch.nn's
