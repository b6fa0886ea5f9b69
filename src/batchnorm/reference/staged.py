"""The paper's backward, line by line (Ioffe & Szegedy 2015, section 3, the page-4 equations).

This is the *proof*; ``backward.py`` is the *runtime*. Every intermediate is returned so that
``batchnorm explain`` can print them and the tests can tie the two forms together. With
``g_i = dl/dx_hat_i``::

    dl/dx_hat_i = dl/dy_i * gamma
    dl/dvar     = sum_i dl/dx_hat_i * (x_i - mu) * (-1/2) * (var + eps)^(-3/2)
    dl/dmu      = sum_i dl/dx_hat_i * (-1/sqrt(var + eps))  +  dl/dvar * sum_i -2 (x_i - mu) / m
    dl/dx_i     = dl/dx_hat_i / sqrt(var + eps) + dl/dvar * 2 (x_i - mu) / m + dl/dmu / m
    dl/dgamma   = sum_i dl/dy_i * x_hat_i
    dl/dbeta    = sum_i dl/dy_i

The second term of dl/dmu multiplies ``sum_i (x_i - mu)``, which is 0 by the definition of mu:
it is computed (``dl_dmean_vanishing``) and shown to vanish rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._xp import (
    Array,
    channel_axis,
    check_channel_vector,
    check_eps,
    check_floating,
    namespace,
    per_channel,
)
from .._xp import reduce_axes as _reduce_axes
from .backward import check_grad_output
from .stats import batch_stats, inverse_std

__all__ = ["Staged", "staged_backward"]


@dataclass(frozen=True)
class Staged:
    """Every quantity of the staged derivation, per element or per channel ((C,) shaped)."""

    mean: Array
    var: Array
    invstd: Array
    x_hat: Array
    dl_dxhat: Array
    dl_dvar: Array
    dl_dmean_direct: Array
    dl_dmean_vanishing: Array
    dl_dmean: Array
    dl_dx: Array
    dl_dgamma: Array
    dl_dbeta: Array


def staged_backward(
    dy: Array,
    x: Array,
    gamma: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> Staged:
    """Run the paper's chain rule stage by stage. ``eps = 0`` is allowed (for the analysis)."""
    xp = namespace(x, dy)
    check_floating(x, xp)
    axis = channel_axis(x.ndim, axis)
    eps = check_eps(eps, allow_zero=True)
    check_grad_output(dy, x)
    check_channel_vector(gamma, x.shape[axis], "weight (gamma)")
    nd, axes = x.ndim, _reduce_axes(x.ndim, axis)

    def bc(v: Array) -> Array:
        return per_channel(v, nd, axis, xp)

    stats = batch_stats(x, axis)
    mean, var, m = stats.mean, stats.var, stats.count
    invstd = inverse_std(var, eps)
    xc = xp.astype(x, mean.dtype)
    dyc = xp.astype(dy, mean.dtype)
    centred = xc - bc(mean)  # x_i - mu_B
    x_hat = centred * bc(invstd)

    dl_dxhat = dyc if gamma is None else dyc * bc(xp.astype(gamma, mean.dtype))
    dl_dvar = xp.sum(dl_dxhat * centred, axis=axes) * (-0.5) * invstd**3
    dl_dmean_direct = xp.sum(dl_dxhat * (-bc(invstd)), axis=axes)
    # Zero up to rounding: sum_i (x_i - mu_B) = 0 by the definition of mu_B.
    dl_dmean_vanishing = dl_dvar * xp.sum(-2.0 * centred, axis=axes) / m
    dl_dmean = dl_dmean_direct + dl_dmean_vanishing
    dl_dx = dl_dxhat * bc(invstd) + bc(dl_dvar) * 2.0 * centred / m + bc(dl_dmean) / m
    dl_dgamma = xp.sum(dyc * x_hat, axis=axes)
    dl_dbeta = xp.sum(dyc, axis=axes)
    return Staged(
        mean,
        var,
        invstd,
        x_hat,
        dl_dxhat,
        dl_dvar,
        dl_dmean_direct,
        dl_dmean_vanishing,
        dl_dmean,
        xp.astype(dl_dx, x.dtype),
        dl_dgamma,
        dl_dbeta,
    )
