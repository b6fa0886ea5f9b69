"""How a time is taken: interleaved rounds, one clock per device, one summary of the samples.

Every (peer, op) is called ``warmup`` times untimed, then ``repeats`` rounds are timed. A round
calls every (peer, op) once, in a balanced order (``round_orders``), so that a burst of load
from other processes (these machines are shared) hits all peers alike and no op always runs
right after the same one.

On CPU a sample is one call between two ``perf_counter`` readings. On CUDA a sample is a loop
of calls between two CUDA events, long enough (>= 2 ms) that the CPU's launch work overlaps the
GPU's, and the time per call is the loop's time / its calls.
"""

from __future__ import annotations

import itertools
import math
import random
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


def device_arg(text: str) -> Any:
    """argparse type for the benchmarks' ``--device``: a ``torch.device`` for ``cpu`` or
    ``cuda[:N]``, refused (with the value named) otherwise or where torch sees no GPU."""
    import argparse

    import torch

    if text.split(":")[0] not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: cpu or cuda[:N]")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA device")
    return device


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


#: Up to this many orders (5 variants: 120) ``round_orders`` cycles through all of them.
_ALL_ORDERS_MAX = 720


def round_orders(names: list[Any], rounds: int, seed: int = 0) -> list[list[Any]]:
    """The order of ``names`` in each of ``rounds`` rounds. For up to 6 names, every
    permutation once per block of ``len(names)!`` rounds, the blocks each shuffled (seeded):
    within a whole block each name comes first equally often and each ordered pair (a right
    before b) occurs equally often inside the rounds. For more names, a random permutation
    per round. A run can be repeated (same seed, same orders).

    An order rotating by one each round keeps the cyclic order, so each variant nearly
    always runs right after the same one, and that slot can carry a cost of its own: in
    ``benchmarks/layer_cost.py`` at (32, 64, 16, 16), torch.nn's BN+ReLU pair timed two
    places after the Numba layer took 2.62 and 2.69 ms against 2.03 and 2.23 ms for our
    fused layer running the same ATen ops (two runs); in three runs of the rotating order,
    with the fused layer in that slot, it took 1.30x, 1.34x and 0.94x the pair's time."""
    rng = random.Random(seed)
    names = list(names)
    if math.factorial(len(names)) > _ALL_ORDERS_MAX:
        return [rng.sample(names, len(names)) for _ in range(rounds)]
    orders: list[list[Any]] = []
    while len(orders) < rounds:
        block = [list(order) for order in itertools.permutations(names)]
        rng.shuffle(block)
        orders += block
    return orders[:rounds]


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
    for order in round_orders(list(ops), repeats):
        for key in order:
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
