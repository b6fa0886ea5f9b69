"""The masked stages' contract (``mask=`` of batch_stats, elemt, backward_reduce,
backward_elemt), checked for one backend on one case by :func:`check_masked_contract`.

Two oracles, both float64: the reference's masked math (``reference.masked``) on the same
padded tensor, and the reference's plain batch norm of the real positions gathered into a
dense (m, C) batch (what masked batch norm is defined to be). The padding holds NaN, inf or
1e30, which must reach no statistic, no output at a real position and no gradient; outputs and
gradients at padded positions must be exactly 0.
"""

from __future__ import annotations

import torch

from batchnorm import reference as ref
from batchnorm.reference import masked as masked_math

EPS = 1e-5
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
STATS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

#: id -> (logical shape, layout, offset): the channel axis is 1, the mask x's shape without it.
MASKED_CASES = {
    "ncl": ((4, 3, 9), "contiguous", 0.5),
    "ncl_long_rows": ((3, 2, 130), "contiguous", 0.5),
    "nlc": ((5, 4, 7), "sequence", 0.5),  # (N, L, C) memory seen as (N, C, L)
    "nc": ((24, 3), "contiguous", 0.5),
    "nchw": ((3, 2, 4, 5), "contiguous", 0.5),
    "permuted": ((4, 3, 6), "permuted", 0.5),  # dense, the batch axis innermost in memory
    "large_offset": ((6, 3, 16), "contiguous", 1e4),
}
#: What the mask leaves real: random, one position only, one whole sequence padded.
MASK_KINDS = ("random", "one_real", "padded_sequence")
PADDING = (float("nan"), float("inf"), 1e30)


def make_masked(case, dtype, kind="random", seed=0, pad=float("nan")):
    """``(x, mask)``: x of the case's shape, layout and dtype, holding ``pad`` where the mask
    is False."""
    shape, layout, offset = MASKED_CASES[case]
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    scales = torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64)
    values = values * scales.view(1, -1, *[1] * (len(shape) - 2)) + offset
    mask_shape = (shape[0], *shape[2:])
    mask = torch.rand(mask_shape, generator=g) < 0.6
    flat = mask.view(-1)
    if kind == "one_real":
        flat.zero_()
        flat[flat.numel() // 2] = True
    else:
        flat[:2] = True  # at least two real values
    if kind == "padded_sequence":
        mask[1] = False
    real = mask.unsqueeze(1)
    x = torch.where(real, values.to(dtype), torch.tensor(pad, dtype=torch.float64).to(dtype))
    if layout == "sequence":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "permuted":
        x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return x, mask


def _close(got, want, tol, name, scale=None, where=None):
    got, want = got.detach().double(), want.detach().double()
    if where is not None:
        got, want = got.movedim(1, -1)[where], want.movedim(1, -1)[where]
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if scale is None else scale
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


def _zero_at_padding(t, mask, name):
    padded = t.detach().movedim(1, -1)[~mask]
    assert torch.equal(padded, torch.zeros_like(padded)), f"{name}: not 0 at padded positions"


def check_masked_contract(stages, case, dtype, kind="random", pad=float("nan")):
    """Every masked stage of ``stages`` against the float64 oracles on one case; raises
    AssertionError naming the stage that disagrees."""
    x, mask = make_masked(case, dtype, kind, pad=pad)
    x64 = x.double()
    channels = x.shape[1]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    tol, stol = TOL[dtype], STATS_TOL[dtype]
    g = torch.Generator().manual_seed(1)
    gamma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(cdt)
    beta = torch.randn(channels, generator=g, dtype=torch.float64).to(cdt)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.where(mask.unsqueeze(1), dy, torch.tensor(pad, dtype=dtype))  # padding in dy too
    m = int(mask.sum())

    stats = stages.batch_stats(x, 1, mask=mask)
    want = masked_math.masked_batch_stats(x64, mask, 1)
    assert int(stats.count) == m, f"batch_stats(mask): count {stats.count} != {m}"
    assert stats.mean.dtype == cdt and stats.var.dtype == cdt, "batch_stats(mask): dtype"
    spread = want.var.max().item() ** 0.5
    mean_scale = want.mean.abs().max().item() + spread
    _close(stats.mean, want.mean, stol, "batch_stats(mask) mean", mean_scale)
    # One real value: var is 0, and the scale is the rounding of x's square, not 0.
    var_scale = max(spread**2, 1e-12 * mean_scale**2)
    _close(stats.var, want.var, stol, "batch_stats(mask) var", var_scale)
    # The definition: batch norm's statistics of the real positions alone.
    real64 = x64.movedim(1, -1)[mask]  # (m, C)
    plain = ref.batch_stats(real64, 1)
    _close(stats.mean, plain.mean, stol, "batch_stats(mask) vs real positions", mean_scale)

    mean, invstd = want.mean.to(cdt), ref.inverse_std(want.var, EPS).to(cdt)
    mean64, invstd64 = mean.double(), invstd.double()
    y_scale = (gamma.double().abs() * 3 + beta.double().abs()).max().item()
    y, relu_mask = stages.elemt(x, mean, invstd, gamma, beta, 1, mask=mask)
    assert relu_mask is None and y.dtype == x.dtype and y.shape == x.shape, "elemt(mask): out"
    if MASKED_CASES[case][1] == "sequence":  # channels last stays channels last
        assert y.stride() == x.stride(), f"elemt(mask): layout {y.stride()} != {x.stride()}"
    want_y = masked_math.masked_elemt(x64, mask, mean64, invstd64, gamma.double(),
                                      beta.double(), 1)  # fmt: skip
    _close(y, want_y, tol, "elemt(mask)", y_scale, where=mask)
    _zero_at_padding(y, mask, "elemt(mask)")

    sums = stages.backward_reduce(dy, x, mean, invstd, 1, mask=mask)
    want_sums = masked_math.masked_backward_reduce(dy.double(), x64, mask, mean64, invstd64, 1)
    for got_s, want_s, name in zip(sums, want_sums, ("sum_dy", "sum_dy_xhat"), strict=True):
        assert got_s.dtype == cdt, f"backward_reduce(mask): {name} dtype {got_s.dtype}"
        _close(got_s, want_s, stol * 10, f"backward_reduce(mask) {name}", m**0.5 * 3)
    sums64 = [s.double() for s in want_sums]
    dx_scale = (gamma.double() * invstd64).max().item() * 4
    for through_mean, through_var in [(True, True), (False, True), (True, False), (False, False)]:
        dx = stages.backward_elemt(
            dy, x, mean, invstd, gamma, *[s.to(cdt) for s in sums64], m, 1,
            through_mean=through_mean, through_var=through_var, mask=mask,
        )  # fmt: skip
        want_dx = masked_math.masked_backward_elemt(
            dy.double(), x64, mask, mean64, invstd64, gamma.double(), *sums64, m, 1,
            through_mean=through_mean, through_var=through_var,
        )  # fmt: skip
        name = f"backward_elemt(mask, {through_mean=}, {through_var=})"
        _close(dx, want_dx, tol, name, dx_scale, where=mask)
        _zero_at_padding(dx, mask, name)

    if m < 2:
        return
    # The compositions, against plain batch norm of the real positions (the definition).
    out = ref.forward_train(stages, x, gamma, beta, EPS, 1, mask=mask)
    _close(out.mean, plain.mean, stol, "forward_train(mask) mean", mean_scale)
    _close(out.var, plain.var, stol, "forward_train(mask) var", var_scale)
    # y from those statistics (rounded to the compute dtype: at an offset of 1e4 a float32
    # mean is itself off by up to 5e-4, which no output can undo).
    want_y = ref.elemt(real64, out.mean.double(), out.invstd.double(), gamma.double(),
                       beta.double(), 1)  # fmt: skip
    _close(out.y.movedim(1, -1)[mask], want_y, tol * 4, "forward_train(mask) y", y_scale)
    _zero_at_padding(out.y, mask, "forward_train(mask) y")
    grads = ref.backward_train(stages, dy, x, out.mean, out.invstd, gamma, 1, mask=mask, count=m)
    want_grads = ref.compose_backward_train(
        ref.REFERENCE, dy.double().movedim(1, -1)[mask], real64, out.mean.double(),
        out.invstd.double(), gamma.double(), 1,
    )  # fmt: skip
    _close(grads.dx.movedim(1, -1)[mask], want_grads.dx, tol * 4, "backward_train(mask) dx",
           dx_scale)  # fmt: skip
    _zero_at_padding(grads.dx, mask, "backward_train(mask) dx")
    _close(grads.dgamma, want_grads.dgamma, stol * 10, "backward_train(mask) dgamma", m**0.5 * 3)
    _close(grads.dbeta, want_grads.dbeta, stol * 10, "backward_train(mask) dbeta", m**0.5 * 3)
    # Deterministic: the same call twice gives the same bits.
    again = stages.batch_stats(x, 1, mask=mask)
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.var, stats.var), "repeat"
