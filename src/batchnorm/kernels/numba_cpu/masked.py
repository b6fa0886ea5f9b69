"""Numba kernels of masked batch norm: the stages over the real positions of a padded batch.

``pos`` is the mask in x's memory order without the channel axis, as uint8 (1 = a real value):
(outer, inner) for the rows view (outer, C, inner), any inner (NCL, NCHW...), and (outer,) for
channels-last and (N, C) input, the cols view with inner = 1 (outer, C), where a position is a
whole row of channels: a padded row is skipped, never read. The math is
``reference.masked``'s:

* statistics, two passes over the real values: ``mean = K + sum(x - K) / m`` with K the value
  at the first real position (so x = 1e4 + N(0, 1) sums O(1) numbers), then with
  ``e = x - mean``, ``mean += sum(e) / m`` and ``var = sum(e^2) / m - (sum(e) / m)^2`` (the
  corrected two-pass of Chan, Golub & LeVeque 1983);
* ``sum_dy``, ``sum_dy_xhat = invstd * sum(dy * (x - mean))`` over the real positions;
* elementwise maps as the plain ones at real positions and 0 at padded ones.

Padded values are selected away (``if real``), never multiplied by 0: a NaN or inf there would
survive a product. Sums run per row (rows) or per chunk of rows (cols) in the compute dtype and
across them in float64, in an order fixed by the shape, so results are bitwise reproducible.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .jit import _JIT, _REDUCE_MATH, _load, _split, _store, _zero

#: Rows of the cols view per work item: a chunk's (C,) partials stay in L1, and the float64
#: merge of chunk partials is cheap next to the chunk's reads.
COLS_ROWS = 256


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _row_sums(row, real, centre):
    """(sum of d, sum of d**2) over the real values of one contiguous row, d = x - centre."""
    zero = _zero(row)
    total = zero
    squares = zero
    for i in range(row.shape[0]):
        # A select, not a branch: the loop stays vectorised, and the padded value is dropped
        # whatever it is (NaN * 0 would be NaN).
        d = _load(row[i]) - centre if real[i] != 0 else zero
        total += d
        squares += d * d
    return total, squares


@numba.njit(parallel=True, **_JIT)
def rows_masked_sums(x, pos, centre, parts, sums_out, squares_out):
    """Per channel, float64 sum of d and of d**2 over the real positions, d = x - centre[c].
    Items (n-range, channel) as ``rows.rows_stats``; partials added in n-range order."""
    outer, channels = x.shape[0], x.shape[1]
    sums = np.empty((channels, parts))
    squares = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        s, q = 0.0, 0.0
        for n in range(n0, n1):
            a, b = _row_sums(x[n, c], pos[n], centre[c])
            s += float(a)
            q += float(b)
        sums[c, p], squares[c, p] = s, q
    for c in range(channels):
        s, q = 0.0, 0.0
        for p in range(parts):
            s += sums[c, p]
            q += squares[c, p]
        sums_out[c], squares_out[c] = s, q


@numba.njit(parallel=True, **_JIT)
def cols_masked_sums(x, pos, centre, sums_out, squares_out):
    """The same on the cols view (outer, C) with one flag per row."""
    outer, channels = x.shape
    chunks = (outer + COLS_ROWS - 1) // COLS_ROWS
    sums = np.zeros((chunks, channels))
    squares = np.zeros((chunks, channels))
    for q in prange(chunks):
        total = np.zeros(channels, dtype=centre.dtype)
        power = np.zeros(channels, dtype=centre.dtype)
        for r in range(q * COLS_ROWS, min(outer, (q + 1) * COLS_ROWS)):
            if pos[r]:
                row = x[r]
                for c in range(channels):
                    d = _load(row[c]) - centre[c]
                    total[c] += d
                    power[c] += d * d
        for c in range(channels):
            sums[q, c], squares[q, c] = total[c], power[c]
    for c in range(channels):
        s, p = 0.0, 0.0
        for q in range(chunks):
            s += sums[q, c]
            p += squares[q, c]
        sums_out[c], squares_out[c] = s, p


@numba.njit(fastmath=_REDUCE_MATH, **_JIT)
def _row_grad_sums(dy, row, real, mean):
    zero = _zero(row)
    sum_dy = zero
    sum_dy_xc = zero
    for i in range(row.shape[0]):
        keep = real[i] != 0
        g = _load(dy[i]) if keep else zero
        sum_dy += g
        sum_dy_xc += g * (_load(row[i]) - mean) if keep else zero
    return sum_dy, sum_dy_xc


@numba.njit(parallel=True, **_JIT)
def rows_masked_grad_sums(dy, x, pos, mean, invstd, parts, sum_dy_out, sum_dy_xhat_out):
    """sum_dy, sum_dy_xhat per channel over the real positions, as ``rows_masked_sums``."""
    outer, channels = x.shape[0], x.shape[1]
    sums = np.empty((channels, parts))
    sums_xc = np.empty((channels, parts))
    for item in prange(channels * parts):
        p, c = item // channels, item % channels
        n0, n1 = _split(outer, parts, p)
        s, q = 0.0, 0.0
        for n in range(n0, n1):
            a, b = _row_grad_sums(dy[n, c], x[n, c], pos[n], mean[c])
            s += float(a)
            q += float(b)
        sums[c, p], sums_xc[c, p] = s, q
    for c in range(channels):
        s, q = 0.0, 0.0
        for p in range(parts):
            s += sums[c, p]
            q += sums_xc[c, p]
        sum_dy_out[c], sum_dy_xhat_out[c] = s, q * invstd[c]


@numba.njit(parallel=True, **_JIT)
def cols_masked_grad_sums(dy, x, pos, mean, invstd, sum_dy_out, sum_dy_xhat_out):
    outer, channels = x.shape
    chunks = (outer + COLS_ROWS - 1) // COLS_ROWS
    sums = np.zeros((chunks, channels))
    sums_xc = np.zeros((chunks, channels))
    for q in prange(chunks):
        s_dy = np.zeros(channels, dtype=mean.dtype)
        s_dy_xc = np.zeros(channels, dtype=mean.dtype)
        for r in range(q * COLS_ROWS, min(outer, (q + 1) * COLS_ROWS)):
            if pos[r]:
                dy_row, x_row = dy[r], x[r]
                for c in range(channels):
                    g = _load(dy_row[c])
                    s_dy[c] += g
                    s_dy_xc[c] += g * (_load(x_row[c]) - mean[c])
        for c in range(channels):
            sums[q, c], sums_xc[q, c] = s_dy[c], s_dy_xc[c]
    for c in range(channels):
        s, p = 0.0, 0.0
        for q in range(chunks):
            s += sums[q, c]
            p += sums_xc[q, c]
        sum_dy_out[c], sum_dy_xhat_out[c] = s, p * invstd[c]


@numba.njit(**_JIT)
def _affine_row(x, y, real, mean, scale, shift):
    zero = _zero(x)
    for i in range(x.shape[0]):
        value = (_load(x[i]) - mean) * scale + shift if real[i] else zero
        y[i] = _store(y, value)


@numba.njit(parallel=True, **_JIT)
def rows_masked_elemt(x, pos, mean, scale, shift, y):
    """y = (x - mean) * scale + shift at real positions, 0 at padded ones."""
    outer, channels = x.shape[0], x.shape[1]
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _affine_row(x[n, c], y[n, c], pos[n], mean[c], scale[c], shift[c])


@numba.njit(parallel=True, **_JIT)
def cols_masked_elemt(x, pos, mean, scale, shift, y):
    outer, channels = x.shape
    zero = _zero(x)
    for r in prange(outer):
        x_row, y_row = x[r], y[r]
        if pos[r]:
            for c in range(channels):
                y_row[c] = _store(y_row, (_load(x_row[c]) - mean[c]) * scale[c] + shift[c])
        else:
            for c in range(channels):
                y_row[c] = _store(y_row, zero)


@numba.njit(**_JIT)
def _grad_row(dy, x, dx, real, mean, k_dy, k_xc, k_0):
    zero = _zero(x)
    for i in range(x.shape[0]):
        value = k_dy * _load(dy[i]) + k_xc * (_load(x[i]) - mean) + k_0 if real[i] else zero
        dx[i] = _store(dx, value)


@numba.njit(parallel=True, **_JIT)
def rows_masked_grad(dy, x, pos, mean, k_dy, k_xc, k_0, dx):
    """dx = k_dy * dy + k_xc * (x - mean) + k_0 at real positions, 0 at padded ones."""
    outer, channels = x.shape[0], x.shape[1]
    for item in prange(outer * channels):
        n, c = item // channels, item % channels
        _grad_row(dy[n, c], x[n, c], dx[n, c], pos[n], mean[c], k_dy[c], k_xc[c], k_0[c])


@numba.njit(parallel=True, **_JIT)
def cols_masked_grad(dy, x, pos, mean, k_dy, k_xc, k_0, dx):
    outer, channels = x.shape
    zero = _zero(x)
    for r in prange(outer):
        dy_row, x_row, dx_row = dy[r], x[r], dx[r]
        if pos[r]:
            for c in range(channels):
                value = k_dy[c] * _load(dy_row[c]) + k_xc[c] * (_load(x_row[c]) - mean[c])
                dx_row[c] = _store(dx_row, value + k_0[c])
        else:
            for c in range(channels):
                dx_row[c] = _store(dx_row, zero)
