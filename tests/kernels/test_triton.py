"""The Triton kernels against the float64 reference and PyTorch, on small shapes.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1`` must
be set before triton is first imported (``scripts/test.sh`` exports it; this module sets it when
no GPU is present). Tiny tiles (``tuning(tile_elems=32, programs=8)``) make the small shapes take
the paths large tensors take on a GPU: several tiles per split, several splits per channel, the
fixed-order combine, masked tile edges and channel tails.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import batchnorm  # noqa: E402
from batchnorm import reference as ref  # noqa: E402
from batchnorm.kernels import (  # noqa: E402
    BackendUnavailable,
    get_backend,
)
from batchnorm.kernels import triton_gpu as tg  # noqa: E402

if not tg.is_interpreter() and not torch.cuda.is_available():
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set and there is no GPU; run with "
        "TRITON_INTERPRET=1 (scripts/test.sh does)",
        allow_module_level=True,
    )

DEVICE = "cpu" if tg.is_interpreter() else "cuda"
EPS = 1e-5
SMALL_TILES = {"tile_elems": 32, "programs": 8}

#: Output tolerances: float32 arithmetic, then rounding to the output dtype (half an ulp is
#: 2^-11 relative for float16, 2^-8 for bfloat16).
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}
#: float32 statistics and sums of the (exactly representable) low-precision inputs.
STATS_TOL = {"rtol": 1e-5, "atol": 1e-5}
DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.float16, id="f16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last)


def _channels_last_3d(x: torch.Tensor) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last_3d)


def _strided(x: torch.Tensor) -> torch.Tensor:
    return x[..., ::2]  # not dense: the launchers copy it


#: name -> (shape, channel axis, make layout). Shapes are chosen so that SMALL_TILES gives
#: several tiles per channel and several splits (see test_small_tiles_split_channels).
LAYOUTS = {
    "nchw": ((5, 3, 7, 6), 1, _contiguous),
    "channels_last": ((5, 3, 7, 6), 1, _channels_last),
    "ncl_inner5": ((20, 3, 5), 1, _contiguous),  # inner < 8: the mask packs along N
    "nc": ((21, 5), 1, _contiguous),
    "ncdhw": ((3, 2, 3, 4, 5), 1, _contiguous),
    "channels_last_3d": ((3, 2, 3, 4, 5), 1, _channels_last_3d),
    "axis_last": ((4, 3, 2, 6), 3, _contiguous),  # (N, ..., C) with axis=-1
    "strided": ((5, 3, 7, 12), 1, _strided),
}
AXIS1_LAYOUTS = [name for name, (_, axis, _) in LAYOUTS.items() if axis == 1]


def _input(layout: str, dtype: torch.dtype, seed: int = 0, scale: float = 2.0, shift: float = 1.5):
    shape, axis, make = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
    return make(x.to(dtype).to(DEVICE)), axis


def _like(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(DEVICE)
    out = torch.empty_like(x)
    out.copy_(values)
    return out


def _params(channels: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=g) + 0.5
    bias = torch.randn(channels, generator=g) * 0.5
    return weight.to(DEVICE), bias.to(DEVICE)


def _f64(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to("cpu", torch.float64) for t in tensors]


def _close(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(actual.detach().cpu().double(), expected.double(), **tol)


def _memory_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` as the kernels see it: (outer, C, inner) in memory order (independent of them)."""
    if t.is_contiguous():
        return t.reshape(math.prod(t.shape[:axis]), t.shape[axis], -1)
    return t.movedim(axis, -1).reshape(-1, t.shape[axis], 1)


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize(
    "outer, channels, inner",
    [
        (256, 64, 3136),  # ResNet (256, 64, 56, 56)
        (256, 2048, 49),  # (256, 2048, 7, 7)
        (64, 32, 16384),  # (64, 32, 128, 128)
        (20, 6, 65536),  # few channels
        (256 * 3136, 64, 1),  # the same, channels-last
        (20 * 65536, 6, 1),
        (7, 3, 5),
        (1, 1, 1),
        (2**20, 3, 2**12),  # 2^33 elements: 64-bit offsets
    ],
)
def test_plan_invariants(outer, channels, inner):
    plan = tg.make_plan(outer, channels, inner, tile_elems=2048, programs=132 * 8)
    for block in (plan.block_o, plan.block_c, plan.block_i):
        assert block & (block - 1) == 0
    assert plan.block_o * plan.block_c * plan.block_i <= 2048
    if plan.pack_i:
        assert plan.block_i % 8 == 0
    else:
        assert plan.block_o % 8 == 0
    # Every tile belongs to exactly one split and no split is empty.
    assert plan.splits * plan.tiles_per_split >= plan.tiles
    assert (plan.splits - 1) * plan.tiles_per_split < plan.tiles
    assert plan.splits <= 65535
    assert math.ceil(plan.tiles / plan.elemt_tiles_per_program) <= 65535
    assert plan.index_64 == (outer * channels * inner > 2**31 - 1)
    if inner == 1:  # channels-last: contiguous along channels
        assert plan.block_i == 1 and plan.block_c > 1 or channels == 1
    else:
        assert plan.block_c == 1


def test_plan_spreads_few_channels_over_many_programs():
    # The point of the 2-D grid: 6 channels still fill a GPU with reduction programs.
    plan = tg.make_plan(20, 6, 65536, tile_elems=2048, programs=1056)
    assert plan.channel_blocks * plan.splits >= 900
    plan = tg.make_plan(256, 2048, 49, tile_elems=2048, programs=1056)
    assert plan.splits == 1  # enough channels already: no partials to combine


@pytest.mark.parametrize("inner, block", [(49, 64), (196, 32), (3136, 512), (16384, 1024), (5, 8)])
def test_block_i_limits_padding(inner, block):
    assert tg.plan._pick_block_i(inner, 1024) == block


def test_small_tiles_split_channels():
    """The test shapes really exercise multi-tile splits and multi-split combines."""
    with tg.tuning(**SMALL_TILES):
        for layout in ("nchw", "channels_last", "ncdhw", "channels_last_3d"):
            x, axis = _input(layout, torch.float32)
            plan = tg.layout._view(x, axis).plan
            assert plan.splits > 1 and plan.tiles_per_split > 1, (layout, plan)
        x, axis = _input("axis_last", torch.float32)
        assert tg.layout._view(x, axis).plan.channel_blocks > 1


def test_plans_are_made_once_per_shape_and_tuning():
    """A layer's every call asks for the plan of its shape: the same object comes back, and a
    ``tuning`` block (part of the key) gets its own."""
    from batchnorm.kernels.triton_gpu import plan as plans

    device = torch.device(DEVICE)
    first = plans._plan_for(16, 64, 64, device)
    assert plans._plan_for(16, 64, 64, device) is first
    with tg.tuning(**SMALL_TILES):
        small = plans._plan_for(16, 64, 64, device)
    assert small is not first and small.block_i * small.block_o <= SMALL_TILES["tile_elems"]
    assert plans._plan_for(16, 64, 64, device) is first


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="power of two"):
        tg.make_plan(4, 4, 4, tile_elems=48)
    with pytest.raises(ValueError, match="programs"):
        tg.make_plan(4, 4, 4, programs=0)


# ----------------------------------------------------------------------------- training stages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_stages_match_reference(layout, dtype):
    x, axis = _input(layout, dtype)
    dy = _like(x, seed=2)
    weight, bias = _params(x.shape[axis])
    x64, dy64, w64, b64 = _f64(x, dy, weight, bias)
    with tg.tuning(**SMALL_TILES):
        y, mean, var, invstd, mask = tg.forward_train(x, weight, bias, EPS, axis)
        sum_dy, sum_dy_xhat = tg.backward_reduce(dy, x, mean, invstd, axis)
        count = x.numel() // x.shape[axis]
        dx, _ = tg.backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, axis)
    assert mask is None
    assert y.dtype == dx.dtype == dtype
    for v in (mean, var, invstd, sum_dy, sum_dy_xhat):
        assert v.dtype == torch.float32 and v.shape == (x.shape[axis],)
    if x.is_contiguous() or x.movedim(axis, -1).is_contiguous():  # dense: layout kept
        assert y.stride() == x.stride() and dx.stride() == x.stride()

    # Forward, end to end, against the float64 reference.
    y_ref, saved = ref.batch_norm_train(x64, w64, b64, axis=axis, eps=EPS)
    _close(mean, saved.mean, **STATS_TOL)
    _close(var, saved.var, **STATS_TOL)
    _close(invstd, saved.invstd, **STATS_TOL)
    _close(y, y_ref, **TOL[dtype])
    # Each backward stage against the reference stage fed the same inputs.
    mean64, invstd64 = _f64(mean, invstd)
    sums_ref = ref.backward_reduce(dy64, x64, mean64, invstd64, axis)
    _close(sum_dy, sums_ref[0], **STATS_TOL)
    _close(sum_dy_xhat, sums_ref[1], **STATS_TOL)
    sum_dy64, sum_dy_xhat64 = _f64(sum_dy, sum_dy_xhat)
    dx_ref = ref.backward_elemt(
        dy64, x64, mean64, invstd64, w64, sum_dy64, sum_dy_xhat64, count, axis
    )
    _close(dx, dx_ref, **TOL[dtype])
    # And the whole backward against the reference's.
    _close(dx, ref.backward(dy64, saved).dx, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "ncl_inner5"])
def test_forward_infer_matches_reference(layout, dtype):
    x, axis = _input(layout, dtype)
    weight, bias = _params(x.shape[axis])
    running_mean, running_var = _params(x.shape[axis], seed=5)
    running_var = running_var.abs() + 0.5
    if dtype != torch.float32:  # running statistics kept in the module's (low) dtype
        running_mean, running_var = running_mean.to(dtype), running_var.to(dtype)
    with tg.tuning(**SMALL_TILES):
        y, mask = tg.forward_infer(x, running_mean, running_var, weight, bias, EPS, axis)
    assert mask is None and y.dtype == dtype
    x64, w64, b64, rm64, rv64 = _f64(x, weight, bias, running_mean, running_var)
    _close(y, ref.batch_norm_infer(x64, rm64, rv64, w64, b64, axis=axis, eps=EPS), **TOL[dtype])


@pytest.mark.parametrize(
    "through_mean, through_var", [(False, True), (True, False), (False, False)]
)
def test_moments_as_constants_switches(through_mean, through_var):
    x, axis = _input("channels_last", torch.float32)
    dy = _like(x, seed=6)
    weight, _ = _params(x.shape[axis])
    with tg.tuning(**SMALL_TILES):
        _, mean, _, invstd, _ = tg.forward_train(x, weight, None, EPS, axis)
        sums = tg.backward_reduce(dy, x, mean, invstd, axis)
        count = x.numel() // x.shape[axis]
        dx, _ = tg.backward_elemt(
            dy, x, mean, invstd, weight, *sums, count, axis,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip
    args = _f64(dy, x, mean, invstd, weight, *sums)
    dx_ref = ref.backward_elemt(
        *args, count, axis, through_mean=through_mean, through_var=through_var
    )
    _close(dx, dx_ref, **TOL[torch.float32])


def test_no_affine():
    x, axis = _input("nchw", torch.float32)
    dy = _like(x, seed=7)
    with tg.tuning(**SMALL_TILES):
        y, mean, _, invstd, _ = tg.forward_train(x, None, None, EPS, axis)
        dx, dweight, dbias, _ = tg.backward_train(dy, x, mean, invstd, None, axis)
    x64, dy64 = _f64(x, dy)
    y_ref, saved = ref.batch_norm_train(x64, axis=axis, eps=EPS)
    grads = ref.backward(dy64, saved)
    _close(y, y_ref, **TOL[torch.float32])
    _close(dx, grads.dx, **TOL[torch.float32])
    _close(dweight, grads.dgamma, **STATS_TOL)
    _close(dbias, grads.dbeta, **STATS_TOL)


def test_gradient_in_another_layout_is_accepted():
    x, axis = _input("channels_last", torch.float32)
    dy = _like(x, seed=8).contiguous()  # NCHW gradient for an NHWC input
    assert not dy.is_contiguous(memory_format=torch.channels_last)
    weight, _ = _params(x.shape[axis])
    _, mean, _, invstd, _ = tg.forward_train(x, weight, None, EPS, axis)
    dx = tg.backward_train(dy, x, mean, invstd, weight, axis)[0]
    dx_same = tg.backward_train(
        dy.to(memory_format=torch.channels_last), x, mean, invstd, weight, axis
    )[0]
    assert torch.equal(dx, dx_same)


def test_large_mean_small_variance():
    """x = 1e4 + N(0, 1) in float32: the centred moments keep the variance; E[x^2] - E[x]^2
    (shown here to fail) would lose all of it."""
    g = torch.Generator().manual_seed(9)
    x = (1e4 + torch.randn(64, 3, 8, 8, generator=g)).to(DEVICE)
    with tg.tuning(tile_elems=256, programs=8):  # 16 tiles of 256 per channel, 3 splits
        _, mean, var, _, _ = tg.forward_train(x, None, None, EPS, 1)
    saved = ref.batch_norm_train(*_f64(x), axis=1, eps=EPS)[1]
    _close(var, saved.var, rtol=1e-4, atol=0)
    _close(mean, saved.mean, rtol=1e-7, atol=0)
    xc = x.cpu()
    one_pass = (xc * xc).mean(dim=(0, 2, 3)) - xc.mean(dim=(0, 2, 3)) ** 2
    assert ((one_pass.double() - saved.var).abs() / saved.var).max() > 0.1


def test_empty_batch():
    x = torch.empty(0, 3, 4, device=DEVICE)
    y, mean, var, invstd, _ = tg.forward_train(x, None, None, EPS, 1)
    assert y.shape == x.shape
    assert torch.isnan(mean).all() and torch.isnan(var).all()
    dx, dweight, dbias, _ = tg.backward_train(x, x, mean, invstd, None, 1)
    assert dx.shape == x.shape and (dweight == 0).all() and (dbias == 0).all()
    y, _, _, _, _ = tg.forward_train(torch.empty(4, 0, device=DEVICE), None, None, EPS, 1)
    assert y.shape == (4, 0)


@pytest.mark.parametrize(
    "shape, layout",
    [((4096, 2), _contiguous), ((64, 2, 8, 8), _channels_last), ((8, 2, 16, 32), _contiguous)],
    ids=["nc", "channels_last", "nchw"],
)
@pytest.mark.parametrize(
    "first, spread",
    [(None, 1.0), (-1e4, 1.0), (None, 0.01)],
    ids=["plain", "outlier_first_value", "tiny_spread"],
)
def test_large_mean_with_default_tiles(shape, layout, first, spread):
    """x = 1e4 + N(0, 1) with the default 2048-value tiles: a plain float32 tile sum is off by
    several ulps of 1e4, which spoils the mean and, through the merge, the variance. The tiles
    are shifted by the channel's first value, so both stay close to float64. With that value
    an outlier (-1e4) the shifted sums are about 2e4 and round coarsely; the corrected second
    pass brings the mean back to within three ulps of 1e4 and keeps the variance. With a spread
    of 0.01 the tile mean's rounding (half an ulp of 1e4, 5e-4) is a twentieth of the spread:
    the sum(e)^2 / n_t term takes it out of the variance."""
    g = torch.Generator().manual_seed(12)
    values = 1e4 + spread * torch.randn(shape, generator=g)
    if first is not None:
        values[0] = first  # the first row holds every channel's first value (any layout)
    x = layout(values.to(DEVICE))
    _, mean, var, _, _ = tg.forward_train(x, None, None, EPS, 1)
    saved = ref.batch_norm_train(*_f64(x), axis=1, eps=EPS)[1]
    _close(mean, saved.mean, rtol=1e-7 if first is None else 3e-7, atol=0)
    _close(var, saved.var, rtol=1e-5, atol=0)


# The interpreter evaluates with NumPy, which warns about the inf and NaN it computes.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["default", "small_tiles"])
def test_extreme_values_as_the_reference(tiles):
    """A constant channel near the float32 maximum has mean 3e38 and variance 0 (no overflow in
    the sums or the merge); a channel holding inf has mean inf, one holding both infinities or a
    NaN has mean NaN; a channel whose shift is 0 (its first value) and whose other values are
    3e38 has the reference's finite mean (the tile sums are of x / n_t); an ordinary channel
    is unaffected."""
    x = torch.randn(40, 5, 3, generator=torch.Generator().manual_seed(3))
    x[:, 0] = 3e38
    x[:, 1] = -3e38
    x[7, 2, 1] = math.inf
    x[3, 3, 0], x[9, 3, 2] = math.inf, -math.inf
    x[5, 4, 1] = math.nan
    x = torch.cat([x, x[:, :1]], 1)
    x[:, 5] = 3e38
    x[0, 5, 0] = 0.0  # the shift is 0: a plain sum of the rest would overflow
    with tg.tuning(**(tiles or {})):
        y, mean, var, _, _ = tg.forward_train(x.to(DEVICE), None, None, EPS, 1)
        plain = torch.randn(40, 1, 3, generator=torch.Generator().manual_seed(4))
        ordinary = tg.forward_train(plain.to(DEVICE), None, None, EPS, 1)[1]
    assert mean[0].item() == pytest.approx(3e38) and mean[1].item() == pytest.approx(-3e38)
    assert var[0].item() == 0.0 and var[1].item() == 0.0
    assert (y[:, :2] == 0).all()
    assert mean[2].item() == math.inf
    assert math.isnan(mean[3].item()) and math.isnan(mean[4].item())
    want = ref.batch_stats(x[:, 5:].numpy(), 1)  # float32: mean 2.9e38, variance overflows
    assert mean[5].item() == pytest.approx(float(want.mean[0]), rel=1e-6)
    assert not math.isfinite(var[5].item()) and not math.isfinite(float(want.var[0]))
    expected = ref.batch_stats(plain.double().numpy(), axis=1)
    _close(ordinary, torch.from_numpy(expected.mean), **STATS_TOL)


def test_channel_vectors_of_any_strides():
    """The kernels read per-channel vectors as ``ptr + c``: sliced or expanded weight, bias,
    running statistics, mean and invstd must give what their dense copies give."""
    x, axis = _input("nchw", torch.float32)
    c = x.shape[axis]
    base = torch.linspace(0.5, 1.5, 2 * c, device=x.device)
    dense_w, dense_b = base[::2].clone(), (base[1::2] - 1).clone()
    sliced_w, sliced_b = base[::2], base[1::2] - 1
    sliced_b = (torch.stack([sliced_b, sliced_b], 1).reshape(-1))[::2]
    assert not sliced_w.is_contiguous() and not sliced_b.is_contiguous()
    expanded = torch.tensor([1.25], device=x.device).expand(c)
    y, mean, _, invstd, _ = tg.forward_train(x, dense_w, dense_b, EPS, axis)
    assert torch.equal(tg.forward_train(x, sliced_w, sliced_b, EPS, axis)[0], y)
    assert torch.equal(
        tg.forward_train(x, expanded, None, EPS, axis)[0],
        tg.forward_train(x, expanded.contiguous(), None, EPS, axis)[0],
    )
    rm = torch.stack([mean, mean], 1).reshape(-1)[::2]
    rv = torch.stack([1 / invstd**2, 1 / invstd**2], 1).reshape(-1)[::2]
    assert torch.equal(
        tg.forward_infer(x, rm, rv, sliced_w, sliced_b, 0.0, axis)[0],
        tg.forward_infer(x, rm.contiguous(), rv.contiguous(), dense_w, dense_b, 0.0, axis)[0],
    )
    dy = _like(x, 4)
    strided = lambda v: torch.stack([v, v], 1).reshape(-1)[::2]  # noqa: E731
    dense = tg.backward_train(dy, x, mean, invstd, dense_w, axis)
    other = tg.backward_train(dy, x, strided(mean), strided(invstd), sliced_w, axis)
    for a, b in zip(dense[:3], other[:3], strict=True):
        assert torch.equal(a, b)
    dx = tg.backward_elemt(
        dy, x, strided(mean), strided(invstd), sliced_w, strided(dense[2]), strided(dense[1]),
        x.numel() // c, axis,
    )[0]  # fmt: skip
    assert torch.equal(dx, dense[0])
    # And through the torch layer: the result of the reference backend.
    import batchnorm.torch as bt

    for w, b in [(sliced_w, sliced_b), (expanded, expanded)]:
        _close(
            bt.batch_norm(x, None, None, w, b, True, backend="triton"),
            bt.batch_norm(x, None, None, w, b, True, backend="reference"),
            **TOL[torch.float32],
        )


def test_negative_axis_is_the_last():
    x = _input("axis_last", torch.float32)[0]
    weight, bias = _params(x.shape[-1])
    for last in (-1, x.ndim - 1):
        assert torch.equal(
            tg.forward_train(x, weight, bias, EPS, last)[0],
            tg.forward_train(x, weight, bias, EPS, x.ndim - 1)[0],
        )
    assert tg.batch_stats(x, -1)[0] == x.numel() // x.shape[-1]


def test_launchers_check_shapes_before_running():
    """The plain launchers are public too: a wrong-sized dy, vector or mask would be read past
    its end (or broadcast by ``copy_``), so each is refused with its name and shapes."""
    x, axis = _input("nchw", torch.float32)
    c = x.shape[axis]
    _, mean, _, invstd, mask = tg.forward_train(x, None, None, EPS, axis, relu=True)
    dy = _like(x, 2)
    bad = {
        "dy has shape (5, 3, 7, 1)": lambda: tg.backward_reduce(dy[..., :1], x, mean, invstd, 1),
        "dy has shape (2, 3, 7, 6)": lambda: tg.backward_train(dy[:2], x, mean, invstd, None, 1),
        "running_mean must have shape (3,)": lambda: tg.forward_infer(
            x, torch.zeros(c - 1), torch.ones(c), None, None, EPS, axis
        ),
        "running_var must have shape (3,)": lambda: tg.forward_infer(
            x, torch.zeros(c), torch.ones(c, 1), None, None, EPS, axis
        ),
        "weight must have shape (3,)": lambda: tg.forward_train(
            x, torch.ones(c + 1), None, EPS, axis
        ),
        "bias must be a floating-point": lambda: tg.elemt(
            x, mean, invstd, None, torch.zeros(c, dtype=torch.int64), axis
        ),
        "invstd must have shape (3,)": lambda: tg.backward_reduce(dy, x, mean, invstd[:2], 1),
        "sum_dy must have shape (3,)": lambda: tg.backward_elemt(
            dy, x, mean, invstd, None, torch.zeros(2), torch.zeros(c), 10, axis
        ),
        "mask must be the packed uint8": lambda: tg.backward_train(
            dy, x, mean, invstd, None, axis, mask=mask[:-1]
        ),
        "residual has shape": lambda: tg.forward_train(x, None, None, EPS, axis, residual=x[:1]),
        "axis 4 is out of range": lambda: tg.forward_train(x, None, None, EPS, 4),
        "axis -5 is out of range": lambda: tg.batch_stats(x, -5),
    }
    for message, call in bad.items():
        # The vectors made in the calls on the input's device: else the device check, which
        # comes first, would answer instead of the shape check under test.
        with (
            torch.device(x.device),
            pytest.raises((ValueError, TypeError), match=re.escape(message)),
        ):
            call()


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bitwise_deterministic(layout):
    x, axis = _input(layout, torch.bfloat16)
    dy, residual = _like(x, seed=10), _like(x, seed=11)
    weight, bias = _params(x.shape[axis])

    def run():
        y, mean, var, invstd, mask = tg.forward_train(
            x, weight, bias, EPS, axis, residual=residual, relu=True
        )
        grads = tg.backward_train(dy, x, mean, invstd, weight, axis, mask=mask, residual_grad=True)
        return (y, mean, var, invstd, mask, *grads)

    with tg.tuning(**SMALL_TILES):
        first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- running stats


@pytest.mark.parametrize("buffers", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("count", [2, 3, 1000])
def test_running_update_equals_the_reference_bit_for_bit(buffers, momentum, count):
    """One launch, ``reference.update_running_stats``'s values bit for bit in each buffer
    dtype (300 channels: two channel blocks), including the channels it keeps: a NaN batch
    mean, an infinite batch variance, variances whose unbiased estimate overflows in float32
    or only when rounded to the buffer dtype, a poisoned buffer."""
    gen = torch.Generator().manual_seed(count)
    rm = (torch.randn(300, generator=gen) * 3).to(buffers)
    rv = (torch.rand(300, generator=gen) * 2 + 0.1).to(buffers)
    mean = torch.randn(300, generator=gen) * 5 + 1e3
    var = torch.rand(300, generator=gen) * 4
    mean[1], var[2], rm[4] = float("nan"), float("inf"), float("nan")
    top = torch.finfo(buffers).max
    var[3], var[5] = (3e38, 3.39e38) if buffers == torch.float32 else (top, top * 0.9995)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.update_running_stats(rm, rv, 0, mean, var, count, momentum=momentum)
    before = rm.clone()
    rm, rv, mean, var = (t.to(DEVICE) for t in (rm, rv, mean, var))
    versions = rm._version, rv._version
    assert tg.launchers.update_running(rm, rv, mean, var, count, momentum) is True
    # Written in place as far as autograd knows, as the torch ops would be.
    assert rm._version > versions[0] and rv._version > versions[1]
    torch.testing.assert_close(rm.cpu(), want.running_mean, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rv.cpu(), want.running_var, rtol=0, atol=0)
    moved = (rm.cpu() != before)[[0, 6, 299]]
    assert moved.all() if momentum > 0 else not moved.any()


def test_running_update_refuses_what_it_does_not_take():
    """False, nothing written: the caller then runs the torch ops."""
    v = {"device": DEVICE}
    rm, rv = torch.zeros(4, **v), torch.ones(4, **v)
    mean, var = torch.ones(4, **v), torch.ones(4, **v)
    cases = [
        (rm.double(), rv.double(), mean, var, 8),  # float64 buffers
        (rm, rv, mean.double(), var, 8),  # float64 statistics
        (rm, rv, mean, var, 1),  # m = 1: no unbiased estimate
        (rm, rv, mean, var, torch.tensor(8)),  # SyncBatchNorm's count on the device
        (torch.zeros(8, **v)[::2], rv, mean, var, 8),  # not dense
        (rm, rv, torch.ones(5, **v), var, 8),  # wrong length
    ]
    for case in cases:
        before = [t.clone() for t in case[:2]]
        assert tg.launchers.update_running(*case, 0.1) is False
        assert all(torch.equal(a, b) for a, b in zip(case[:2], before, strict=True))


def test_layer_off_the_cpu_updates_with_one_launch(monkeypatch):
    """A training step of the Triton layer off the CPU writes its running statistics with the
    backend's ``update_running`` (run here as a GPU's code path would run), and they equal the
    torch ops' update bit for bit."""
    import batchnorm.torch as bt
    from batchnorm.torch import functional, native

    backend = get_backend("triton", torch.empty(1, device=DEVICE))
    calls = []
    real = type(backend).update_running

    def spy(self, *args):
        calls.append(args[4])
        return real(self, *args)

    x = torch.randn(6, 5, 3, 3, device=DEVICE) * 2 + 1
    layers = {}
    for name, one_launch in (("kernel", True), ("torch ops", False)):
        with monkeypatch.context() as patch:
            for module in (functional, native):
                patch.setattr(module, "host_read_is_cheap", lambda t: False)
            if one_launch:
                patch.setattr(type(backend), "update_running", spy)
            else:
                patch.delattr(type(backend), "update_running")
            layer = bt.BatchNorm2d(5, backend="triton").to(DEVICE)
            for _ in range(2):
                layer(x)
            layers[name] = layer
    assert calls == [6 * 3 * 3] * 2
    for buffer in ("running_mean", "running_var"):
        got, want = (getattr(layers[k], buffer) for k in ("kernel", "torch ops"))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(layers["kernel"].running_var, torch.ones(5, device=DEVICE))


# ----------------------------------------------------------------------------- availability


def test_unavailable_reasons():
    backend = tg.TritonBackend()
    assert backend.unavailable_reason(torch.zeros(2, 3, device=DEVICE)) is None
    assert "float64" in backend.unavailable_reason(torch.zeros(2, 3, dtype=torch.float64))
    assert "torch tensors" in backend.unavailable_reason(torch.zeros(2, 3).numpy())
    with pytest.raises(BackendUnavailable, match="float64"):
        get_backend("triton", torch.zeros(2, 3, dtype=torch.float64))


# ----------------------------------------------------------------------------- GPU compile


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    """Every kernel variant lowers to an sm_90 cubin with triton's own ptxas, no GPU needed:
    catches what the interpreter accepts but the compiler does not. In a fresh process, because
    the interpreter patches ``triton.language`` in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(batchnorm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm.kernels.triton_gpu.compile_check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout
    assert "_running_update_kernel: no FMA contraction" in done.stdout
