"""``batchnorm bench``: one command line for CPU and GPU (``--device cuda``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._args import non_negative_int, out_dir, positive_int
from .plot import plot
from .record import append_log, log_row, write_json
from .runner import PEERS, run
from .shapes import (
    DEFAULT_SHAPES,
    GPU_QUICK_SHAPES,
    GPU_SHAPES,
    LAYOUTS,
    QUICK_SHAPES,
    shapes_arg,
    with_layouts,
)
from .table import format_table

__all__ = ["build_parser", "main"]


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _layouts(text: str) -> list[str]:
    layouts = _names(text)
    bad = [v for v in layouts if v not in LAYOUTS[:2]]
    if bad or not layouts:
        raise argparse.ArgumentTypeError(f"bad layouts {bad or text!r}: nchw and/or channels_last")
    return layouts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchnorm bench",
        description="Time batch norm (training forward, backward, fwd+bwd, inference; on a GPU "
        "also the fused BN+ReLU tails) for our kernels and PyTorch on this machine; report "
        "speed-ups and multiples of the copy time. docs/bench.md describes the JSON.",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (seconds)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    # A Path default is not passed through the type: only a given --out is created up front.
    p.add_argument("--out", type=out_dir, default=Path("bench-out"), help="output directory")
    p.add_argument("--log", type=Path, help="append the run's summary line to this CSV")
    p.add_argument(
        "--dtype",
        "--dtypes",
        type=_names,
        help="float32, float64, float16, bfloat16, comma-separated (default: float32; on cuda "
        "float32,bfloat16)",
    )
    p.add_argument(
        "--shapes", type=shapes_arg, help="e.g. 32x128x56x56,16x64x112x112:channels_last,4096x1024"
    )
    p.add_argument(
        "--layouts",
        type=_layouts,
        help="run every shape in each of these (nchw,channels_last; the default on cuda)",
    )
    names = ", ".join(peer.name for peer in PEERS)
    p.add_argument(
        "--peers",
        type=_names,
        help=f"comma-separated subset of: {names} (torch, the baseline, always runs)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time torch.compile too (default: only in a full cuda run without --peers)",
    )
    p.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fused BN+ReLU tails, and each peer checked against eager (default: on cuda)",
    )
    p.add_argument("--repeats", type=positive_int, help="timed rounds (default 15; quick 3)")
    p.add_argument(
        "--warmup", type=non_negative_int, help="untimed calls per op first (default 3; quick 1)"
    )
    p.add_argument(
        "--tile-elems", type=positive_int, help="Triton: elements per tile (a power of two)"
    )
    p.add_argument(
        "--programs", type=positive_int, help="Triton: reduction grid size (default 8 per SM)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _error(message: str) -> int:
    print(f"batchnorm bench: {message}", file=sys.stderr)
    return 2


def passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment has a policy, before torch loads
    OpenMP (which reads it once): spinning idle workers of one peer slowed the next peer's
    calls by up to 100x on a busy 2-core machine (docs/torch.md, Limitations)."""
    if "torch" not in sys.modules and "numba" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    passive_openmp()
    try:
        import torch
    except ImportError:
        return _error("needs torch (the baseline is PyTorch eager)")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return _error("--device cuda asked for but no CUDA device is available")
    if cuda:
        shapes = with_layouts(GPU_QUICK_SHAPES if args.quick else GPU_SHAPES, LAYOUTS[:2])
    else:
        shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
    shapes = args.shapes or shapes
    if args.layouts:
        shapes = with_layouts(shapes, args.layouts)
    dtypes = args.dtype or (["float32", "bfloat16"] if cuda else ["float32"])
    # torch.compile is the peer that matters on a GPU, and too slow to compile for a quick run;
    # named peers are exactly those asked for.
    default_compile = cuda and not args.quick and args.peers is None
    compile_ = args.compile if args.compile is not None else default_compile
    try:
        record = run(
            shapes, dtype=dtypes, device=args.device,
            repeats=args.repeats or (3 if args.quick else 15),
            warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
            peers=args.peers, compile=compile_, progress=not args.no_progress, fused=args.fused,
            tile_elems=args.tile_elems, programs=args.programs,
        )  # fmt: skip
    except ValueError as exc:
        return _error(str(exc))
    record["command"] = " ".join(["batchnorm bench", *argv])
    quick = "-quick" if args.quick else ""
    stem = f"bench-{args.device.split(':')[0]}-{'+'.join(dtypes)}{quick}"
    json_path = write_json(record, args.out / f"{stem}.json")
    print(format_table(record))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot(record, args.out / f"{stem}.png")
        if png is not None:
            print(f"wrote {png}")
    if args.log is not None:
        print(f"appended to {append_log(args.log, log_row(record, source=json_path.name))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
