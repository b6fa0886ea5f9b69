"""The stages on a ``Prepared`` array: each picks the rows or cols kernel and hands it the views.

No validation here: the backend's callers validate (``batchnorm.reference``, ``batchnorm.torch``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .compiled import _k, num_threads
from .layout import Prepared
from .memory import _scratch

Array = Any


def _plain_means(prep: Prepared, mean: np.ndarray) -> None:
    """Channels whose mean came out NaN get a plain float64 mean instead: the kernels shift
    their sums by a value of the data, so a channel holding an inf comes out NaN (inf - inf),
    where the reference's plain sum says +inf or -inf (NaN only with both signs or a NaN)."""
    bad = np.flatnonzero(np.isnan(mean))
    if bad.size == 0:
        return
    rows = prep.phys.reshape(prep.outer, prep.channels, prep.inner)
    for c in bad:
        values = np.ascontiguousarray(rows[:, c, :])
        if prep.bf16:  # the bits of bfloat16 are the top half of a float32's
            values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif values.dtype == np.uint16:
            values = values.view(np.float16)
        with np.errstate(invalid="ignore"):  # inf and -inf together: NaN, as intended
            mean[c] = np.sum(values, dtype=np.float64) / prep.count


def _stats(prep: Prepared, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.empty(prep.channels, dtype=prep.cdt)
    var = np.empty_like(mean)
    invstd = np.empty_like(mean)
    if prep.size == 0:
        mean[:] = var[:] = invstd[:] = np.nan  # no values: no moments (and no channels: no-op)
    elif prep.rows:
        _k().rows_stats(prep.view(prep.phys), prep.parts(), eps, mean, var, invstd)
    else:
        shape = prep.cols_partials_shape()
        _k().cols_stats(
            prep.view(prep.phys), prep.inner, eps, mean, var, invstd,
            _scratch("means", shape, np.float64), _scratch("m2s", shape, np.float64),
        )  # fmt: skip
    _plain_means(prep, mean)
    return mean, var, invstd


def _elemt(prep: Prepared, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> Array:
    y = prep.empty()
    if prep.size:
        if prep.rows:
            _k().rows_elemt(prep.view(prep.phys), mean, scale, shift, prep.view(y), prep.stream(2))
        else:
            cols = prep.columns
            _k().cols_elemt(
                prep.view(prep.phys), cols(mean), cols(scale), cols(shift), prep.view(y),
                prep.stream(2),
            )  # fmt: skip
    return prep.wrap(y)


def _forward_train(prep: Prepared, weight: Array | None, bias: Array | None, eps: float):
    w, b = prep.vector(weight, 1.0), prep.vector(bias, 0.0)
    if not prep.rows or prep.size == 0:
        mean, var, invstd = _stats(prep, eps)
        y = _elemt(prep, mean, w * invstd, b)
        return y, mean, var, invstd
    y = prep.empty()
    mean = np.empty(prep.channels, dtype=prep.cdt)
    var = np.empty_like(mean)
    invstd = np.empty_like(mean)
    _k().rows_forward_train(
        prep.view(prep.phys),
        prep.parts(),
        prep.group(1),
        eps,
        w,
        b,
        prep.view(y),
        mean,
        var,
        invstd,
        prep.stream(2),
    )
    _plain_means(prep, mean)
    return prep.wrap(y), mean, var, invstd


def _backward_reduce(prep: Prepared, dy: np.ndarray, mean: np.ndarray, invstd: np.ndarray):
    sum_dy = np.empty(prep.channels, dtype=prep.cdt)
    sum_dy_xhat = np.empty_like(sum_dy)
    if prep.size == 0:
        sum_dy[:] = sum_dy_xhat[:] = 0.0
    elif prep.rows:
        _k().rows_backward_reduce(
            prep.view(dy), prep.view(prep.phys), mean, invstd, prep.parts(), sum_dy, sum_dy_xhat
        )
    else:
        shape = prep.cols_partials_shape()
        _k().cols_backward_reduce(
            prep.view(dy), prep.view(prep.phys), prep.columns(mean), prep.inner, invstd,
            sum_dy, sum_dy_xhat, _scratch("sums_dy", shape, prep.cdt),
            _scratch("sums_dy_xc", shape, prep.cdt),
        )  # fmt: skip
    return sum_dy, sum_dy_xhat


def _backward_elemt(prep, dy, mean, invstd, w, sum_dy, sum_dy_xhat, count) -> Array:
    dx = prep.empty()
    if prep.size:
        k = _k()
        if prep.rows:
            k.rows_backward_elemt(
                prep.view(dy),
                prep.view(prep.phys),
                mean,
                invstd,
                w,
                sum_dy,
                sum_dy_xhat,
                count,
                prep.view(dx),
                prep.stream(3),
            )
        else:
            k_dy, k_xc, k_0 = (np.empty_like(mean) for _ in range(3))
            k.grad_coefficients(invstd, w, sum_dy, sum_dy_xhat, count, k_dy, k_xc, k_0)
            cols = prep.columns
            k.cols_backward_elemt(
                prep.view(dy),
                prep.view(prep.phys),
                cols(mean),
                cols(k_dy),
                cols(k_xc),
                cols(k_0),
                prep.view(dx),
                prep.stream(3),
            )
    return prep.wrap(dx)


def _backward_train(prep, dy, mean, invstd, w):
    if prep.rows and prep.size:
        k = _k()
        dx = prep.empty()
        sum_dy = np.empty(prep.channels, dtype=prep.cdt)
        sum_dy_xhat = np.empty_like(sum_dy)
        views = (prep.view(dy), prep.view(prep.phys), mean, invstd, w)
        if prep.inner * prep.phys.itemsize >= k.ROWS_PIPELINE_MIN_BYTES and prep.channels > 1:
            # Lanes only balance the threads: the results do not depend on their number.
            lanes = min(prep.channels, 4 * num_threads())
            k.rows_backward_pipelined(
                *views, lanes, prep.view(dx), sum_dy, sum_dy_xhat, prep.stream(3)
            )
        else:
            k.rows_backward_train(
                *views, prep.parts(), prep.group(2), prep.view(dx), sum_dy, sum_dy_xhat,
                prep.stream(3),
            )  # fmt: skip
        return prep.wrap(dx), sum_dy, sum_dy_xhat
    sum_dy, sum_dy_xhat = _backward_reduce(prep, dy, mean, invstd)
    dx = _backward_elemt(prep, dy, mean, invstd, w, sum_dy, sum_dy_xhat, prep.count)
    return dx, sum_dy, sum_dy_xhat


def relu_elemt(
    prep: Prepared,
    mean: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    residual: np.ndarray | None,
) -> tuple[Array, np.ndarray]:
    """``y = relu((x - mean) * scale + shift [+ residual])`` and its 1-bit mask (``relu``)."""
    y = prep.empty()
    bits = np.empty(prep.bits_shape(), np.uint8)
    if prep.size:
        k = _k()
        res = prep.phys if residual is None else residual
        if prep.rows:
            k.rows_relu_elemt(
                prep.view(prep.phys), prep.view(res), residual is not None, mean, scale, shift,
                prep.view(y), bits,
            )  # fmt: skip
        else:
            cols = prep.columns
            k.cols_relu_elemt(
                prep.view(prep.phys), prep.view(res), residual is not None, cols(mean),
                cols(scale), cols(shift), prep.view(y), bits,
            )  # fmt: skip
    return prep.wrap(y), prep.out_vector(bits)


def relu_backward(prep: Prepared, dy: np.ndarray, relu_mask: Array) -> Array:
    """dy where the forward's ReLU passed its input, 0 elsewhere, in x's layout."""
    bits = relu_mask.numpy() if hasattr(relu_mask, "numpy") else relu_mask
    if bits.shape != prep.bits_shape() or bits.dtype != np.uint8:
        raise ValueError(
            f"relu_mask must be the numba fused forward's mask for this input (uint8 of shape "
            f"{prep.bits_shape()}), got {bits.dtype} of shape {bits.shape}"
        )
    dz = prep.empty()
    if prep.size:
        kernel = _k().rows_relu_backward if prep.rows else _k().cols_relu_backward
        kernel(_as_integers(prep.view(dy)), bits, _as_integers(prep.view(dz)))
    return prep.wrap(dz)


def _as_integers(a: np.ndarray) -> np.ndarray:
    """The same memory as integers of the same width (16-bit storage is already integer)."""
    return a if a.dtype.kind in "iu" else a.view(np.dtype(f"i{a.itemsize}"))
