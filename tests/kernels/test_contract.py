"""The stage contract, once for every backend in ``batchnorm.kernels.REGISTRY``.

Every stage of every registered backend is checked against the reference's float64 math over a
table of awkward cases (layouts, ranks, dtypes, m = 2, N = 1, a large offset, an inf channel,
the moments-as-constants switches), for determinism and for what it returns (kind, dtype,
layout). A backend added to the registry is covered here without writing a test: the ``toy``
backend below is registered inside the test, through ``register``, and covered the same way;
a mutant of it shows the checks fail on a wrong backend.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # before triton's first import: run it in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from masked_contract import (  # noqa: E402
    MASK_KINDS,
    MASKED_CASES,
    PADDING,
    check_masked_contract,
    make_masked,
)

from batchnorm import kernels  # noqa: E402
from batchnorm import reference as ref  # noqa: E402
from batchnorm.kernels import BackendUnavailable, get_backend, register  # noqa: E402
from batchnorm.reference.stages import has_masked_stages  # noqa: E402

# Compile once per worker, with the numba tests.
pytestmark = pytest.mark.xdist_group("numba")

EPS = 1e-5
#: Outputs: the compute dtype's rounding, then the output dtype's (half an ulp relative).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}
#: Statistics and sums: computed in float32 (float64) from exactly representable inputs.
STATS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

#: id -> (logical shape, channel axis, layout, offset)
CASES = {
    "nc": ((16, 5), 1, "contiguous", 0.5),
    "nc_m2": ((2, 4), 1, "contiguous", 0.5),
    "ncl": ((4, 3, 6), 1, "contiguous", 0.5),
    "ncl_long_rows": ((3, 2, 130), 1, "contiguous", 0.5),
    "nchw": ((3, 4, 5, 6), 1, "contiguous", 0.5),
    "nchw_n1": ((1, 3, 4, 4), 1, "contiguous", 0.5),
    "channels_last": ((3, 4, 5, 6), 1, "channels_last", 0.5),
    "ncdhw": ((2, 3, 2, 3, 4), 1, "contiguous", 0.5),
    "axis_last": ((4, 3, 2, 6), 3, "contiguous", 0.5),
    "strided": ((3, 4, 5, 12), 1, "strided", 0.5),
    "large_offset": ((64, 4), 1, "contiguous", 1e4),
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SWITCHES = [(True, True), (False, True), (True, False), (False, False)]


class ToyBackend:
    """A backend written from scratch for this test: float64 torch ops, a uint8 ReLU mask, no
    fused compositions. Registered by the ``backend`` fixture; never by the package."""

    name = "toy"

    def unavailable_reason(self, x):
        return None if isinstance(x, torch.Tensor) else "the toy backend takes torch tensors"

    @staticmethod
    def _shape(x, axis):
        return [x.shape[axis] if i == axis else 1 for i in range(x.dim())]

    @staticmethod
    def _cdt(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def batch_stats(self, x, axis):
        dims = [i for i in range(x.dim()) if i != axis]
        x64 = x.double()
        count = x.numel() // x.shape[axis] if x.shape[axis] else 0
        mean = x64.mean(dims)
        var = ((x64 - mean.view(self._shape(x, axis))) ** 2).mean(dims)
        return ref.BatchStats(count, mean.to(self._cdt(x)), var.to(self._cdt(x)))

    def _affine(self, x, mean, invstd, gamma, beta, axis):
        s = self._shape(x, axis)
        z = (x.double() - mean.double().view(s)) * invstd.double().view(s)
        if gamma is not None:
            z = z * gamma.double().view(s)
        if beta is not None:
            z = z + beta.double().view(s)
        return z

    def elemt(self, x, mean, invstd, gamma, beta, axis, *, residual=None, relu=False):
        z = self._affine(x, mean, invstd, gamma, beta, axis)
        if residual is not None:
            z = z + residual.double()
        mask = None
        if relu:
            mask = (~(z <= 0)).to(torch.uint8)  # NaN passes, as torch.relu
            z = torch.where(mask.bool(), z, torch.zeros_like(z))
        return ref.Elemt(z.to(x.dtype), mask)

    def forward_infer(self, x, running_mean, running_var, gamma, beta, eps, axis):
        invstd = 1 / (running_var.double() + eps).sqrt()
        return self._affine(x, running_mean, invstd, gamma, beta, axis).to(x.dtype)

    def backward_reduce(self, dy, x, mean, invstd, axis):
        dims = [i for i in range(x.dim()) if i != axis]
        x_hat = self._affine(x, mean, invstd, None, None, axis)
        sums = dy.double().sum(dims), (dy.double() * x_hat).sum(dims)
        return tuple(v.to(mean.dtype) for v in sums)

    def backward_elemt(
        self, dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
        through_mean=True, through_var=True,
    ):  # fmt: skip
        s = self._shape(x, axis)
        inner = dy.double()
        if through_mean:
            inner = inner - sum_dy.double().view(s) / count
        if through_var:
            x_hat = self._affine(x, mean, invstd, None, None, axis)
            inner = inner - x_hat * sum_dy_xhat.double().view(s) / count
        scale = invstd.double() if gamma is None else gamma.double() * invstd.double()
        return (inner * scale.view(s)).to(x.dtype)

    def relu_backward(self, dy, x, relu_mask, axis):
        return torch.where(relu_mask.bool(), dy, torch.zeros_like(dy))


class MutantBackend(ToyBackend):
    """The toy backend with the unbiased variance normalising: the contract must reject it."""

    name = "mutant"

    def batch_stats(self, x, axis):
        stats = super().batch_stats(x, axis)
        return stats._replace(var=stats.var * stats.count / (stats.count - 1))


def _registered(monkeypatch, name, cls):
    monkeypatch.setattr(kernels, "REGISTRY", dict(kernels.REGISTRY))
    monkeypatch.setattr(kernels, "_instances", dict(kernels._instances))
    register(name, f"{__name__}:{cls.__name__}")


@pytest.fixture(params=[*kernels.REGISTRY, "toy"])
def backend(request, monkeypatch):
    """Every registered backend by name, and the toy one registered here."""
    if request.param == "toy":
        _registered(monkeypatch, "toy", ToyBackend)
    return request.param


def _make(case, dtype, seed=0, device="cpu"):
    shape, axis, layout, offset = CASES[case]
    g = torch.Generator().manual_seed(seed)
    base = list(shape)
    if layout == "strided":
        base[-1] *= 2
    # Drawn on the CPU (the same values on every device), laid out on the device.
    values = torch.randn(base, generator=g, dtype=torch.float64).to(device)
    scales = torch.linspace(0.5, 2.0, shape[axis], dtype=torch.float64, device=device)
    values = values * scales.view([-1 if i == axis else 1 for i in range(len(shape))])
    x = (values + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[..., ::2]
    return x, axis


def _vectors(channels, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(device, cdt)
    beta = (torch.randn(channels, generator=g, dtype=torch.float64) * 0.5).to(device, cdt)
    return gamma, beta


def _device(backend):
    """Where a backend's contract runs: Triton on the GPU where there is one (without one,
    this module set TRITON_INTERPRET=1 and it runs on CPU tensors), the others on the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _like(x, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(x)
    out.copy_(torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype))
    return out


def _check(got, want, tol, name, scale=None):
    """``got`` within ``tol`` of ``want`` relative to ``scale`` (default: want's largest)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if scale is None else scale
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


def _stages(name, x):
    try:
        return get_backend(name, x)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def check_contract(stages, case, dtype, device="cpu"):
    """Every stage of ``stages`` against the reference in float64 on one case; raises
    AssertionError naming the stage that disagrees."""
    x, axis = _make(case, dtype, device=device)
    x64 = x.double()
    channels = x.shape[axis]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = _vectors(channels, dtype, device=device)
    dy, residual = _like(x, 2), _like(x, 3)
    tol, stol = TOL[dtype], STATS_TOL[dtype]
    m = x.numel() // channels

    stats = stages.batch_stats(x, axis)
    want = ref.batch_stats(x64, axis)
    assert int(stats.count) == m, f"batch_stats: count {stats.count} != {m}"
    assert stats.mean.dtype == cdt and stats.var.dtype == cdt, "batch_stats: compute dtype"
    spread = want.var.max().item() ** 0.5
    _check(stats.mean, want.mean, stol, "batch_stats mean", abs(want.mean).max().item() + spread)
    _check(stats.var, want.var, stol, "batch_stats var")

    # The elementwise stages on the reference's own (float64) moments, rounded to cdt.
    mean, invstd = want.mean.to(cdt), ref.inverse_std(want.var, EPS).to(cdt)
    mean64, invstd64 = mean.double(), invstd.double()
    y_scale = (gamma.double().abs() * 3 + beta.double().abs()).max().item()
    y, relu_mask = stages.elemt(x, mean, invstd, gamma, beta, axis)
    assert relu_mask is None, "elemt: a mask without relu"
    assert y.dtype == x.dtype and y.shape == x.shape, "elemt: dtype or shape"
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last), "elemt: layout"
    want_y = ref.elemt(x64, mean64, invstd64, gamma.double(), beta.double(), axis)
    _check(y, want_y, tol, "elemt", y_scale)

    fused, relu_mask = stages.elemt(
        x, mean, invstd, gamma, beta, axis, residual=residual, relu=True
    )
    z = want_y + residual.double()
    _check(fused, z.clamp(min=0), tol, "elemt(residual, relu)", y_scale + 3)
    passed = stages.relu_backward(torch.ones_like(x), x, relu_mask, axis)
    clear = (z.abs() > 4 * tol * (y_scale + 3)).double()  # away from the kink, rounding aside
    _check(passed.double() * clear, (z > 0).double() * clear, 0.0, "relu_backward", 1.0)

    running_var = gamma.double() ** 2 + 0.5
    _check(
        stages.forward_infer(x, beta, running_var.to(cdt), gamma, beta, EPS, axis),
        ref.batch_norm_infer(x64, beta.double(), running_var, gamma.double(), beta.double(),
                             axis=axis, eps=EPS),
        tol, "forward_infer",
    )  # fmt: skip

    sums = stages.backward_reduce(dy, x, mean, invstd, axis)
    want_sums = ref.backward_reduce(dy.double(), x64, mean64, invstd64, axis)
    for got_s, want_s, name in zip(sums, want_sums, ("sum_dy", "sum_dy_xhat"), strict=True):
        assert got_s.dtype == cdt, f"backward_reduce: {name} dtype {got_s.dtype}"
        _check(got_s, want_s, stol * 10, f"backward_reduce {name}", m**0.5 * 3)

    sums64 = [s.double() for s in want_sums]
    dx_scale = (gamma.double() * invstd64).max().item() * 4
    for through_mean, through_var in SWITCHES:
        dx = stages.backward_elemt(
            dy, x, mean, invstd, gamma, *[s.to(cdt) for s in sums64], m, axis,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip
        want_dx = ref.backward_elemt(
            dy.double(), x64, mean64, invstd64, gamma.double(), *sums64, m, axis,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip
        _check(dx, want_dx, tol, f"backward_elemt({through_mean=}, {through_var=})", dx_scale)

    # The compositions: the backend's fused ones where it has them, else its stages composed.
    out = ref.forward_train(stages, x, gamma, beta, EPS, axis, residual=residual, relu=True)
    want_out = ref.compose_forward_train(
        ref.REFERENCE, x64, gamma.double(), beta.double(), EPS, axis,
        residual=residual.double(), relu=True,
    )  # fmt: skip
    _check(out.y, want_out.y, tol * 4, "forward_train y", y_scale + 3)
    _check(
        out.var, want_out.var, max(stol, 1e-4 if case == "large_offset" else 0), "forward_train var"
    )
    grads = ref.backward_train(
        stages, dy, x, out.mean, out.invstd, gamma, axis, relu_mask=out.relu_mask,
        residual_grad=True,
    )  # fmt: skip
    want_grads = ref.compose_backward_train(
        ref.REFERENCE, dy.double(), x64, out.mean.double(), out.invstd.double(), gamma.double(),
        axis, relu_mask=want_out.relu_mask, residual_grad=True,
    )  # fmt: skip
    clear = want_out.y.abs() > 1e-2 * (y_scale + 3)  # where both agree on the ReLU
    _check(grads.dx * clear, want_grads.dx * clear, tol * 4, "backward_train dx", dx_scale)
    _check(grads.dresidual * clear, want_grads.dresidual * clear, 0.0, "backward_train dres", 1)

    # Deterministic: the same call twice gives the same bits.
    again = stages.batch_stats(x, axis)
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.var, stats.var), "repeat"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_every_stage_matches_the_reference(backend, case, dtype):
    x, _ = _make(case, dtype, device=_device(backend))
    stages = _stages(backend, x)
    check_contract(stages, case, dtype, device=_device(backend))


def test_the_contract_rejects_a_wrong_backend(monkeypatch):
    _registered(monkeypatch, "mutant", MutantBackend)
    x, _ = _make("nc", torch.float64)
    with pytest.raises(AssertionError, match="batch_stats var"):
        check_contract(get_backend("mutant", x), "nc", torch.float64)


def test_empty_and_inf_channels(backend):
    x = torch.randn(4, 3, 5)
    stages = _stages(backend, x)
    x[:, 1, 0] = float("inf")
    stats = stages.batch_stats(x, 1)
    want = ref.batch_stats(x.double(), 1)
    assert torch.equal(stats.mean.isinf(), want.mean.isinf())
    assert torch.equal(stats.mean.isnan(), want.mean.isnan())
    finite = want.mean.isfinite()
    _check(stats.mean[finite], want.mean[finite], 2e-5, "finite channels")
    empty = torch.zeros(0, 3, 5)
    y, _ = stages.elemt(empty, torch.zeros(3), torch.ones(3), None, None, 1)
    assert y.shape == empty.shape
    sums = stages.backward_reduce(empty, empty, torch.zeros(3), torch.ones(3), 1)
    assert all(torch.equal(s, torch.zeros(3)) for s in sums)


def test_compositions_validate_before_any_stage_runs(backend, monkeypatch):
    """A bad call through the public compositions names the bad value and runs no stage."""
    x = torch.randn(4, 3, 5)
    stages = _stages(backend, x)
    calls = []
    for name in ("batch_stats", "elemt", "forward_infer", "backward_reduce"):
        original = getattr(stages, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(stages, name, spy, raising=False)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ref.batch_norm_train(x, torch.ones(4), backend=stages)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.batch_norm_train(x[:1, :, :1], backend=stages)
    with pytest.raises(ValueError, match="running_mean"):
        ref.batch_norm_infer(x, None, torch.ones(3), backend=stages)
    assert calls == []
    y, saved = ref.batch_norm_train(x, backend=stages)
    assert saved.backend is stages
    with pytest.raises(ValueError, match="shape"):
        ref.backward(torch.ones(4, 3, 6), saved)


def _masked_stages(name, x):
    stages = _stages(name, x)
    if not has_masked_stages(stages):
        pytest.skip(
            f"backend {name!r} has no masked stages (supports_mask): the torch layers gather "
            "the real positions for it (compaction)"
        )
    return stages


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_masked_stages_match_the_reference(backend, case, dtype):
    """Random masks, one real position, a fully padded sequence; NaN in the padding."""
    x, _ = make_masked(case, dtype)
    stages = _masked_stages(backend, x)
    for kind in MASK_KINDS:
        check_masked_contract(stages, case, dtype, kind)


@pytest.mark.parametrize("pad", PADDING, ids=str)
def test_masked_padding_content_and_length_change_nothing(backend, pad):
    x, mask = make_masked("ncl", torch.float32, pad=pad)
    stages = _masked_stages(backend, x)
    check_masked_contract(stages, "ncl", torch.float32, pad=pad)
    longer = torch.cat([x, torch.full((4, 3, 5), pad)], 2)
    longer_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    a, b = stages.batch_stats(x, 1, mask=mask), stages.batch_stats(longer, 1, mask=longer_mask)
    assert a.count == b.count
    _check(b.mean, a.mean, 1e-6, "mean with longer padding", a.mean.abs().max().item() + 1)
    _check(b.var, a.var, 1e-6, "var with longer padding")
    invstd = ref.inverse_std(a.var, EPS)
    y, _ = stages.elemt(x, a.mean, invstd, None, None, 1, mask=mask)
    y_longer, _ = stages.elemt(longer, a.mean, invstd, None, None, 1, mask=longer_mask)
    assert torch.equal(y_longer[..., :9], y), "elemt(mask) with longer padding"
    assert torch.equal(y_longer[..., 9:], torch.zeros_like(y_longer[..., 9:]))


def test_all_positions_padded(backend):
    """No real position: NaN statistics (the mean of nothing, as the reference), zero sums,
    zero outputs and gradients."""
    x, mask = make_masked("ncl", torch.float32)
    stages = _masked_stages(backend, x)
    none = torch.zeros_like(mask)
    stats = stages.batch_stats(x, 1, mask=none)
    assert int(stats.count) == 0 and stats.mean.isnan().all() and stats.var.isnan().all()
    mean, invstd = torch.zeros(3), torch.ones(3)
    y, _ = stages.elemt(x, mean, invstd, None, None, 1, mask=none)
    assert torch.equal(y, torch.zeros_like(y))
    sums = stages.backward_reduce(x, x, mean, invstd, 1, mask=none)
    assert all(torch.equal(s, torch.zeros(3)) for s in sums)
    dx = stages.backward_elemt(x, x, mean, invstd, None, *sums, 0, 1, mask=none,
                               through_mean=False, through_var=False)  # fmt: skip
    assert torch.equal(dx, torch.zeros_like(dx))


class MaskBlindBackend(ToyBackend):
    """Claims the mask option and ignores the mask: the masked contract must reject it."""

    name = "mask_blind"
    supports_mask = True

    def batch_stats(self, x, axis, *, mask=None):
        return super().batch_stats(x, axis)


def test_the_masked_contract_rejects_a_backend_that_ignores_the_mask(monkeypatch):
    _registered(monkeypatch, "mask_blind", MaskBlindBackend)
    x, _ = make_masked("ncl", torch.float64)
    with pytest.raises(AssertionError, match=r"batch_stats\(mask\)"):
        check_masked_contract(get_backend("mask_blind", x), "ncl", torch.float64, pad=1e30)


def test_a_backend_without_the_mask_option_is_detected_and_gathered_for(monkeypatch):
    """The toy backend has no ``mask=``: detectable, refused by the reference's compositions
    with its name, and the torch layers run it by compaction, with the masked result."""
    import batchnorm.torch as bt

    _registered(monkeypatch, "toy", ToyBackend)
    x, mask = make_masked("ncl", torch.float64)
    toy = get_backend("toy", x)
    assert not has_masked_stages(toy) and has_masked_stages(ref.REFERENCE)
    with pytest.raises(TypeError, match="mask"):
        toy.batch_stats(x, 1, mask=mask)
    with pytest.raises(ValueError, match="'toy' has no masked stages"):
        ref.batch_norm_train(x, mask=mask, backend=toy)
    assert bt.explain_backend(x, "toy", mask=mask).endswith(
        "masked: compaction (real positions gathered, plain stages, scattered back)"
    )
    y = bt.BatchNorm1d(3, backend="toy").double()(x, mask=mask)
    want = ref.compose_forward_train(ref.REFERENCE, x.movedim(1, -1)[mask], None, None, EPS, 1)
    torch.testing.assert_close(y.movedim(1, -1)[mask], want.y, rtol=0, atol=1e-12)
