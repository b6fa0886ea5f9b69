"""Launchers: each stage of batch norm as one or two kernel launches on a dense view.

The kernels (with the math above each) are in ``kernels``, imported on first use, so this
module imports without triton and the backend can say that triton is missing.
"""

from __future__ import annotations

import math

import torch

from .layout import (
    _blocks,
    _channel_block,
    _channel_vector,
    _check_mask,
    _device_guard,
    _elemt_grid,
    _empty_mask,
    _geometry,
    _in_layout_of,
    _launch_combine,
    _optional_vector,
    _partials,
    _reduction_grid,
    _stats_vectors,
    _View,
    _view,
)
from .runtime import _kernels


def _stats(view: _View, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan, x = view.plan, view.x
    mean, var, invstd = _stats_vectors(3, plan.channels, x)
    if plan.channels == 0:
        return mean, var, invstd
    if view.count == 0:  # the mean of no values, as the reference gives it
        for v in (mean, var, invstd):
            v.fill_(math.nan)
        return mean, var, invstd
    k = _kernels()
    partials = _partials(view, 3)  # count, mean, M2
    with _device_guard(x):
        k._stats_partial_kernel[_reduction_grid(plan)](
            x, *partials, *_geometry(plan, plan.tiles_per_split), **_blocks(plan)
        )
        _launch_combine(
            k._stats_combine_kernel, plan, *partials, x, plan.inner, mean, var, invstd,
            after=(float(eps),), INDEX_64=plan.index_64,
        )  # fmt: skip
    return mean, var, invstd


def batch_stats(
    x: torch.Tensor, axis: int, eps: float = 0.0
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stats stage: ``(count, mean, var, invstd)``, float32, var biased.

    With ``eps = 0`` invstd is inf for a constant channel; pass the real eps to use it.
    """
    view = _view(x, axis)
    return (view.count, *_stats(view, eps))


def _elemt(
    view: _View,
    mean: torch.Tensor,
    invstd_or_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    from_var: bool,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    plan, x = view.plan, view.x
    mean = _channel_vector(mean, view, "running_mean" if from_var else "mean")
    invstd_or_var = _channel_vector(invstd_or_var, view, "running_var" if from_var else "invstd")
    weight = _optional_vector(weight, view, "weight")
    bias = _optional_vector(bias, view, "bias")
    if residual is not None:
        residual = _in_layout_of(residual, x, "residual")
    y = torch.empty_like(x)
    mask = _empty_mask(view) if relu else None
    if x.numel() == 0:
        return y, mask
    dummy = mean
    with _device_guard(x):
        _kernels()._forward_elemt_kernel[_elemt_grid(plan)](
            x,
            y,
            mean,
            invstd_or_var,
            dummy if weight is None else weight,
            dummy if bias is None else bias,
            x if residual is None else residual,
            y if mask is None else mask,
            *_geometry(plan, plan.elemt_tiles_per_program),
            float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            FROM_VAR=from_var,
            HAS_RESIDUAL=residual is not None,
            RELU=relu,
            PACK_I=plan.pack_i,
            **_blocks(plan),
        )
    return y, mask


def elemt(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    axis: int,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The elemt stage ``y = (x - mean) * invstd * gamma + beta`` [+ residual] [ReLU].

    Returns ``(y, mask)``; ``mask`` is the packed 1-bit ReLU mask (``None`` without ``relu``).
    """
    return _elemt(
        _view(x, axis),
        mean,
        invstd,
        weight,
        bias,
        from_var=False,
        eps=0.0,
        residual=residual,
        relu=relu,
    )


def forward_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    axis: int,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """stats -> combine -> elemt. Returns ``(y, mean, var, invstd, mask)``; var is biased."""
    view = _view(x, axis)
    mean, var, invstd = _stats(view, eps)
    y, mask = _elemt(
        view,
        mean,
        invstd,
        weight,
        bias,
        from_var=False,
        eps=eps,
        residual=residual,
        relu=relu,
    )
    return y, mean, var, invstd, mask


def forward_infer(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    axis: int,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Algorithm 2 in one pass; invstd is formed from ``running_var`` inside the kernel."""
    return _elemt(
        _view(x, axis),
        running_mean,
        running_var,
        weight,
        bias,
        from_var=True,
        eps=eps,
        residual=residual,
        relu=relu,
    )


def _backward_reduce(
    view: _View,
    dy: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan, x = view.plan, view.x
    mean, invstd = _channel_vector(mean, view, "mean"), _channel_vector(invstd, view, "invstd")
    _check_mask(mask, view)
    sum_dy, sum_dy_xhat = _stats_vectors(2, plan.channels, x)
    if plan.channels == 0:
        return sum_dy, sum_dy_xhat
    if view.count == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_()
    k = _kernels()
    partials = _partials(view, 2)  # sum_dy, sum(dy * (x - mean))
    with _device_guard(x):
        k._backward_reduce_partial_kernel[_reduction_grid(plan)](
            dy,
            x,
            x if mask is None else mask,
            mean,
            *partials,
            *_geometry(plan, plan.tiles_per_split),
            HAS_MASK=mask is not None,
            PACK_I=plan.pack_i,
            **_blocks(plan),
        )
        _launch_combine(k._backward_combine_kernel, plan, *partials, invstd, sum_dy, sum_dy_xhat)
    return sum_dy, sum_dy_xhat


def backward_reduce(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    axis: int,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_dy, sum_dy_xhat)`` per channel, float32; with ``mask``, dy is ReLU-masked first."""
    view = _view(x, axis)
    return _backward_reduce(view, _in_layout_of(dy, view.x, "dy"), mean, invstd, mask)


def _backward_elemt(
    view: _View,
    dy: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    *,
    mask: torch.Tensor | None,
    through_mean: bool,
    through_var: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    plan, x = view.plan, view.x
    if residual_grad and mask is None:
        raise ValueError("residual_grad needs the ReLU mask of the fused forward")
    mean, invstd = _channel_vector(mean, view, "mean"), _channel_vector(invstd, view, "invstd")
    weight = _optional_vector(weight, view, "weight")
    sum_dy = _channel_vector(sum_dy, view, "sum_dy")
    sum_dy_xhat = _channel_vector(sum_dy_xhat, view, "sum_dy_xhat")
    _check_mask(mask, view)
    dx = torch.empty_like(x)
    dresidual = torch.empty_like(x, dtype=dy.dtype) if residual_grad else None
    if x.numel() == 0:
        return dx, dresidual
    with _device_guard(x):
        _kernels()._backward_elemt_kernel[_elemt_grid(plan)](
            dy,
            x,
            x if mask is None else mask,
            mean,
            invstd,
            mean if weight is None else weight,
            sum_dy,
            sum_dy_xhat,
            dx,
            dx if dresidual is None else dresidual,
            float(count),
            *_geometry(plan, plan.elemt_tiles_per_program),
            HAS_WEIGHT=weight is not None,
            HAS_MASK=mask is not None,
            WRITE_DRESIDUAL=residual_grad,
            THROUGH_MEAN=through_mean,
            THROUGH_VAR=through_var,
            PACK_I=plan.pack_i,
            **_blocks(plan),
        )
    return dx, dresidual


def backward_elemt(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    axis: int,
    *,
    mask: torch.Tensor | None = None,
    through_mean: bool = True,
    through_var: bool = True,
    residual_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dresidual)``; ``count`` is m (the global m under SyncBatchNorm).

    ``dresidual`` (the masked dy) is computed only with ``residual_grad`` (needs ``mask``).
    """
    view = _view(x, axis)
    return _backward_elemt(
        view,
        _in_layout_of(dy, view.x, "dy"),
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        count,
        mask=mask,
        through_mean=through_mean,
        through_var=through_var,
        residual_grad=residual_grad,
    )


def backward_train(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    axis: int,
    *,
    mask: torch.Tensor | None = None,
    through_mean: bool = True,
    through_var: bool = True,
    residual_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """reduce -> combine -> elemt. Returns ``(dx, dweight, dbias, dresidual)``.

    ``dweight = sum_dy_xhat`` and ``dbias = sum_dy`` (float32); ``dresidual`` as in
    :func:`backward_elemt`.
    """
    view = _view(x, axis)
    dy = _in_layout_of(dy, view.x, "dy")
    sum_dy, sum_dy_xhat = _backward_reduce(view, dy, mean, invstd, mask)
    dx, dresidual = _backward_elemt(
        view,
        dy,
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        view.count,
        mask=mask,
        through_mean=through_mean,
        through_var=through_var,
        residual_grad=residual_grad,
    )
    return dx, sum_dy_xhat, sum_dy, dresidual


#: Buffer dtypes the running-statistics kernel writes (float64 buffers take the torch ops).
_RUNNING_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Compiler options of that kernel's launch: without FMA contraction each product is rounded
#: as the reference's torch op rounds it (a test reads the PTX).
RUNNING_UPDATE_OPTIONS = {"enable_fp_fusion": False}


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    weight_new: float,
) -> bool:
    """Fold one batch's float32 ``mean`` and biased ``var`` (``count`` values per channel) into
    the buffers in one launch: ``reference.update_running_stats``'s values, a non-finite
    channel keeping its old ones, no host read. False (nothing written) for what the kernel
    does not take: float64 or non-dense buffers, statistics not float32 on the same device,
    ``count`` < 2."""
    channels = running_mean.shape[0] if running_mean.dim() == 1 else -1
    vectors = (running_mean, running_var, mean, var)
    if (
        channels < 0
        or isinstance(count, bool)
        or not isinstance(count, int)
        or count < 2
        or running_mean.dtype not in _RUNNING_DTYPES
        or running_var.dtype not in _RUNNING_DTYPES
        or mean.dtype != torch.float32
        or var.dtype != torch.float32
        or any(v.shape != (channels,) or not v.is_contiguous() for v in vectors)
        or any(v.device != running_mean.device for v in vectors)
    ):
        return False
    if channels == 0:
        return True
    w = float(weight_new)
    block = _channel_block(channels)
    with _device_guard(running_mean):
        _kernels()._running_update_kernel[(-(-channels // block),)](
            running_mean, running_var, mean, var, channels, 1.0 - w, w, count / (count - 1),
            BLOCK_C=block, **RUNNING_UPDATE_OPTIONS,
        )  # fmt: skip
    # Written in place as an ATen op would be: a graph that saved a buffer then refuses to
    # backpropagate with the new values, instead of using them unawares.
    torch.autograd.graph.increment_version((running_mean, running_var))
    return True
