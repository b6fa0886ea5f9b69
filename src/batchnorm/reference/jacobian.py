"""Closed-form per-channel Jacobian of y with respect to x.

For one channel with m values (``seeds/001``, the quotient rule on x_hat)::

    dy_i/dx_l = gamma * invstd * (delta_il - 1/m - x_hat_i * x_hat_l / m)

Properties the tests check: it is symmetric; every row sums to 0 (a uniform shift of the batch
changes nothing: the "triangle" x -> x_hat and x -> mu -> x_hat cancels); with eps = 0, x_hat
spans its null space (scaling the batch changes nothing: section 3.3 of the paper).
"""

from __future__ import annotations

import array_api_compat

from .._xp import (
    Array,
    channel_axis,
    check_channel_vector,
    check_eps,
    check_floating,
    namespace,
    to_channel_rows,
    values_per_channel,
)
from .stats import batch_stats, inverse_std

__all__ = ["jacobian"]


def jacobian(x: Array, gamma: Array | None = None, *, axis: int = 1, eps: float = 1e-5) -> Array:
    """Shape (C, m, m); row/column order is that of ``_xp.to_channel_rows``. eps >= 0."""
    xp = namespace(x)
    check_floating(x, xp)
    axis = channel_axis(x.ndim, axis)
    eps = check_eps(eps, allow_zero=True)
    check_channel_vector(gamma, x.shape[axis], "weight (gamma)")
    if values_per_channel(tuple(x.shape), axis) == 0:
        raise ValueError(f"the Jacobian needs at least 1 value per channel, got shape {x.shape}")
    stats = batch_stats(x, axis)
    m = stats.count
    invstd = inverse_std(stats.var, eps)
    rows = xp.astype(to_channel_rows(x, axis, xp), stats.mean.dtype)
    x_hat = (rows - stats.mean[:, None]) * invstd[:, None]  # (C, m)
    eye = xp.eye(m, dtype=x_hat.dtype, device=array_api_compat.device(x))
    inner = eye[None, :, :] - 1.0 / m - x_hat[:, :, None] * x_hat[:, None, :] / m
    scale = invstd if gamma is None else xp.astype(gamma, invstd.dtype) * invstd
    return scale[:, None, None] * inner
