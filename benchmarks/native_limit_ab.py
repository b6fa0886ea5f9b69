"""A/B of ``native.NATIVE_BELOW_LONG_ROWS`` (or, ``--general``, of ``NATIVE_BELOW``'s training
limit) on a whole model, in one process.

``python benchmarks/native_limit_ab.py [--model resnet50] [--batch 16] [--size 112]
[--dtype float32] [--limits 1048576,4194304] [--rounds 20] [--fuse] [--general]``: torch.nn
and one ``convert``-ed copy of the same ResNet per training limit, timed in rounds in a
balanced order (``model_step.timed_rounds``); per limit, the median of the per-round ratios
torch.nn's time / the variant's, with quartiles, its 95% interval and verdict, and the ratio
of the fastest steps. The limit is switched before each step of its variant, so every
variant runs under its own. This is how
the 1,048,576 of ``NATIVE_BELOW_LONG_ROWS`` was checked against the general limit on a whole
model (the per-layer measurements are in its comment).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as model_step.py
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from model_step import MODELS, speed_figures, step_fn, timed_rounds  # noqa: E402

import batchnorm.torch as bt  # noqa: E402
from batchnorm.torch import native  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--limits", default="1048576,4194304", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fuse", action="store_true", help="convert(fuse_activations=True)")
    parser.add_argument(
        "--general",
        action="store_true",
        help="switch the general training limit (NATIVE_BELOW, the one 16-bit inputs use) "
        "instead of the long-rows one",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = MODELS[args.model]().to(dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype)
    target = torch.randint(0, 100, (args.batch,))
    steps = {"torch.nn": step_fn(model, x, target)}
    table = native.NATIVE_BELOW if args.general else native.NATIVE_BELOW_LONG_ROWS
    saved = dict(table)
    label = "general from" if args.general else "long rows from"
    for limit in (int(v) for v in args.limits.split(",")):
        converted = bt.convert(copy.deepcopy(model), fuse_activations=args.fuse)
        step = step_fn(converted, x, target)
        value = (limit, saved["cpu"][1]) if args.general else limit  # eval limit kept

        def run(step=step, value=value) -> None:
            table["cpu"] = value
            step()

        steps[f"{label} {limit}"] = run
    try:
        times = timed_rounds(steps, args.rounds)
    finally:
        table.clear()
        table.update(saved)
    print(
        f"{args.model} {args.size}px batch {args.batch} {args.dtype}, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads; speed = torch.nn's time / the variant's"
    )
    for name, t in times.items():
        f = speed_figures(times["torch.nn"], t)
        print(
            f"{name:24s} median step {statistics.median(t) * 1e3:8.1f} ms  speed "
            f"{f['speed_vs_torch_nn']:.3f} [{f['speed_q1']:.3f}, {f['speed_q3']:.3f}]  "
            f"95% {f['speed_ci95'][0]:.3f}-{f['speed_ci95'][1]:.3f} ({f['verdict']})  "
            f"fastest/fastest {f['speed_fastest_vs_fastest']:.3f}"
        )


if __name__ == "__main__":
    main()
