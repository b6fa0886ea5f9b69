"""Training forward (Algorithm 1), inference forward (Algorithm 2) and the fold to (scale, shift).

Symbols follow Ioffe & Szegedy (2015): ``mean`` = mu_B, ``var`` = sigma_B^2 (biased),
``invstd`` = 1/sqrt(sigma_B^2 + eps), ``x_hat`` = (x - mu_B) * invstd, ``y`` = gamma*x_hat + beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._xp import (
    Array,
    channel_axis,
    check_channel_vector,
    check_eps,
    check_floating,
    check_same_library,
    compute_dtype,
    namespace,
    per_channel,
    values_per_channel,
)
from .stats import inverse_std

__all__ = [
    "Saved",
    "check_input",
    "normalize",
    "elemt",
    "batch_norm_infer_unchecked",
    "fold",
]


@dataclass(frozen=True)
class Saved:
    """What the training forward keeps for the backward.

    ``x`` (not x_hat) is kept: x_hat is recomputed from ``x, mean, invstd`` in one fused pass,
    which is what the fast backends do too. ``mean``, ``var`` and ``invstd`` are in the compute
    dtype (float32 or float64). ``count`` is m, the number of values per channel.
    """

    x: Array
    mean: Array
    var: Array
    invstd: Array
    gamma: Array | None
    axis: int
    eps: float
    count: int
    #: The stages that ran the forward (``backward`` runs the same backend's by default);
    #: None for the reference's own.
    backend: Any = None
    #: The mask of a masked forward (``count`` is then the number of real positions).
    mask: Any = None


def check_input(
    x: Array,
    axis: int,
    eps: float,
    *,
    training: bool,
    gamma: Array | None = None,
    beta: Array | None = None,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    need_running: bool = False,
) -> tuple[Any, int]:
    """Validate every argument of a forward; returns ``(xp, axis)``. Raises before any work.

    Inference (``training=False`` with no batch statistics to fall back on) is the callers'
    business: ``batch_norm_infer`` and ``backward_infer`` pass ``need_running=True``."""
    if need_running and (running_mean is None or running_var is None):
        raise ValueError(
            "inference normalises with running_mean and running_var; got "
            f"running_mean={'None' if running_mean is None else 'an array'}, "
            f"running_var={'None' if running_var is None else 'an array'}"
        )
    xp = namespace(x)
    check_floating(x, xp)
    axis = channel_axis(x.ndim, axis)
    # Training needs eps > 0 (a constant channel has variance 0); inference divides by the
    # running variance, as PyTorch, which accepts eps = 0 there.
    check_eps(eps, allow_zero=not training)
    channels = x.shape[axis]
    for v, name in (
        (gamma, "weight (gamma)"),
        (beta, "bias (beta)"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        check_channel_vector(v, channels, name)
        if v is not None:
            check_same_library(v, x, name)
    if training:
        m = values_per_channel(tuple(x.shape), axis)
        if m < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of shape "
                f"{tuple(x.shape)} with channel axis {axis} ({m} value(s) per channel)"
            )
    return xp, axis


def normalize(x: Array, mean: Array, invstd: Array, axis: int) -> Array:
    """x_hat = (x - mean) * invstd in the compute dtype of ``mean``."""
    xp = namespace(x)
    xc = xp.astype(x, mean.dtype)
    return (xc - per_channel(mean, x.ndim, axis, xp)) * per_channel(invstd, x.ndim, axis, xp)


def elemt(
    x: Array,
    mean: Array,
    invstd: Array,
    gamma: Array | None,
    beta: Array | None,
    axis: int,
    *,
    out_dtype: Any = None,
) -> Array:
    """The elementwise stage: ``y = gamma * (x - mean) * invstd + beta``, returned in x's dtype
    (or ``out_dtype``: the fused activations keep the compute dtype until their last step)."""
    xp = namespace(x)
    y = normalize(x, mean, invstd, axis)
    if gamma is not None:
        y = y * per_channel(xp.astype(gamma, mean.dtype), x.ndim, axis, xp)
    if beta is not None:
        y = y + per_channel(xp.astype(beta, mean.dtype), x.ndim, axis, xp)
    return xp.astype(y, x.dtype if out_dtype is None else out_dtype)


def batch_norm_infer_unchecked(
    x: Array,
    running_mean: Array,
    running_var: Array,
    gamma: Array | None,
    beta: Array | None,
    axis: int,
    eps: float,
) -> Array:
    """Algorithm 2 on validated arguments: the reference's ``forward_infer`` stage."""
    xp = namespace(x)
    cdt = compute_dtype(x.dtype, xp)
    mean = xp.astype(running_mean, cdt)
    invstd = inverse_std(xp.astype(running_var, cdt), eps)
    return elemt(x, mean, invstd, gamma, beta, axis)


def fold(
    running_mean: Array,
    running_var: Array,
    gamma: Array | None = None,
    beta: Array | None = None,
    *,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    """Per-channel ``(scale, shift)`` with ``y = scale * x + shift`` (Algorithm 2, line 11).

    ``scale = gamma / sqrt(Var[x] + eps)``, ``shift = beta - scale * E[x]``. Useful for folding
    batch norm into the preceding convolution at inference.
    """
    xp = namespace(running_mean, running_var, gamma, beta)
    check_eps(eps, allow_zero=True)  # as batch_norm_infer, which fold reproduces
    if running_mean.ndim != 1:
        raise ValueError(
            f"running_mean must be a vector (C,), got shape {tuple(running_mean.shape)}"
        )
    channels = running_mean.shape[0]
    for v, name in (
        (running_mean, "running_mean"),
        (running_var, "running_var"),
        (gamma, "weight (gamma)"),
        (beta, "bias (beta)"),
    ):
        check_channel_vector(v, channels, name)
    scale = inverse_std(running_var, eps)
    if gamma is not None:
        scale = xp.astype(gamma, scale.dtype) * scale
    shift = -scale * running_mean
    if beta is not None:
        shift = shift + xp.astype(beta, shift.dtype)
    return scale, shift
