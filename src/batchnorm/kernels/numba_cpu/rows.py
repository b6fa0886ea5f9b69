"""Numba kernels on the rows view (outer, C, inner): reductions along contiguous rows.

Each (n, c) row of ``inner`` values is contiguous (NCHW, NCL, NCDHW). Work items are (range of
n, channel), numbered so that a thread sweeps a slab of memory; the inner loops run over a row
and are reductions, vectorised with ``fastmath`` reassociation (a sum in 16 SIMD lanes is *more*
accurate than a sequential one, and the centring that protects the variance is explicit
arithmetic that no flag removes). With long rows the backward is software-pipelined across
channels (``rows_backward_pipelined``); with N = 1 the fused kernels give a thread a group of
channels to reduce and then normalise while they are still in its cache. The numerical policy
is in the package docstring.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .elementwise import (
    _affine,
    _affine_run,
    _grad,
    _grad_coefficients,
    _grad_run,
    grad_coefficients,
)
from .jit import (
    _JIT,
    _REDUCE_MATH,
    _corrected,
    _finish_stats,
    _like,
    _load,
    _merge,
    _split,
    _zero,
)
from .tuning import BLOCK

# Inner loops index 1-D views from 0 (``row[i0:i1]``, then ``seg[i]``): with an offset index
# numba must allow for a negative (wrap-around) index, and that check alone stops LLVM from
# vectorising the loop (measured: 10x slower).


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_sum(x, c, n0, n1, i0, i1, centre):
    """Sum of x - centre over values i0:i1 of rows n0:n1 of channel c, in the compute dtype.
    Short rows go four at a time: one loop and one horizontal sum per four rows instead of
    per row (measured at (64, 256, 14, 14): 0.7 of a copy's time against 1.0)."""
    total = _zero(x)
    n = n0
    while n + 4 <= n1:
        a, b = x[n, c, i0:i1], x[n + 1, c, i0:i1]
        e, f = x[n + 2, c, i0:i1], x[n + 3, c, i0:i1]
        for i in range(a.shape[0]):
            total += ((_load(a[i]) - centre) + (_load(b[i]) - centre)) + (
                (_load(e[i]) - centre) + (_load(f[i]) - centre)
            )
        n += 4
    for left in range(n, n1):  # left-over rows, one at a time
        seg = x[left, c, i0:i1]
        for i in range(seg.shape[0]):
            total += _load(seg[i]) - centre
    return total


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_centred_sums(x, c, n0, n1, i0, i1, centre):
    """(sum of d, sum of d**2), d = x - centre, as ``_block_sum``. (One function with a flag
    for the first pass's plain sum measured 25% slower on 784-value rows, hence two.)"""
    total = _zero(x)
    squares = _zero(x)
    n = n0
    while n + 4 <= n1:
        a, b = x[n, c, i0:i1], x[n + 1, c, i0:i1]
        e, f = x[n + 2, c, i0:i1], x[n + 3, c, i0:i1]
        for i in range(a.shape[0]):
            d, g = _load(a[i]) - centre, _load(b[i]) - centre
            h, k = _load(e[i]) - centre, _load(f[i]) - centre
            total += (d + g) + (h + k)
            squares += (d * d + g * g) + (h * h + k * k)
        n += 4
    for left in range(n, n1):  # left-over rows, one at a time
        seg = x[left, c, i0:i1]
        for i in range(seg.shape[0]):
            d = _load(seg[i]) - centre
            total += d
            squares += d * d
    return total, squares


@numba.njit(**_JIT)
def _block_moments(x, c, n0, n1, i0, i1):
    """Two-pass centred moments of one block, values i0:i1 of rows n0:n1 of channel c:
    float64 (count, mean_b, m2_b).

    Sums run in the compute dtype. The first, shifted by the block's first value, gives a mean
    to centre on; the second pass (from L1) sums d = x - that mean and d**2, and the corrected
    two-pass formula (``_corrected``) makes the float64 mean and m2 of them.
    """
    shift = _load(x[n0, c, i0])
    total = _block_sum(x, c, n0, n1, i0, i1, shift)
    count = (n1 - n0) * (i1 - i0)
    mean_c = shift + total / _like(count, shift)  # an int divisor would promote to float64
    total_d, squares = _block_centred_sums(x, c, n0, n1, i0, i1, mean_c)
    mean_b, m2_b = _corrected(count, mean_c, total_d, squares)
    return float(count), mean_b, m2_b


@numba.njit(inline="always", **_JIT)
def _block_plan(inner):
    """(row pieces, rows per block) of a channel's blocks: a long row is cut into near-equal
    pieces of at most ``BLOCK`` values; short rows are taken several at a time (consecutive n of
    one channel), so that a block is never much shorter than ``BLOCK`` and the per-block float64
    merge stays cheap."""
    if inner >= BLOCK:
        return (inner + BLOCK - 1) // BLOCK, 1
    return 1, max(1, BLOCK // inner)


@numba.njit(**_JIT)
def _rows_channel_moments(x, c, n0, n1):
    """float64 (count, mean, m2) of channel c over rows n0:n1, block by block in fixed order."""
    inner = x.shape[2]
    pieces, rows = _block_plan(inner)
    count, mean, m2 = 0.0, 0.0, 0.0
    for n in range(n0, n1, rows):
        for b in range(pieces):
            i0, i1 = _split(inner, pieces, b)
            n_b, mean_b, m2_b = _block_moments(x, c, n, min(n + rows, n1), i0, i1)
            count, mean, m2 = _merge(count, mean, m2, n_b, mean_b, m2_b)
    return count, mean, m2


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _block_grad_sums(dy, x, c, n0, n1, i0, i1, mean):
    """(sum(dy), sum(dy * (x - mean))) over one block (as in ``_block_moments``), in the
    compute dtype; short rows two at a time (four measured no better here: four more
    streams)."""
    sum_dy = _zero(x)
    sum_dy_xc = _zero(x)
    n = n0
    while n + 2 <= n1:
        dy_a, x_a = dy[n, c, i0:i1], x[n, c, i0:i1]
        dy_b, x_b = dy[n + 1, c, i0:i1], x[n + 1, c, i0:i1]
        for i in range(x_a.shape[0]):
            g, h = _load(dy_a[i]), _load(dy_b[i])
            sum_dy += g + h
            sum_dy_xc += g * (_load(x_a[i]) - mean) + h * (_load(x_b[i]) - mean)
        n += 2
    if n < n1:
        dy_seg, x_seg = dy[n, c, i0:i1], x[n, c, i0:i1]
        for i in range(x_seg.shape[0]):
            g = _load(dy_seg[i])
            sum_dy += g
            sum_dy_xc += g * (_load(x_seg[i]) - mean)
    return sum_dy, sum_dy_xc


@numba.njit(**_JIT)
def _rows_channel_grad_sums(dy, x, c, n0, n1, mean):
    inner = x.shape[2]
    pieces, rows = _block_plan(inner)
    sum_dy, sum_dy_xc = 0.0, 0.0
    for n in range(n0, n1, rows):
        for b in range(pieces):
            i0, i1 = _split(inner, pieces, b)
            s_dy, s_dy_xc = _block_grad_sums(dy, x, c, n, min(n + rows, n1), i0, i1, mean)
            sum_dy += float(s_dy)
            sum_dy_xc += float(s_dy_xc)
    return sum_dy, sum_dy_xc


@numba.njit(parallel=True, **_JIT)
def rows_stats(x, parts, eps, mean_out, var_out, invstd_out):
    """Per-channel mean, biased var and invstd of x (outer, C, inner).

    Work item (p, c) reduces channel c over the p-th of ``parts`` ranges of n; the C * parts
    float64 partials then merge per channel in p order (serial: a few thousand merges at most).
    Items are numbered n-range first, so a thread's share of them is one slab of memory
    x[n0:n1] swept channel by channel: measured at (32, 128, 56, 56), 0.38 of a copy's time
    with 8 n-ranges against 0.82 channel by channel (whole channels are 32 strided runs)."""
    outer, channels = x.shape[0], x.shape[1]
    counts = np.empty((channels, parts))
    means = np.empty((channels, parts))
    m2s = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        counts[c, p], means[c, p], m2s[c, p] = _rows_channel_moments(x, c, n0, n1)
    for c in range(channels):
        count, mean, m2 = 0.0, 0.0, 0.0
        for p in range(parts):
            count, mean, m2 = _merge(count, mean, m2, counts[c, p], means[c, p], m2s[c, p])
        _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c)


@numba.njit(parallel=True, **_JIT)
def rows_elemt(x, mean, scale, shift, y, stream):
    """y = (x - mean) * scale + shift per channel; scale = weight*invstd, shift = bias.

    Without streaming the loop is called directly, not through ``_affine``: for short rows the
    extra call level per row was most of the cost (measured at (64, 256, 14, 14), single thread
    in cache: 1.5 -> 1.2 copy times; two threads from memory: 0.68 -> 0.62)."""
    outer, channels = x.shape[0], x.shape[1]
    if stream:
        for item in prange(outer * channels):
            n, c = item // channels, item % channels
            _affine(x[n, c], y[n, c], mean[c], scale[c], shift[c], True)
        return
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _affine_run(x[n, c], y[n, c], mean[c], scale[c], shift[c], False)


@numba.njit(parallel=True, **_JIT)
def rows_forward_train(
    x, parts, group, eps, weight, bias, y, mean_out, var_out, invstd_out, stream
):
    """Fused stats + elemt.

    With the n range split (``parts > 1``, the usual case) the partials must be merged first:
    the reduction, then an elementwise pass in memory order. With one item per channel (N = 1)
    a thread takes ``group`` adjacent channels, reduces them, then normalises them while they
    are still in its cache (2 bytes moved per byte of x instead of 3).
    """
    outer, channels = x.shape[0], x.shape[1]
    if parts > 1:
        rows_stats(x, parts, eps, mean_out, var_out, invstd_out)
        rows_elemt(x, mean_out, weight * invstd_out, bias, y, stream)
        return
    for g in prange((channels + group - 1) // group):
        c0, c1 = g * group, min(channels, (g + 1) * group)
        for c in range(c0, c1):
            count, mean, m2 = _rows_channel_moments(x, c, 0, outer)
            _finish_stats(count, mean, m2, eps, mean_out, var_out, invstd_out, c)
        for n in range(outer):
            for c in range(c0, c1):
                scale = weight[c] * invstd_out[c]
                _affine(x[n, c], y[n, c], mean_out[c], scale, bias[c], stream)


@numba.njit(parallel=True, **_JIT)
def rows_backward_reduce(dy, x, mean, invstd, parts, sum_dy_out, sum_dy_xhat_out):
    """sum_dy = sum(dy), sum_dy_xhat = invstd * sum(dy * (x - mean)) per channel; work items
    and merge order as in ``rows_stats``."""
    outer, channels = x.shape[0], x.shape[1]
    sums_dy = np.empty((channels, parts))
    sums_dy_xc = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        sums_dy[c, p], sums_dy_xc[c, p] = _rows_channel_grad_sums(dy, x, c, n0, n1, mean[c])
    for c in range(channels):
        s_dy, s_dy_xc = 0.0, 0.0
        for p in range(parts):
            s_dy += sums_dy[c, p]
            s_dy_xc += sums_dy_xc[c, p]
        sum_dy_out[c] = s_dy
        sum_dy_xhat_out[c] = s_dy_xc * invstd[c]


@numba.njit(parallel=True, **_JIT)
def rows_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, dx, stream):
    """dx per row, as ``rows_elemt``; the coefficients are computed once per channel, not per
    row (with the direct call: (64, 256, 14, 14) from memory, 1.2-1.7 -> 0.8-1.1 copy times)."""
    outer, channels = x.shape[0], x.shape[1]
    k_dy, k_xc, k_0 = np.empty_like(mean), np.empty_like(mean), np.empty_like(mean)
    grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0)
    if stream:
        for item in prange(outer * channels):
            n, c = item // channels, item % channels
            _grad(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], True)
        return
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _grad_run(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], False)


@numba.njit(parallel=True, **_JIT)
def rows_backward_train(
    dy, x, mean, invstd, weight, parts, group, dx, sum_dy_out, sum_dy_xhat_out, stream
):
    """Fused reduce + elemt, like ``rows_forward_train``: two passes when the n range is split;
    grouped channels re-read from cache when it is not (3 bytes moved per byte of x, not 5)."""
    outer, channels = x.shape[0], x.shape[1]
    count = outer * x.shape[2]
    if parts > 1:
        rows_backward_reduce(dy, x, mean, invstd, parts, sum_dy_out, sum_dy_xhat_out)
        rows_backward_elemt(
            dy, x, mean, invstd, weight, sum_dy_out, sum_dy_xhat_out, count, dx, stream
        )
        return
    k_dy, k_xc, k_0 = np.empty_like(mean), np.empty_like(mean), np.empty_like(mean)
    for g in prange((channels + group - 1) // group):
        c0, c1 = g * group, min(channels, (g + 1) * group)
        for c in range(c0, c1):
            s_dy, s_dy_xc = _rows_channel_grad_sums(dy, x, c, 0, outer, mean[c])
            sum_dy_out[c] = s_dy
            sum_dy_xhat_out[c] = s_dy_xc * invstd[c]
            k_dy[c], k_xc[c], k_0[c] = _grad_coefficients(
                invstd[c], weight[c], sum_dy_out[c], sum_dy_xhat_out[c], count
            )
        for n in range(outer):
            for c in range(c0, c1):
                _grad(dy[n, c], x[n, c], dx[n, c], mean[c], k_dy[c], k_xc[c], k_0[c], stream)


@numba.njit(parallel=True, **_JIT)
def rows_backward_pipelined(
    dy, x, mean, invstd, weight, lanes, dx, sum_dy_out, sum_dy_xhat_out, stream
):
    """Fused reduce + elemt, software-pipelined over channels: each of ``lanes`` contiguous
    ranges of channels is walked so that the sums of channel c + 1 are read from memory in the
    same sweep over n that writes dx of channel c from cache (its x and dy were read by the
    previous sweep). Memory is then read once, not twice, and never idles while dx is computed.

    A channel's sums are accumulated block by block in one fixed order, by one call site
    (whichever lane or sweep the channel falls in: with ``fastmath`` reassociation, two call
    sites of the same sum may be vectorised differently and round differently), so results do
    not depend on ``lanes``."""
    outer, channels, inner = x.shape
    count = outer * inner
    pieces, rows = _block_plan(inner)
    for lane in prange(lanes):
        c0, c1 = _split(channels, lanes, lane)
        # Sweep `step` reduces channel step + 1 and writes dx of channel step (the first sweep
        # only reduces, the last only writes). One call site for the block sums, so every
        # channel's sums come from the same machine code whichever lane or sweep it falls in.
        for step in range(c0 - 1, c1):
            reduce_c, write_c = step + 1, step
            reducing, writing = reduce_c < c1, write_c >= c0
            k_dy = k_xc = k_0 = _like(0.0, invstd[0])  # the compute dtype: `* 0` would widen
            if writing:
                k_dy, k_xc, k_0 = _grad_coefficients(
                    invstd[write_c], weight[write_c], sum_dy_out[write_c],
                    sum_dy_xhat_out[write_c], count,
                )  # fmt: skip
            s_dy, s_dy_xc = 0.0, 0.0
            for n0 in range(0, outer, rows):
                n1 = min(n0 + rows, outer)
                if reducing:
                    for b in range(pieces):
                        i0, i1 = _split(inner, pieces, b)
                        a, b_ = _block_grad_sums(dy, x, reduce_c, n0, n1, i0, i1, mean[reduce_c])
                        s_dy += float(a)
                        s_dy_xc += float(b_)
                if writing:
                    m = mean[write_c]
                    for n in range(n0, n1):
                        c = write_c
                        _grad(dy[n, c], x[n, c], dx[n, c], m, k_dy, k_xc, k_0, stream)
            if reducing:
                sum_dy_out[reduce_c] = s_dy
                sum_dy_xhat_out[reduce_c] = s_dy_xc * invstd[reduce_c]
