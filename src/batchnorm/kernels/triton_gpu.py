"""Triton GPU backend: plain launchers for the batch-norm stages and :class:`TritonBackend`.

The kernels themselves (with the math above each) are in ``_triton_kernels``; they are imported
on first use, so this module imports without triton and :meth:`TritonBackend.unavailable_reason`
can say that triton is missing.

Layouts: a tensor is run in place when it is dense with its channel axis either "NCHW-style"
(contiguous, any rank, including (N, C)) or last in memory (``torch.channels_last``,
``channels_last_3d``, or a (N, ..., C) tensor with ``axis=-1``). Other strides are copied to
contiguous first. Outputs have the layout of the input. Gradients and residuals that arrive in
another layout are copied into the input's layout.

Dtypes: float32, float16 and bfloat16 in, float32 arithmetic, float32 ``mean``/``var``/
``invstd``/``sum_dy``/``sum_dy_xhat``, output in the input dtype. float64 is not run here (say
``backend="reference"``, or let ``"auto"`` fall back).

Determinism: the reductions split each channel over a 2-D grid (channel blocks x splits) and merge
the float32 partials in a fixed order without atomics, so a result is bitwise reproducible for a
given shape, layout and device. The split count depends on the device's SM count, so results may
differ in the last bits between different GPUs.

With ``TRITON_INTERPRET=1`` set before triton is first imported, the kernels run on CPU tensors in
Triton's interpreter (slowly): that is how CI tests them without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Plan",
    "TritonBackend",
    "make_plan",
    "tuning",
    "is_interpreter",
    "triton_unavailable_reason",
    "batch_stats",
    "elemt",
    "forward_train",
    "forward_infer",
    "backward_reduce",
    "backward_elemt",
    "backward_train",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Elements per tile (registers per program) and reduction programs per SM on a GPU. Starting
#: points to be tuned on a GPU with ``benchmarks/gpu_bench.py``.
DEFAULT_TILE_ELEMS = 2048
DEFAULT_PROGRAMS_PER_SM = 8
#: Widest tile along a contiguous inner axis, and along the channel axis when channels-last.
MAX_BLOCK_I = 1024
MAX_BLOCK_C = 64
_MAX_GRID_1 = 65535  # CUDA's limit on the second grid dimension
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- triton, lazily


@functools.cache
def _kernels() -> Any:
    from . import _triton_kernels

    return _triton_kernels


def triton_unavailable_reason() -> str | None:
    """``None`` if triton can be imported, else why not."""
    try:
        _kernels()
    except ImportError as exc:
        return f"triton is not installed or cannot be imported ({exc})"
    return None


def is_interpreter() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if triton_unavailable_reason() is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernels()._stats_partial_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """How the (outer, C, inner) view of a tensor is cut into tiles and programs.

    A tile is ``[block_o, block_c, block_i]``; ``splits`` reduction programs share each block of
    ``block_c`` channels, walking ``tiles_per_split`` consecutive tiles each. ``pack_i`` says along
    which axis the ReLU mask packs 8 bits into a byte (``inner`` if True, else ``outer``).
    """

    outer: int
    channels: int
    inner: int
    block_o: int
    block_c: int
    block_i: int
    splits: int
    num_warps: int = 4

    @property
    def tiles_i(self) -> int:
        return _cdiv(self.inner, self.block_i)

    @property
    def tiles(self) -> int:
        return _cdiv(self.outer, self.block_o) * self.tiles_i

    @property
    def channel_blocks(self) -> int:
        return _cdiv(self.channels, self.block_c)

    @property
    def tiles_per_split(self) -> int:
        return _cdiv(self.tiles, self.splits)

    @property
    def elemt_tiles_per_program(self) -> int:
        return _cdiv(self.tiles, _MAX_GRID_1)

    @property
    def pack_i(self) -> bool:
        return self.inner >= 8

    @property
    def mask_bytes(self) -> int:
        if self.pack_i:
            return self.outer * self.channels * _cdiv(self.inner, 8)
        return _cdiv(self.outer, 8) * self.channels * self.inner

    @property
    def index_64(self) -> bool:
        # Offsets of padded tiles and of the mask's rows may run a tile past the end.
        padded_outer = _cdiv(self.outer, self.block_o) * self.block_o
        return padded_outer * self.channels * max(self.inner, self.block_i) > _INT32_MAX


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pick_block_i(inner: int, cap: int) -> int:
    """Widest power of two <= cap whose padding of ``inner`` is within 1/6 of the least padding.

    Wider tiles mean longer contiguous loads; the least-padding choice keeps idle lanes few
    (7x7 = 49 -> 64, 14x14 = 196 -> 32, 56x56 = 3136 -> 512).
    """
    if inner < 8:
        return _next_pow2(inner)
    candidates = [1 << k for k in range(3, cap.bit_length()) if (1 << k) <= cap]
    padded = {b: _cdiv(inner, b) * b for b in candidates}
    least = min(padded.values())
    return max(b for b in candidates if padded[b] * 6 <= least * 7)


def make_plan(
    outer: int,
    channels: int,
    inner: int,
    *,
    tile_elems: int = DEFAULT_TILE_ELEMS,
    programs: int = 1024,
) -> Plan:
    """Choose tile shape and split count; ``programs`` is the reduction grid size aimed at."""
    if tile_elems < 8 or tile_elems & (tile_elems - 1):
        raise ValueError(f"tile_elems must be a power of two >= 8, got {tile_elems}")
    if programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    if inner == 1:  # channels-last or (N, C): contiguous along the channels
        block_i = 1
        block_c = max(1, min(_next_pow2(channels), MAX_BLOCK_C, tile_elems // 8))
        block_o = max(8, min(tile_elems // block_c, _next_pow2(outer)))
    else:  # NCHW-style: contiguous along the spatial positions of one channel
        block_c = 1
        block_i = _pick_block_i(inner, min(MAX_BLOCK_I, tile_elems))
        block_o = max(1, min(tile_elems // block_i, _next_pow2(outer)))
        if inner < 8:  # the mask packs along ``outer`` then
            block_o = max(8, block_o)
    tiles = _cdiv(outer, block_o) * _cdiv(inner, block_i)
    channel_blocks = _cdiv(channels, block_c)
    splits = min(max(1, tiles), max(1, _cdiv(programs, max(1, channel_blocks))))
    splits = max(splits, _cdiv(tiles, _MAX_GRID_1))
    splits = _cdiv(tiles, _cdiv(tiles, splits)) if tiles else 1  # no empty split
    num_warps = 8 if block_o * block_c * block_i >= 4096 else 4
    return Plan(outer, channels, inner, block_o, block_c, block_i, splits, num_warps)


@dataclass
class _Tuning:
    tile_elems: int | None = None
    programs: int | None = None


_TUNING = _Tuning()


@contextlib.contextmanager
def tuning(*, tile_elems: int | None = None, programs: int | None = None) -> Iterator[None]:
    """Override the plan heuristics inside a ``with`` block (tests, benchmarks; not threadsafe).

    Small tiles and many programs let tiny test tensors exercise several tiles per split and
    several splits per channel, the paths a GPU takes on large tensors.
    """
    saved = (_TUNING.tile_elems, _TUNING.programs)
    _TUNING.tile_elems, _TUNING.programs = tile_elems, programs
    try:
        yield
    finally:
        _TUNING.tile_elems, _TUNING.programs = saved


def _default_programs(device: torch.device) -> int:
    if device.type == "cuda" and not is_interpreter():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return DEFAULT_PROGRAMS_PER_SM * sms
    return 8


def _plan_for(outer: int, channels: int, inner: int, device: torch.device) -> Plan:
    return make_plan(
        outer,
        channels,
        inner,
        tile_elems=_TUNING.tile_elems or DEFAULT_TILE_ELEMS,
        programs=_TUNING.programs or _default_programs(device),
    )


# ----------------------------------------------------------------------------- layouts


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
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _stats_vector(channels: int, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(channels, dtype=torch.float32, device=x.device)


def _channel_block(channels: int) -> int:
    return max(1, min(_next_pow2(channels), 256))


def _reduction_grid(plan: Plan) -> tuple[int, int]:
    return (plan.channel_blocks, plan.splits)


def _elemt_grid(plan: Plan) -> tuple[int, int]:
    return (plan.channel_blocks, _cdiv(plan.tiles, plan.elemt_tiles_per_program))


def _geometry(plan: Plan, tiles_per_program: int) -> tuple[int, ...]:
    """The tiling arguments every tiled kernel takes, in their order."""
    return (plan.outer, plan.channels, plan.inner, plan.tiles_i, plan.tiles, tiles_per_program)


def _partials(view: _View, n: int) -> list[torch.Tensor]:
    """``n`` (splits, C) float32 buffers for the reduction programs' per-split partials."""
    shape = (view.plan.splits, view.plan.channels)
    return [torch.empty(shape, dtype=torch.float32, device=view.x.device) for _ in range(n)]


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


# ----------------------------------------------------------------------------- launchers


def _stats(view: _View, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan, x = view.plan, view.x
    mean, var, invstd = (_stats_vector(plan.channels, x) for _ in range(3))
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
    sum_dy, sum_dy_xhat = _stats_vector(plan.channels, x), _stats_vector(plan.channels, x)
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


# ----------------------------------------------------------------------------- the backend


class TritonBackend:
    """The ``Backend`` protocol on Triton kernels (CUDA tensors; CPU under the interpreter)."""

    name = "triton"

    def unavailable_reason(self, x: Any) -> str | None:
        reason = triton_unavailable_reason()
        if reason is not None:
            return reason
        if not isinstance(x, torch.Tensor):
            kind = f"{type(x).__module__}.{type(x).__qualname__}"
            return f"the Triton backend takes torch tensors, got {kind}"
        if x.dtype not in SUPPORTED_DTYPES:
            return (
                f"dtype {x.dtype} is not supported by the Triton kernels (float32, float16, "
                "bfloat16); the reference backend computes float64 in float64"
            )
        if x.device.type != "cuda" and not is_interpreter():
            return (
                f"the tensor is on {x.device}; the Triton kernels need a CUDA device (set "
                "TRITON_INTERPRET=1 before importing triton to run them on CPU, slowly)"
            )
        return None

    def forward_train(self, x, weight, bias, eps, axis):
        y, mean, var, invstd, _ = forward_train(x, weight, bias, eps, axis)
        return y, mean, var, invstd

    def forward_infer(self, x, running_mean, running_var, weight, bias, eps, axis):
        return forward_infer(x, running_mean, running_var, weight, bias, eps, axis)[0]

    def backward_reduce(self, dy, x, mean, invstd, axis):
        return backward_reduce(dy, x, mean, invstd, axis)

    def backward_elemt(
        self,
        dy,
        x,
        mean,
        invstd,
        weight,
        sum_dy,
        sum_dy_xhat,
        count,
        axis,
        *,
        through_mean=True,
        through_var=True,
    ):
        return backward_elemt(
            dy,
            x,
            mean,
            invstd,
            weight,
            sum_dy,
            sum_dy_xhat,
            count,
            axis,
            through_mean=through_mean,
            through_var=through_var,
        )[0]

    def backward_train(self, dy, x, mean, invstd, weight, axis):
        dx, dweight, dbias, _ = backward_train(dy, x, mean, invstd, weight, axis)
        return dx, dweight, dbias

    # Beyond the protocol: the stages by their own names, and the fused ReLU variants.
    batch_stats = staticmethod(batch_stats)
    elemt = staticmethod(elemt)
    forward_train_fused = staticmethod(forward_train)
    forward_infer_fused = staticmethod(forward_infer)
    backward_train_fused = staticmethod(backward_train)
