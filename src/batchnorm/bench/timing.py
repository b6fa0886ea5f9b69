"""How a time is taken: interleaved rounds, one clock per device, one summary of the samples.

Every (peer, op) is called ``warmup`` times untimed, then ``repeats`` rounds are timed. A round
calls every (peer, op) once, in an order rotated by one each round, so that a burst of load
from other processes (these machines are shared) hits all peers alike.

On CPU a sample is one call between two ``perf_counter`` readings. On CUDA a sample is a loop
of calls between two CUDA events, long enough (>= 2 ms) that the CPU's launch work overlaps the
GPU's, and the time per call is the loop's time / its calls.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Op", "median", "summary", "sync", "time_interleaved", "progress"]

#: Shortest CUDA sample, and the most calls one may hold (launches are ~5-10 us each).
CUDA_SAMPLE_S = 2e-3
CUDA_MAX_CALLS = 200


@dataclass
class Op:
    """A timed call; a slow peer caps its own repeats (``max_repeats``)."""

    run: Callable[[], Any]
    max_repeats: int | None = None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(values: list[float], calls: int = 1) -> dict[str, Any]:
    """Seconds per call: median (the headline), min, quartiles, samples and calls per sample."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "q1_s": q[0],
        "q3_s": q[2],
        "n": len(values),
        "calls": calls,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class _CpuClock:
    def calls_for(self, fn: Callable[[], Any]) -> int:
        return 1

    def sample(self, fn: Callable[[], Any], calls: int) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class _CudaClock:
    def __init__(self) -> None:
        import torch

        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def sample(self, fn: Callable[[], Any], calls: int) -> float:
        self.start.record()
        for _ in range(calls):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3 / calls

    def calls_for(self, fn: Callable[[], Any]) -> int:
        once = self.sample(fn, 1)
        return max(1, min(CUDA_MAX_CALLS, math.ceil(CUDA_SAMPLE_S / max(once, 1e-6))))


def time_interleaved(
    ops: dict[tuple[str, str], Op],
    repeats: int,
    warmup: int,
    device: str,
    tick: Callable[[], None] = lambda: None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(peer, op): summary}`` of interleaved samples (see the module docstring)."""
    clock: Any = _CudaClock() if device.startswith("cuda") else _CpuClock()
    for op in ops.values():
        for _ in range(warmup):
            op.run()
    sync(device)
    calls = {key: clock.calls_for(op.run) for key, op in ops.items()}
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in ops}
    keys = list(ops)
    for r in range(repeats):
        # Rotate the order every round so that no op always runs right after the same one.
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            op = ops[key]
            if op.max_repeats is not None and len(samples[key]) >= op.max_repeats:
                continue
            sync(device)
            samples[key].append(clock.sample(op.run, calls[key]))
        tick()
    return {key: summary(values, calls[key]) for key, values in samples.items()}


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...


def progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr, or nothing (tqdm absent or not wanted)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="round", leave=False)
