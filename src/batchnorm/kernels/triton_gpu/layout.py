"""Tensors as the kernels read them: dense (outer, C, inner) views, per-channel vectors, the
layout of gradients and residuals, and the packed ReLU mask's size."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .plan import Plan, _cdiv, _next_pow2, _plan_for


@dataclass(frozen=True)
class _View:
    """A dense tensor seen as (outer, C, inner) in memory order, with the plan for it."""

    x: torch.Tensor
    plan: Plan

    @property
    def count(self) -> int:
        return self.plan.outer * self.plan.inner


def _view(x: torch.Tensor, axis: int) -> _View:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an input of shape {tuple(x.shape)}")
    axis %= x.ndim  # the slicing below counts from the front
    channels = x.shape[axis]
    if not x.is_contiguous():
        if not x.movedim(axis, -1).is_contiguous():
            x = x.contiguous()
    if x.is_contiguous():
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis + 1 :])
    else:  # the channel axis is last in memory
        outer, inner = x.numel() // max(channels, 1), 1
    return _View(x, _plan_for(outer, channels, inner, x.device))


def _channel_vector(v: torch.Tensor, view: _View, name: str) -> torch.Tensor:
    """A per-channel vector as the kernels read it: ``ptr + c``, so dense (a slice or an
    expanded vector would be read at the wrong addresses or past its end)."""
    channels = view.plan.channels
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(v).__name__}")
    if v.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) for {channels} channels, got {tuple(v.shape)}"
        )
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != view.x.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {view.x.device}")
    return v.contiguous()


def _optional_vector(v: torch.Tensor | None, view: _View, name: str) -> torch.Tensor | None:
    return None if v is None else _channel_vector(v, view, name)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(
        sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if size > 1
    )


def _in_layout_of(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` with the memory layout of the dense tensor ``like`` (copied only if it differs)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.shape != like.shape:  # copy_ would broadcast, and the kernels would read past t
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input has shape {tuple(like.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")
    if _same_layout(t, like):
        return t
    out = torch.empty_like(like, dtype=t.dtype)
    out.copy_(t)
    return out


def _device_guard(x: torch.Tensor) -> Any:
    """Triton launches on the current device: make it x's, where it is not already."""
    device = x.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _stats_vectors(n: int, channels: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``n`` float32 per-channel vectors, dense rows of one allocation: on a GPU every call of
    the allocator is host time."""
    return torch.empty((n, channels), dtype=torch.float32, device=x.device).unbind(0)


def _channel_block(channels: int) -> int:
    return max(1, min(_next_pow2(channels), 256))


def _reduction_grid(plan: Plan) -> tuple[int, int]:
    return (plan.channel_blocks, plan.splits)


def _elemt_grid(plan: Plan) -> tuple[int, int]:
    return (plan.channel_blocks, _cdiv(plan.tiles, plan.elemt_tiles_per_program))


def _geometry(plan: Plan, tiles_per_program: int) -> tuple[int, ...]:
    """The tiling arguments every tiled kernel takes, in their order."""
    return (plan.outer, plan.channels, plan.inner, plan.tiles_i, plan.tiles, tiles_per_program)


def _partials(view: _View, n: int) -> tuple[torch.Tensor, ...]:
    """``n`` (splits, C) float32 buffers for the reduction programs' per-split partials, in one
    allocation."""
    shape = (n, view.plan.splits, view.plan.channels)
    return torch.empty(shape, dtype=torch.float32, device=view.x.device).unbind(0)


def _launch_combine(
    kernel: Any, plan: Plan, *args: Any, after: tuple[Any, ...] = (), **constants: Any
) -> None:
    """``kernel(*args, channels, splits, *after, **constants)``, one program per block of
    channels: the merge of the reduction programs' partials."""
    block_c = _channel_block(plan.channels)
    kernel[(_cdiv(plan.channels, block_c),)](
        *args, plan.channels, plan.splits, *after, BLOCK_C=block_c, **constants
    )


def _blocks(plan: Plan) -> dict[str, Any]:
    return {
        "BLOCK_O": plan.block_o,
        "BLOCK_C": plan.block_c,
        "BLOCK_I": plan.block_i,
        "INDEX_64": plan.index_64,
        "num_warps": plan.num_warps,
    }


def _empty_mask(view: _View) -> torch.Tensor:
    return torch.empty(view.plan.mask_bytes, dtype=torch.uint8, device=view.x.device)


def _check_mask(mask: torch.Tensor | None, view: _View) -> None:
    """The packed ReLU mask must be the one the fused forward wrote for this input's plan."""
    if mask is None:
        return
    want = view.plan.mask_bytes
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8 or mask.shape != (want,):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else mask
        raise ValueError(
            f"mask must be the packed uint8 ReLU mask of the fused forward for this input "
            f"(shape ({want},)), got {got}"
        )
    if mask.device != view.x.device or not mask.is_contiguous():
        raise ValueError("mask must be the fused forward's own (dense, same-device) mask")
