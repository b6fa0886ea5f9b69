"""The compact backward, split into the two stages every backend implements.

With ``g = gamma * dy`` (the paper's dl/dx_hat) and ``m`` values per channel::

    backward_reduce:  sum_dy      = sum(dy)                  -> dl/dbeta
                      sum_dy_xhat = sum(dy * x_hat)          -> dl/dgamma
    backward_elemt:   dx = gamma*invstd/m * (m*dy - sum_dy - x_hat*sum_dy_xhat)

``docs/derivation.md`` derives this from the staged chain rule in ``staged.py``; the tests tie
the two together. SyncBatchNorm all-reduces the two sums between the stages.

The moments-as-constants switches: ``through_mean=False`` drops ``-sum_dy`` (the path
x -> mu_B -> x_hat), ``through_var=False`` drops ``-x_hat*sum_dy_xhat`` (the path
x -> sigma_B^2 -> x_hat). What remains is exactly the gradient of a graph in which that moment
was computed from the batch but then detached (a constant), which is what the seed questions
propose and what the experiments show going wrong.
"""

from __future__ import annotations

from typing import NamedTuple

from .._xp import (
    Array,
    channel_axis,
    check_floating,
    check_same_library,
    check_same_shape,
    namespace,
    per_channel,
    reduce_axes,
)
from .forward import normalize

__all__ = [
    "Grads",
    "backward_reduce",
    "backward_elemt",
    "check_grad_output",
]


class Grads(NamedTuple):
    """Gradients of the loss w.r.t. ``x``, ``gamma`` and ``beta``.

    ``dgamma``/``dbeta`` are in the compute dtype; when the forward had no affine transform they
    are the gradients w.r.t. an implicit gamma = 1, beta = 0 (callers discard them).
    """

    dx: Array
    dgamma: Array
    dbeta: Array


def check_grad_output(dy: Array, x: Array) -> None:
    check_same_library(dy, x, "grad_output (dy)")
    xp = namespace(dy)
    check_floating(dy, xp, "grad_output (dy)")
    check_same_shape(dy, x, "grad_output (dy)", "input (x)")


def backward_reduce(
    dy: Array, x: Array, mean: Array, invstd: Array, axis: int
) -> tuple[Array, Array]:
    """``(sum_dy, sum_dy_xhat)`` per channel, accumulated in the dtype of ``mean``; ``axis``
    as in ``batch_stats``."""
    xp = namespace(dy, x)
    axis = channel_axis(x.ndim, axis)
    axes = reduce_axes(x.ndim, axis)
    dyc = xp.astype(dy, mean.dtype)
    x_hat = normalize(x, mean, invstd, axis)
    return xp.sum(dyc, axis=axes), xp.sum(dyc * x_hat, axis=axes)


def backward_elemt(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    sum_dy: Array,
    sum_dy_xhat: Array,
    count: int,
    axis: int,
    *,
    through_mean: bool = True,
    through_var: bool = True,
) -> Array:
    """``dx`` from the two sums; ``count`` is m (the global m under SyncBatchNorm); ``axis``
    as in ``batch_stats``."""
    xp = namespace(dy, x)
    nd = x.ndim
    axis = channel_axis(nd, axis)
    dyc = xp.astype(dy, mean.dtype)
    inner = dyc
    if through_mean:
        inner = inner - per_channel(sum_dy / count, nd, axis, xp)
    if through_var:
        x_hat = normalize(x, mean, invstd, axis)
        inner = inner - x_hat * per_channel(sum_dy_xhat / count, nd, axis, xp)
    scale = invstd if gamma is None else xp.astype(gamma, mean.dtype) * invstd
    return xp.astype(inner * per_channel(scale, nd, axis, xp), x.dtype)
