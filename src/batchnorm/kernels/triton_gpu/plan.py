"""How a tensor's (outer, C, inner) view is cut into tiles and programs: ``Plan``, the heuristics
that make one, and ``tuning`` to override them in tests and benchmarks."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .runtime import is_interpreter

#: Elements per tile (registers per program) and reduction programs per SM on a GPU. Starting
#: points to be tuned on a GPU with ``benchmarks/gpu_bench.py``.
DEFAULT_TILE_ELEMS = 2048
DEFAULT_PROGRAMS_PER_SM = 8
#: Widest tile along a contiguous inner axis, and along the channel axis when channels-last.
MAX_BLOCK_I = 1024
MAX_BLOCK_C = 64
_MAX_GRID_1 = 65535  # CUDA's limit on the second grid dimension
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Plan:
    """How the (outer, C, inner) view of a tensor is cut into tiles and programs.

    A tile is ``[block_o, block_c, block_i]``; ``splits`` reduction programs share each block of
    ``block_c`` channels, walking ``tiles_per_split`` consecutive tiles each. ``pack_i`` says along
    which axis the ReLU mask packs 8 bits into a byte (``inner`` if True, else ``outer``).
    The derived sizes are computed once per plan, and a plan once per shape and device
    (``_plan_for``): on a GPU every launch's Python is host time.
    """

    outer: int
    channels: int
    inner: int
    block_o: int
    block_c: int
    block_i: int
    splits: int
    num_warps: int = 4

    @functools.cached_property
    def tiles_i(self) -> int:
        return _cdiv(self.inner, self.block_i)

    @functools.cached_property
    def tiles(self) -> int:
        return _cdiv(self.outer, self.block_o) * self.tiles_i

    @functools.cached_property
    def channel_blocks(self) -> int:
        return _cdiv(self.channels, self.block_c)

    @functools.cached_property
    def tiles_per_split(self) -> int:
        return _cdiv(self.tiles, self.splits)

    @functools.cached_property
    def elemt_tiles_per_program(self) -> int:
        return _cdiv(self.tiles, _MAX_GRID_1)

    @functools.cached_property
    def pack_i(self) -> bool:
        return self.inner >= 8

    @functools.cached_property
    def mask_bytes(self) -> int:
        if self.pack_i:
            return self.outer * self.channels * _cdiv(self.inner, 8)
        return _cdiv(self.outer, 8) * self.channels * self.inner

    @functools.cached_property
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


@functools.cache
def _default_programs(device: torch.device) -> int:
    if device.type == "cuda" and not is_interpreter():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return DEFAULT_PROGRAMS_PER_SM * sms
    return 8


def _plan_for(outer: int, channels: int, inner: int, device: torch.device) -> Plan:
    return _cached_plan(
        outer,
        channels,
        inner,
        _TUNING.tile_elems or DEFAULT_TILE_ELEMS,
        _TUNING.programs or _default_programs(device),
    )


@functools.lru_cache(maxsize=1024)
def _cached_plan(outer: int, channels: int, inner: int, tile_elems: int, programs: int) -> Plan:
    return make_plan(outer, channels, inner, tile_elems=tile_elems, programs=programs)
