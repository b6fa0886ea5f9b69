"""Numba kernels on the cols view (outer, W), W = C * inner: one accumulator per column.

Channels-last (NHWC, NDHWC: inner = 1), (N, C), and NC(L) with tiny L. Each of the W columns
gets its own accumulator and the inner loops run along a contiguous row of columns: vectorised
without any reduction in the loop. Work items are (chunk of rows, block of columns), so the
reduction axis itself is parallel.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .elementwise import _affine, _grad
from .jit import _JIT, _corrected, _finish_stats, _load, _merge, _split, _zero
from .tuning import COLS_CHUNK_ELEMS, COLS_FLAT_ELEMS, COLS_MAX_BLOCK, COLS_MIN_CHUNKS


@numba.njit(**_JIT)
def cols_plan(outer, width):
    """(column block, number of row chunks): a function of the shape only."""
    block = min(width, COLS_MAX_BLOCK)
    # 16 to 256 rows: enough that merging the chunk partials is cheap, few enough that a
    # column's partial sum in the compute dtype stays short, the chunk stays in cache and
    # both threads get work.
    most = (outer + COLS_MIN_CHUNKS - 1) // COLS_MIN_CHUNKS
    rows = max(16, min(256, COLS_CHUNK_ELEMS // block, most))
    chunks = max(1, (outer + rows - 1) // rows)
    return block, chunks


@numba.njit(**_JIT)
def cols_flat_rows(width):
    """Rows per flat run of the elementwise kernels (1: row by row)."""
    if width > COLS_MAX_BLOCK:
        return 1
    return max(1, COLS_FLAT_ELEMS // width)


@numba.njit(**_JIT)
def _cols_item(outer, width, block, chunks, item):
    """Rows [r0, r1) and columns [w0, w1) of work item ``item``."""
    wblocks = (width + block - 1) // block
    q, wb = item // wblocks, item % wblocks
    r0, r1 = _split(outer, chunks, q)
    return q, r0, r1, wb * block, min(width, (wb + 1) * block)


@numba.njit(**_JIT)
def _cols_chunk_moments(x, r0, r1, w0, w1, mean_out, m2_out):
    """Two-pass centred moments of columns w0:w1 over rows r0:r1 -> float64 views mean_out,
    m2_out. As in ``_block_moments``: sums in the compute dtype, the first shifted by each
    column's first value, the second about that mean, combined by ``_corrected``."""
    first = x[r0, w0:w1]
    centre = np.full(first.shape[0], _zero(x))
    total = np.full(first.shape[0], _zero(x))
    for j in range(first.shape[0]):
        centre[j] = _load(first[j])
    for r in range(r0, r1):
        row = x[r, w0:w1]
        for j in range(row.shape[0]):
            total[j] += _load(row[j]) - centre[j]
    rows = r1 - r0
    squares = np.full(first.shape[0], _zero(x))
    for j in range(centre.shape[0]):
        centre[j] = centre[j] + total[j] / rows
        total[j] = 0.0
    r = r0
    while r + 2 <= r1:  # two rows per sweep: half the accumulator loads and stores
        a, b = x[r, w0:w1], x[r + 1, w0:w1]
        for j in range(a.shape[0]):
            d, e = _load(a[j]) - centre[j], _load(b[j]) - centre[j]
            total[j] += d + e
            squares[j] += d * d + e * e
        r += 2
    if r < r1:
        row = x[r, w0:w1]
        for j in range(row.shape[0]):
            d = _load(row[j]) - centre[j]
            total[j] += d
            squares[j] += d * d
    for j in range(total.shape[0]):
        mean_out[j], m2_out[j] = _corrected(rows, centre[j], total[j], squares[j])


@numba.njit(**_JIT)
def _merge_chunk_moments(outer, chunks, means, m2s, mean_w, m2_w):
    """Merge (chunks, W) float64 partials column by column, in chunk order (Chan et al.).
    All columns of a chunk share its count, so the weights are scalars and the loop over
    columns vectorises (a per-column merge with its own division measured 3x the kernel)."""
    count = 0.0
    for q in range(chunks):
        r0, r1 = _split(outer, chunks, q)
        n_b = float(r1 - r0)
        frac = n_b / (count + n_b)
        spread = count * frac
        chunk_mean, chunk_m2 = means[q], m2s[q]
        for w in range(mean_w.shape[0]):
            delta = chunk_mean[w] - mean_w[w]
            mean_w[w] += delta * frac
            m2_w[w] += chunk_m2[w] + delta * delta * spread
        count += n_b
    return count


@numba.njit(parallel=True, **_JIT)
def cols_stats(x, inner, eps, mean_out, var_out, invstd_out, means, m2s):
    """Per-channel mean, biased var, invstd of x (outer, C*inner); column w is channel w//inner.

    ``means``, ``m2s``: float64 (chunks, W) scratch from ``cols_plan``, overwritten. (The caller
    keeps them between calls: allocating them here cost 0.4 ms of page faults per call at
    (4096, 1024), as much as the reduction.)"""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    for item in prange(chunks * wblocks):
        q, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        _cols_chunk_moments(x, r0, r1, w0, w1, means[q, w0:w1], m2s[q, w0:w1])
    # Fixed order: chunk by chunk per column, then a channel's inner positions in order.
    mean_w = np.zeros(width)
    m2_w = np.zeros(width)
    count = _merge_chunk_moments(outer, chunks, means, m2s, mean_w, m2_w)
    for c in range(width // inner):
        total, mean, m2 = 0.0, 0.0, 0.0
        for j in range(c * inner, (c + 1) * inner):
            total, mean, m2 = _merge(total, mean, m2, count, mean_w[j], m2_w[j])
        _finish_stats(total, mean, m2, eps, mean_out, var_out, invstd_out, c)


@numba.njit(**_JIT)
def _tile(v, rows):
    """``rows`` copies of the vector ``v`` end to end."""
    out = np.empty(rows * v.shape[0], v.dtype)
    for t in range(rows):
        part = out[t * v.shape[0] : (t + 1) * v.shape[0]]
        for j in range(v.shape[0]):
            part[j] = v[j]
    return out


@numba.njit(parallel=True, **_JIT)
def cols_elemt(x, mean_w, scale_w, shift_w, y, stream):
    """y = (x - mean) * scale + shift; the per-column vectors are per-channel ones repeated.
    For narrow rows the vectors are tiled ``cols_flat_rows(W)`` times and whole rows taken
    that many at a time as one contiguous run (x and y are C-contiguous)."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    rows = cols_flat_rows(width)
    mean_t, scale_t, shift_t = _tile(mean_w, rows), _tile(scale_w, rows), _tile(shift_w, rows)
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    for item in prange(chunks * wblocks):
        _, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        r = r0
        while rows > 1 and r + rows <= r1:  # rows > 1 only when a row is one block
            i0, i1 = r * width, (r + rows) * width
            _affine(flat_x[i0:i1], flat_y[i0:i1], mean_t, scale_t, shift_t, stream)
            r += rows
        mean, scale, shift = mean_t[w0:w1], scale_t[w0:w1], shift_t[w0:w1]
        for left in range(r, r1):  # rows left over after the flat runs
            _affine(x[left, w0:w1], y[left, w0:w1], mean, scale, shift, stream)


@numba.njit(parallel=True, **_JIT)
def cols_backward_reduce(
    dy, x, mean_w, inner, invstd, sum_dy_out, sum_dy_xhat_out, sums_dy, sums_dy_xc
):
    """sum_dy, sum_dy_xhat per channel; per-chunk sums in the compute dtype, merged in float64.
    ``sums_dy``, ``sums_dy_xc``: (chunks, W) compute-dtype scratch, overwritten."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    for item in prange(chunks * wblocks):
        q, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        s_dy, s_dy_xc, mean = sums_dy[q, w0:w1], sums_dy_xc[q, w0:w1], mean_w[w0:w1]
        for j in range(s_dy.shape[0]):
            s_dy[j] = 0.0
            s_dy_xc[j] = 0.0
        for r in range(r0, r1):
            dy_row, x_row = dy[r, w0:w1], x[r, w0:w1]
            for j in range(x_row.shape[0]):
                g = _load(dy_row[j])
                s_dy[j] += g
                s_dy_xc[j] += g * (_load(x_row[j]) - mean[j])
    # Fixed order: chunk by chunk per column (vectorised over columns), then inner positions.
    col_dy = np.zeros(width)
    col_dy_xc = np.zeros(width)
    for q in range(chunks):
        chunk_dy, chunk_dy_xc = sums_dy[q], sums_dy_xc[q]
        for w in range(width):
            col_dy[w] += chunk_dy[w]
            col_dy_xc[w] += chunk_dy_xc[w]
    for c in range(width // inner):
        total_dy, total_dy_xc = 0.0, 0.0
        for j in range(c * inner, (c + 1) * inner):
            total_dy += col_dy[j]
            total_dy_xc += col_dy_xc[j]
        sum_dy_out[c] = total_dy
        sum_dy_xhat_out[c] = total_dy_xc * invstd[c]


@numba.njit(parallel=True, **_JIT)
def cols_backward_elemt(dy, x, mean_w, k_dy_w, k_xc_w, k_0_w, dx, stream):
    """dx = k_dy*dy + k_xc*(x - mean) + k_0 with per-column coefficient vectors, in flat runs
    as in ``cols_elemt``."""
    outer, width = x.shape
    block, chunks = cols_plan(outer, width)
    wblocks = (width + block - 1) // block
    rows = cols_flat_rows(width)
    mean_t, k_dy_t, k_xc_t, k_0_t = (
        _tile(mean_w, rows),
        _tile(k_dy_w, rows),
        _tile(k_xc_w, rows),
        _tile(k_0_w, rows),
    )
    flat_dy, flat_x, flat_dx = dy.reshape(-1), x.reshape(-1), dx.reshape(-1)
    for item in prange(chunks * wblocks):
        _, r0, r1, w0, w1 = _cols_item(outer, width, block, chunks, item)
        r = r0
        while rows > 1 and r + rows <= r1:
            i0, i1 = r * width, (r + rows) * width
            _grad(
                flat_dy[i0:i1], flat_x[i0:i1], flat_dx[i0:i1],
                mean_t, k_dy_t, k_xc_t, k_0_t, stream,
            )  # fmt: skip
            r += rows
        mean, k_dy, k_xc, k_0 = mean_t[w0:w1], k_dy_t[w0:w1], k_xc_t[w0:w1], k_0_t[w0:w1]
        for left in range(r, r1):
            _grad(dy[left, w0:w1], x[left, w0:w1], dx[left, w0:w1], mean, k_dy, k_xc, k_0, stream)
