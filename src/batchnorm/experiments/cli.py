"""``batchnorm experiment NAME [options]``: run one experiment and write its records.

``batchnorm experiment list`` names them; ``--replot`` redraws figures from existing records.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._args import non_negative_int, out_dir, positive_float, positive_int
from . import EXPERIMENTS
from .common import jsonable, read_json, torch_threads

__all__ = ["main", "run_experiment", "DESCRIPTIONS"]

DESCRIPTIONS = {
    "ioffe": "Ioffe & Szegedy 2015 section 4.1: 3x100 sigmoid MLP with/without BN, Figure 1",
    "moments": "why the mean and variance carry gradient: section 2 case + ablation + grad check",
    "landscape": "Santurkar et al. 2018: loss/gradient along the gradient, BN vs none vs noisy BN",
    "reparam": "Kohler et al. 2019: BN(x^T w) = gamma x^T w / ||w||_S, checked in float64",
    "precise": "Wu & Johnson 2021: EMA statistics that lag vs PreciseBN; checkpoint/accumulation",
    "small-batch": "BN, Batch Renorm, Ghost BN, GroupNorm against batch size; padding drift",
}

#: command-line option -> keyword of ``run``; an experiment that lacks the keyword refuses it.
OPTIONS = ("data", "seed", "seeds", "steps", "lr", "backend")


def run_experiment(name: str, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Import ``batchnorm.experiments.NAME`` and call its ``run(out, **kwargs)``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {list(EXPERIMENTS)}")
    module = importlib.import_module(f"batchnorm.experiments.{name.replace('-', '_')}")
    accepted = inspect.signature(module.run).parameters
    refused = sorted(k for k in kwargs if k not in accepted)
    if refused:
        raise ValueError(
            f"experiment {name!r} does not take {', '.join('--' + k for k in refused)}"
        )
    return module.run(out, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm experiment",
        description="Run one experiment; it writes records.json, CSV tables and PNG figures.",
        epilog="experiments:\n" + "\n".join(f"  {k:<11} {v}" for k, v in DESCRIPTIONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=[*EXPERIMENTS, "list"], help="experiment to run")
    parser.add_argument(
        "--out", type=out_dir, default=None, help="output directory (default: out/NAME)"
    )
    parser.add_argument("--quick", action="store_true", help="the short variant (tests, CI)")
    parser.add_argument("--seed", type=non_negative_int, help="first seed (default 0)")
    parser.add_argument("--seeds", type=positive_int, help="how many seeds")
    parser.add_argument("--steps", type=positive_int, help="SGD steps per run")
    parser.add_argument("--lr", type=positive_float, help="learning rate")
    parser.add_argument(
        "--data",
        default=None,
        help="mnist1d (default), digits, an .npz file (x_train, y_train, x_test, "
        "y_test) or a directory of MNIST IDX files",
    )
    parser.add_argument("--backend", default=None, help="batch-norm backend (default auto)")
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="torch and numba threads (default 1; 0: their own settings)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="records only, no figures")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw the figures from the records in --out; run nothing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.name == "list":
        for name, text in DESCRIPTIONS.items():
            print(f"{name:<10} {text}")
        return 0
    out = Path(args.out or Path("out") / args.name)
    if args.replot:
        from .plots import PLOTTERS

        records = out / "records.json"
        if not records.exists():
            print(f"batchnorm experiment: no records at {records}", file=sys.stderr)
            return 2
        try:
            which = read_json(records).get("experiment")
        except (ValueError, OSError, AttributeError) as exc:
            print(f"batchnorm experiment: cannot read {records}: {exc}", file=sys.stderr)
            return 2
        if which != args.name:
            print(
                f"batchnorm experiment: the records in {out} are from {which!r}, not {args.name!r}",
                file=sys.stderr,
            )
            return 2
        for path in PLOTTERS[args.name](out):
            print(path)
        return 0
    kwargs = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    kwargs.update(quick=args.quick, plot=not args.no_plot)
    if args.name != "reparam":
        kwargs["progress"] = not args.no_progress
    try:
        with torch_threads(args.threads):
            record = run_experiment(args.name, out, **kwargs)
    except (ValueError, TypeError) as exc:
        print(f"batchnorm experiment {args.name}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(jsonable(record["summary"]), indent=1))  # NaN -> null, as records.json
    print(f"records and figures in {out}/", file=sys.stderr)
    return 0
