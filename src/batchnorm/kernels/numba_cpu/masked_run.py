"""The masked stages on a ``Prepared`` array: the position mask in x's memory order, the
channel shifts, and the choice of the rows or cols kernels of ``masked``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .compiled import _k
from .layout import Prepared

Array = Any


class Positions:
    """The mask of ``prep``'s array in its memory order, uint8: (outer, inner) for the rows
    kernels (any inner > 1) or (outer,) for the cols ones (inner = 1: a position is a row of
    channels), and m, the number of real positions."""

    def __init__(self, prep: Prepared, mask: Array, axis: int) -> None:
        arr = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        # Mask axes are x's without the channel axis: axis a of x is axis a - (a > axis) here.
        order = [a - (a > axis) for a in prep.perm if a != axis]
        flat = np.ascontiguousarray(arr.transpose(order)).view(np.uint8)
        self.rows = prep.inner > 1
        self.pos = flat.reshape(prep.outer, prep.inner) if self.rows else flat.reshape(-1)
        self.count = int(np.count_nonzero(flat))

    def view(self, prep: Prepared, phys: np.ndarray) -> np.ndarray:
        if self.rows:
            return phys.reshape(prep.outer, prep.channels, prep.inner)
        return phys.reshape(prep.outer, prep.channels)


def _shift(prep: Prepared, where: Positions) -> np.ndarray:
    """K per channel: x at the first real position (0 when that is not finite, or none is)."""
    shift = np.zeros(prep.channels, dtype=prep.cdt)
    flat = where.pos.reshape(-1)
    if where.count == 0:
        return shift
    first = int(np.argmax(flat))
    o, i = divmod(first, prep.inner)
    values = prep.phys.reshape(prep.outer, prep.channels, prep.inner)[o, :, i]
    if prep.bf16:  # the bits of bfloat16 are the top half of a float32's
        values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif values.dtype == np.uint16:
        values = values.view(np.float16)
    values = values.astype(prep.cdt)
    return np.where(np.isfinite(values), values, 0).astype(prep.cdt)


def _sums(prep: Prepared, where: Positions, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sums = np.empty(prep.channels)
    squares = np.empty(prep.channels)
    x = where.view(prep, prep.phys)
    if where.rows:
        _k().rows_masked_sums(x, where.pos, centre, prep.parts(), sums, squares)
    else:
        _k().cols_masked_sums(x, where.pos, centre, sums, squares)
    return sums, squares


def stats(prep: Prepared, where: Positions) -> tuple[np.ndarray, np.ndarray]:
    """(mean, biased var) over the real positions, compute dtype; NaN for m = 0."""
    m = where.count
    if m == 0 or prep.size == 0:
        nan = np.full(prep.channels, np.nan, dtype=prep.cdt)
        return nan, nan.copy()
    shift = _shift(prep, where)
    total, _ = _sums(prep, where, shift)
    mean = (shift + total / m).astype(prep.cdt)
    total, squares = _sums(prep, where, mean)
    residual = total / m
    var = np.maximum(squares / m - residual * residual, 0.0)
    return (mean + residual).astype(prep.cdt), var.astype(prep.cdt)


def elemt(prep, where, mean, scale, shift) -> Array:
    y = prep.empty()
    if prep.size:
        kernel = _k().rows_masked_elemt if where.rows else _k().cols_masked_elemt
        kernel(where.view(prep, prep.phys), where.pos, mean, scale, shift, where.view(prep, y))
    return prep.wrap(y)


def backward_reduce(prep, where, dy, mean, invstd) -> tuple[np.ndarray, np.ndarray]:
    sum_dy = np.zeros(prep.channels, dtype=prep.cdt)
    sum_dy_xhat = np.zeros(prep.channels, dtype=prep.cdt)
    if prep.size == 0 or where.count == 0:
        return sum_dy, sum_dy_xhat
    x, dy = where.view(prep, prep.phys), where.view(prep, dy)
    if where.rows:
        args = (dy, x, where.pos, mean, invstd, prep.parts(), sum_dy, sum_dy_xhat)
        _k().rows_masked_grad_sums(*args)
    else:
        _k().cols_masked_grad_sums(dy, x, where.pos, mean, invstd, sum_dy, sum_dy_xhat)
    return sum_dy, sum_dy_xhat


def backward_elemt(prep, where, dy, mean, invstd, w, sum_dy, sum_dy_xhat, count) -> Array:
    dx = prep.empty()
    if prep.size:
        k = _k()
        k_dy, k_xc, k_0 = (np.empty_like(mean) for _ in range(3))
        # A count of 0 only comes with switched-off paths (eval): their sums are 0 then.
        k.grad_coefficients(invstd, w, sum_dy, sum_dy_xhat, max(int(count), 1), k_dy, k_xc, k_0)
        kernel = k.rows_masked_grad if where.rows else k.cols_masked_grad
        view = where.view
        kernel(
            view(prep, dy), view(prep, prep.phys), where.pos, mean, k_dy, k_xc, k_0,
            view(prep, dx),
        )  # fmt: skip
    return prep.wrap(dx)
