"""Launchers of the masked stages (``masked_kernels``): the position mask in the kernels' memory
order, the channel shifts, and one or two launches per stage on a dense view."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .layout import (
    _blocks,
    _channel_vector,
    _device_guard,
    _elemt_grid,
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


@functools.cache
def _masked_kernels() -> Any:
    from . import masked_kernels

    return masked_kernels


def positions(view: _View, mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: one byte per position, (outer, inner) in memory order.
    ``_view`` keeps x in its logical order or with only the channel axis moved last in memory,
    so the mask's own logical order is the memory order of the positions either way."""
    if mask.device != view.x.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {view.x.device}")
    return mask.contiguous().view(torch.uint8).reshape(-1)


def _shift(view: _View, pos: torch.Tensor) -> torch.Tensor:
    """K per channel: x at the first real position (0 if not finite), float32, found on the
    device (no host synchronisation)."""
    plan = view.plan
    first = torch.argmax(pos)  # the first of the maxima: the first real position
    phys = torch.as_strided(
        view.x, (plan.outer, plan.channels, plan.inner),
        (plan.channels * plan.inner, plan.inner, 1), view.x.storage_offset(),
    )  # fmt: skip
    k = phys[first // plan.inner, :, first % plan.inner].to(torch.float32)
    return torch.where(torch.isfinite(k), k, torch.zeros_like(k)).contiguous()


def batch_stats(x: torch.Tensor, axis: int, mask: torch.Tensor) -> tuple[int, Any, Any]:
    """``(count, mean, var)`` over the real positions; count = m, the real positions."""
    view = _view(x, axis)
    plan = view.plan
    pos = positions(view, mask)
    count = int(pos.sum()) if pos.numel() else 0
    mean, var = _stats_vectors(2, plan.channels, x)
    if plan.channels == 0:
        return count, mean, var
    if count == 0:
        return count, mean.fill_(float("nan")), var.fill_(float("nan"))
    shift = _shift(view, pos)
    k = _masked_kernels()
    partials = _partials(view, 3)
    with _device_guard(x):
        k._masked_stats_partial_kernel[_reduction_grid(plan)](
            view.x, pos, shift, *partials, *_geometry(plan, plan.tiles_per_split),
            **_blocks(plan),
        )  # fmt: skip
        _launch_combine(k._masked_stats_combine_kernel, plan, *partials, shift, mean, var)
    return count, mean, var


def elemt(x, mean, invstd, weight, bias, axis, mask) -> torch.Tensor:
    view = _view(x, axis)
    plan = view.plan
    mean, invstd = _channel_vector(mean, view, "mean"), _channel_vector(invstd, view, "invstd")
    weight, bias = _optional_vector(weight, view, "weight"), _optional_vector(bias, view, "bias")
    y = torch.empty_like(view.x)
    if view.x.numel() == 0:
        return y
    with _device_guard(x):
        _masked_kernels()._masked_elemt_kernel[_elemt_grid(plan)](
            view.x, positions(view, mask), y, mean, invstd,
            mean if weight is None else weight, mean if bias is None else bias,
            *_geometry(plan, plan.elemt_tiles_per_program),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **_blocks(plan),
        )  # fmt: skip
    return y


def backward_reduce(dy, x, mean, invstd, axis, mask) -> tuple[torch.Tensor, torch.Tensor]:
    view = _view(x, axis)
    plan = view.plan
    dy = _in_layout_of(dy, view.x, "dy")
    mean, invstd = _channel_vector(mean, view, "mean"), _channel_vector(invstd, view, "invstd")
    sum_dy, sum_dy_xhat = _stats_vectors(2, plan.channels, x)
    if plan.channels == 0:
        return sum_dy, sum_dy_xhat
    if view.count == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_()
    partials = _partials(view, 2)
    with _device_guard(x):
        _masked_kernels()._masked_backward_reduce_partial_kernel[_reduction_grid(plan)](
            dy, view.x, positions(view, mask), mean, *partials,
            *_geometry(plan, plan.tiles_per_split), **_blocks(plan),
        )  # fmt: skip
        _launch_combine(
            _kernels()._backward_combine_kernel, plan, *partials, invstd, sum_dy, sum_dy_xhat
        )
    return sum_dy, sum_dy_xhat


def backward_elemt(
    dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, axis, mask, *,
    through_mean, through_var,
) -> torch.Tensor:  # fmt: skip
    view = _view(x, axis)
    plan = view.plan
    dy = _in_layout_of(dy, view.x, "dy")
    mean, invstd = _channel_vector(mean, view, "mean"), _channel_vector(invstd, view, "invstd")
    weight = _optional_vector(weight, view, "weight")
    sum_dy = _channel_vector(sum_dy, view, "sum_dy")
    sum_dy_xhat = _channel_vector(sum_dy_xhat, view, "sum_dy_xhat")
    dx = torch.empty_like(view.x)
    if view.x.numel() == 0:
        return dx
    with _device_guard(x):
        _masked_kernels()._masked_backward_elemt_kernel[_elemt_grid(plan)](
            dy, view.x, positions(view, mask), mean, invstd,
            mean if weight is None else weight, sum_dy, sum_dy_xhat, dx,
            # m = 0 only comes with both paths off (eval), which never divide by it.
            float(max(int(count), 1)), *_geometry(plan, plan.elemt_tiles_per_program),
            HAS_WEIGHT=weight is not None, THROUGH_MEAN=through_mean, THROUGH_VAR=through_var,
            **_blocks(plan),
        )  # fmt: skip
    return dx
