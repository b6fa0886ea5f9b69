"""Elementwise row loops shared by the rows and cols kernels: the forward's affine map and the
backward's dx, each along one contiguous run with optional streaming stores."""

from __future__ import annotations

import numba

from .jit import _JIT, _at, _like, _load, _part, _store, _stream, _stream_span


@numba.njit(**_JIT)
def _affine_run(x, y, mean, scale, shift, streaming):
    if streaming:
        for i in range(x.shape[0]):
            _stream(y, i, _store(y, (_load(x[i]) - _at(mean, i)) * _at(scale, i) + _at(shift, i)))
    else:
        for i in range(x.shape[0]):
            y[i] = _store(y, (_load(x[i]) - _at(mean, i)) * _at(scale, i) + _at(shift, i))


@numba.njit(**_JIT)
def _affine(x_row, y_row, mean, scale, shift, stream):
    """y = (x - mean) * scale + shift along a contiguous row; x - mean first (exact for large
    offsets). The coefficients are scalars (rows layout) or per-column vectors (cols).
    With ``stream``, the aligned middle of the row is written with streaming stores. (Loops
    index views from 0: see the note in ``rows``.)"""
    n = x_row.shape[0]
    a, b = _stream_span(y_row, stream)
    if a == n or (a == 0 and b == n):  # one call per row where possible: rows can be short
        _affine_run(x_row, y_row, mean, scale, shift, a == 0)
        return
    for i0, i1, streaming in ((0, a, False), (a, b, True), (b, n, False)):
        _affine_run(
            x_row[i0:i1], y_row[i0:i1],
            _part(mean, i0, i1), _part(scale, i0, i1), _part(shift, i0, i1), streaming,
        )  # fmt: skip


@numba.njit(**_JIT)
def _grad_run(dy, x, dx, mean, k_dy, k_xc, k_0, streaming):
    if streaming:
        for i in range(x.shape[0]):
            value = _at(k_dy, i) * _load(dy[i]) + _at(k_xc, i) * (_load(x[i]) - _at(mean, i))
            _stream(dx, i, _store(dx, value + _at(k_0, i)))
    else:
        for i in range(x.shape[0]):
            value = _at(k_dy, i) * _load(dy[i]) + _at(k_xc, i) * (_load(x[i]) - _at(mean, i))
            dx[i] = _store(dx, value + _at(k_0, i))


@numba.njit(**_JIT)
def _grad(dy_row, x_row, dx_row, mean, k_dy, k_xc, k_0, stream):
    """dx = k_dy * dy + k_xc * (x - mean) + k_0 (the compact backward, expanded), along a row
    like ``_affine``."""
    n = x_row.shape[0]
    a, b = _stream_span(dx_row, stream)
    if a == n or (a == 0 and b == n):  # one call per row where possible: rows can be short
        _grad_run(dy_row, x_row, dx_row, mean, k_dy, k_xc, k_0, a == 0)
        return
    for i0, i1, streaming in ((0, a, False), (a, b, True), (b, n, False)):
        _grad_run(
            dy_row[i0:i1], x_row[i0:i1], dx_row[i0:i1], _part(mean, i0, i1),
            _part(k_dy, i0, i1), _part(k_xc, i0, i1), _part(k_0, i0, i1), streaming,
        )  # fmt: skip


@numba.njit(**_JIT)
def _grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count):
    """Per-channel (k_dy, k_xc, k_0) of dx = k_dy*dy + k_xc*(x - mean) + k_0, from
    dx = weight*invstd/m * (m*dy - sum_dy - x_hat*sum_dy_xhat), x_hat = (x - mean)*invstd.
    Either sum may be 0 (moments treated as constants: that term drops)."""
    k_dy = float(weight) * float(invstd)
    k_xc = -k_dy * float(invstd) * (float(sum_dy_xhat) / count)
    k_0 = -k_dy * (float(sum_dy) / count)
    return _like(k_dy, invstd), _like(k_xc, invstd), _like(k_0, invstd)


@numba.njit(**_JIT)
def grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0):
    """Vector form of ``_grad_coefficients`` for the cols launcher."""
    for c in range(invstd.shape[0]):
        k_dy[c], k_xc[c], k_0[c] = _grad_coefficients(
            invstd[c], weight[c], sum_dy[c], sum_dy_xhat[c], count
        )
