"""Masked batch norm's math: the stages over the real positions only (padded sequences).

``mask`` has the input's shape without the channel axis (True = a real value), and m, the
count, is the number of real positions (the same for every channel). Over those m values the
stages are exactly the plain ones (``stats``, ``forward``, ``backward``); padded positions are
never read into a sum (``where``, not a product, so a NaN or inf there changes nothing), the
output is 0 there and so is the input gradient. The two-pass centred variance is kept:
``mean = K + sum(x - K)/m`` with K the value at the first real position (as ``stats`` shifts
by a value of the data), then ``var = mean(e^2) - mean(e)^2`` with ``e = x - mean`` over the
real positions, which also corrects the first pass's rounding (Chan, Golub & LeVeque 1983).

They are the ``mask=`` option of ``ReferenceStages`` (``stages.py``) and the math every
backend's masked stages must match (tests/kernels/test_contract.py);
``batch_norm_train(..., mask=)`` and ``backward`` compose any backend's. The torch layers run
a backend without the option by gathering the real positions instead
(``batchnorm.torch.masked``), and the two agree (tests/reference/test_masked_math.py).
"""

from __future__ import annotations

from typing import Any

from .._xp import Array, check_same_library, compute_dtype, namespace, per_channel, reduce_axes
from .stats import BatchStats

__all__ = [
    "check_mask",
    "masked_backward_elemt",
    "masked_backward_reduce",
    "masked_batch_stats",
    "masked_elemt",
]


def check_mask(mask: Any, x: Array, axis: int) -> None:
    """A boolean array of ``x``'s shape without the channel axis, or a clear error."""
    want = tuple(s for i, s in enumerate(x.shape) if i != axis)
    dtype = getattr(mask, "dtype", None)
    if dtype is None or str(dtype).removeprefix("torch.") not in ("bool",):
        raise TypeError(f"mask must be a boolean array (True = a real value), got dtype {dtype}")
    check_same_library(mask, x, "mask")
    if tuple(mask.shape) != want:
        raise ValueError(
            f"mask must have the input's shape without the channel axis, {want}, for input of "
            f"shape {tuple(x.shape)}; got {tuple(mask.shape)}"
        )


def _real(mask: Array, x: Array, axis: int, xp: Any) -> Array:
    """The mask broadcast along the channel axis."""
    return xp.expand_dims(mask, axis=axis)


def real_positions(mask: Array, xp: Any) -> int | Array:
    """m as a Python int; under ``jax.jit`` (no value on the host) the traced count itself."""
    total = xp.sum(xp.astype(mask, xp.int64))
    try:
        return int(total)
    except TypeError:  # a tracer: the caller cannot check it, the arithmetic still works
        return total


def _first_real(xc: Array, mask: Array, axis: int, xp: Any) -> Array:
    """The (C,) values of ``xc`` at the first real position (the first if there is none).

    The position stays an array (no host read), so that this traces under ``jax.jit``."""
    rest = [i for i in range(xc.ndim) if i != axis]
    rows = xp.reshape(xp.permute_dims(xc, (axis, *rest)), (xc.shape[axis], -1))
    if rows.shape[1] == 0:
        return xp.zeros((xc.shape[axis],), dtype=xc.dtype)
    first = xp.argmax(xp.astype(xp.reshape(mask, (-1,)), xp.int32))
    return xp.take(rows, xp.reshape(first, (1,)), axis=1)[:, 0]


def masked_batch_stats(x: Array, mask: Array, axis: int) -> BatchStats:
    """Mean and biased variance of every channel over the real positions; count = m."""
    xp = namespace(x, mask)
    axes = reduce_axes(x.ndim, axis)
    real = _real(mask, x, axis, xp)
    xc = xp.astype(x, compute_dtype(x.dtype, xp))
    zeros = xp.zeros_like(xc)
    count = real_positions(mask, xp)
    # The first pass sums x - K, K the value at the first real position (as reference.stats
    # shifts by the first value: x = 1e4 + N(0, 1) in float32 then sums O(1) numbers).
    first = _first_real(xc, mask, axis, xp)
    shift = xp.where(xp.isfinite(first), first, xp.zeros_like(first))
    centred = xp.where(real, xc - per_channel(shift, x.ndim, axis, xp), zeros)
    mean = shift + xp.sum(centred, axis=axes) / count
    centred = xp.where(real, xc - per_channel(mean, x.ndim, axis, xp), zeros)
    residual = xp.sum(centred, axis=axes) / count
    var = xp.sum(centred * centred, axis=axes) / count - residual * residual
    var = xp.where(var < 0, xp.zeros_like(var), var)
    return BatchStats(count, mean + residual, var)


def _x_hat(x: Array, real: Array, mean: Array, invstd: Array, axis: int, xp: Any) -> Array:
    mean_c = per_channel(mean, x.ndim, axis, xp)
    # The padding is replaced before any arithmetic: reverse-mode autodiff (jax.grad, a
    # double backward) multiplies the derivative of (x - mean) * invstd by the zero cotangent
    # the final select gives the padding, and 0 * NaN (or inf) padding is NaN, everywhere.
    xc = xp.where(real, xp.astype(x, mean.dtype), mean_c)
    x_hat = (xc - mean_c) * per_channel(invstd, x.ndim, axis, xp)
    return xp.where(real, x_hat, xp.zeros_like(x_hat))


def masked_elemt(x, mask, mean, invstd, gamma, beta, axis) -> Array:
    """``y = gamma * x_hat + beta`` at the real positions, 0 at the padded ones, x's dtype."""
    xp = namespace(x, mask)
    real = _real(mask, x, axis, xp)
    y = _x_hat(x, real, mean, invstd, axis, xp)
    if gamma is not None:
        y = y * per_channel(xp.astype(gamma, mean.dtype), x.ndim, axis, xp)
    if beta is not None:
        y = y + per_channel(xp.astype(beta, mean.dtype), x.ndim, axis, xp)
    return xp.astype(xp.where(real, y, xp.zeros_like(y)), x.dtype)


def masked_backward_reduce(dy, x, mask, mean, invstd, axis) -> tuple[Array, Array]:
    """``(sum_dy, sum_dy_xhat)`` over the real positions."""
    xp = namespace(dy, x, mask)
    axes = reduce_axes(x.ndim, axis)
    real = _real(mask, x, axis, xp)
    dyc = xp.astype(dy, mean.dtype)
    dyc = xp.where(real, dyc, xp.zeros_like(dyc))
    x_hat = _x_hat(x, real, mean, invstd, axis, xp)
    return xp.sum(dyc, axis=axes), xp.sum(dyc * x_hat, axis=axes)


def masked_backward_elemt(
    dy, x, mask, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, axis, *,
    through_mean=True, through_var=True,
) -> Array:  # fmt: skip
    """``dx`` at the real positions (the plain formula with m = count), 0 at the padded ones."""
    xp = namespace(dy, x, mask)
    nd = x.ndim
    real = _real(mask, x, axis, xp)
    inner = xp.astype(dy, mean.dtype)
    if through_mean:
        inner = inner - per_channel(sum_dy / count, nd, axis, xp)
    if through_var:
        inner = inner - _x_hat(x, real, mean, invstd, axis, xp) * per_channel(
            sum_dy_xhat / count, nd, axis, xp
        )
    scale = invstd if gamma is None else xp.astype(gamma, mean.dtype) * invstd
    dx = inner * per_channel(scale, nd, axis, xp)
    return xp.astype(xp.where(real, dx, xp.zeros_like(dx)), x.dtype)
