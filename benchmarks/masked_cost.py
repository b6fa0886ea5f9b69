"""What masking costs: a masked BatchNorm1d training step, native masked stages against the
gather path, and torch.nn.BatchNorm1d on the same tensor unmasked, on CPU.

    .venv/bin/python benchmarks/masked_cost.py [--shape 32,256,400] [--padding 0.3]
                                    [--repeats 20] [--threads 1] [--out benchmarks/results]

One training step = forward through the public API (``layer(x, mask=mask)``) and backward of a
fixed upstream gradient. Speech-like input: (N, C, L) with per-sequence lengths drawn so that
about ``--padding`` of the positions are padding, and the same in a sequence model's (N, L, C)
layout (a transposed view). Four ways, alternated round by round so that machine noise hits
them alike, all in this process: ours on the Numba backend's native masked stages, ours on the
gather path (the same backend made to look as if it had no masked stages: the real positions
gathered, the plain stages, scattered back), ours without a mask, and ``torch.nn.BatchNorm1d``
on the unmasked tensor (which gets the statistics wrong, and is here as the speed of light).
Prints medians and ratios, writes JSON (with the machine) to ``masked-cost-cpu.json``.

One thread each for torch and numba by default: on a shared, loaded machine the parallel
kernels' threads wait for cores far longer than they compute (measured here at a load average
of 7 on 2 cores: 20 ms for a masked reduction pass that takes 0.3 ms on one thread), and the
medians would time the scheduler, not the kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import batchnorm.torch as bt
from batchnorm import kernels
from batchnorm.bench import _machine
from batchnorm.kernels.numba_cpu import NumbaBackend


class GatheringNumba(NumbaBackend):
    """The Numba backend without the ``mask=`` option: the layers gather for it."""

    supports_mask = False


def batch(shape, padding, seed=0):
    n, c, length = shape
    g = torch.Generator().manual_seed(seed)
    # Lengths uniform in [L (1 - 2p), L]: a mean padding fraction of p.
    shortest = max(1, round(length * (1 - 2 * padding)))
    lengths = torch.randint(shortest, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x = x.masked_fill(~mask[:, None, :], 0.0)
    dy = torch.randn(shape, generator=g)
    return x, mask, dy


def step(layer, x, dy, mask=None):
    xi = x.detach().requires_grad_()
    y = layer(xi) if mask is None else layer(xi, mask=mask)
    y.backward(dy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32,256,400")
    parser.add_argument("--padding", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")))
    args = parser.parse_args()
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    kernels.register("numba_gather", f"{__name__}:GatheringNumba")
    x, mask, dy = batch(shape, args.padding)
    channels = shape[1]
    nlc = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, L, C) memory, seen as (N, C, L)
    dy_nlc = dy.transpose(1, 2).contiguous().transpose(1, 2)
    native, gather = (
        bt.BatchNorm1d(channels, backend="numba"),
        bt.BatchNorm1d(channels, backend="numba_gather"),
    )
    peer = torch.nn.BatchNorm1d(channels)
    assert "masked: native" in bt.explain_backend(x, "numba", mask=mask)
    assert "masked: compaction" in bt.explain_backend(x, "numba_gather", mask=mask)
    runs = {
        "native (N, C, L)": lambda: step(native, x, dy, mask),
        "gather (N, C, L)": lambda: step(gather, x, dy, mask),
        "native (N, L, C)": lambda: step(native, nlc, dy_nlc, mask),
        "gather (N, L, C)": lambda: step(gather, nlc, dy_nlc, mask),
        "ours unmasked (N, C, L)": lambda: step(native, x, dy),
        "torch.nn unmasked (N, C, L)": lambda: step(peer, x, dy),
    }
    for run in runs.values():  # warm-up: compilation, pools
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    torch_ms = median["torch.nn unmasked (N, C, L)"]
    ratios = {
        "gather / native (N, C, L)": median["gather (N, C, L)"] / median["native (N, C, L)"],
        "gather / native (N, L, C)": median["gather (N, L, C)"] / median["native (N, L, C)"],
        "native / torch.nn unmasked (N, C, L)": median["native (N, C, L)"] / torch_ms,
        "native / ours unmasked (N, C, L)": median["native (N, C, L)"]
        / median["ours unmasked (N, C, L)"],
    }
    real = float(mask.float().mean())
    print(f"shape {shape}, real positions {real:.3f}, median ms of a training step:")
    for name, value in median.items():
        print(f"  {name:30s} {value:8.2f}")
    for name, value in ratios.items():
        print(f"  {name:38s} {value:6.2f}x")
    record = {
        "what": "masked BatchNorm1d training step (forward + backward), float32, CPU",
        "shape": shape,
        "real_fraction": real,
        "repeats": args.repeats,
        "threads": args.threads,
        "command": f"benchmarks/masked_cost.py --shape {args.shape} --padding {args.padding} "
        f"--repeats {args.repeats} --threads {args.threads}",
        "median_ms": median,
        "ratios": ratios,
        "machine": _machine("cpu"),
        "note": "shared, loaded machine (several jobs on 2 cores): ratios, not absolute times",
    }
    out = Path(args.out) / "masked-cost-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
