"""Run the stages of a table into ``DIR/<stage>/``, record each one's state, write the page.

One failed stage never loses the others: its exception and traceback go into the status (and
onto the page), and the exit status becomes 1. A runner that raises ``Skipped`` (a module it
needs is not installed) is skipped with its note. With a time budget, a stage that would start
after the budget is spent is skipped with a note; a stage already running is never cut short.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..._args import non_negative_int, out_dir
from ..common import torch_threads, write_json
from ..data import DATASETS, load_dataset
from .render import render_html
from .stages import STAGES, Options, Skipped, Stage, names


def run_stage(stage: Stage, out: Path, options: Options) -> dict[str, Any]:
    """Run one stage into ``out/<name>/``; its status entry, whatever happened."""
    entry: dict[str, Any] = {"state": "ok"}
    start = time.perf_counter()
    try:
        stage.run(out / stage.name, options)
    except Skipped as exc:
        entry.update(state="skipped", note=str(exc))
    except Exception as exc:  # one failed stage must not lose the others
        entry.update(state="failed", note=f"{type(exc).__name__}: {exc}")
        entry["traceback"] = traceback.format_exc(limit=6)
    entry["seconds"] = time.perf_counter() - start
    return entry


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[report] {message}", file=sys.stderr, flush=True)


def build_report(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    data: str = "mnist1d",
    backend: str = "auto",
    progress: bool = True,
    skip: Sequence[str] = (),
    budget_s: float | None = None,
    stages: Sequence[Stage] = STAGES,
) -> dict[str, Any]:
    """Run ``stages`` into ``out/<stage>/`` and write ``out/index.html``; returns the status.

    ``stages`` is the table to run (``STAGES`` unless a caller hands in its own rows);
    ``budget_s`` skips the stages that would start after that many seconds.
    """
    out = Path(out)
    stages = tuple(stages)
    unknown = sorted(set(skip) - set(names(stages)))
    if unknown:
        raise ValueError(f"unknown stage(s) to skip: {unknown}; stages: {names(stages)}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be above 0 seconds, got {budget_s!r}")
    out.mkdir(parents=True, exist_ok=True)
    options = Options(quick=quick, seed=seed, data=data, backend=backend, progress=progress)
    status: dict[str, Any] = {
        "options": dataclasses.asdict(options),
        "budget_s": budget_s,
        "stages": {},
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    start = time.perf_counter()
    for stage in stages:
        elapsed = time.perf_counter() - start
        if stage.name in skip:
            entry = {"state": "skipped", "seconds": 0.0, "note": "skipped on request (--skip)"}
        elif budget_s is not None and elapsed >= budget_s:
            note = f"the time budget of {budget_s:g} s was spent ({elapsed:.1f} s) before it"
            entry = {"state": "skipped", "seconds": 0.0, "note": note}
        else:
            _say(progress, f"{stage.name} ...")
            entry = run_stage(stage, out, options)
            note = f" ({entry['note']})" if "note" in entry else ""
            _say(progress, f"{stage.name}: {entry['state']} in {entry['seconds']:.1f} s{note}")
        status["stages"][stage.name] = entry
    status["seconds"] = time.perf_counter() - start
    write_json(out / "report.json", status)
    (out / "index.html").write_text(render_html(out, status, stages))
    return status


def failed(status: dict[str, Any]) -> list[str]:
    return [name for name, entry in status["stages"].items() if entry["state"] == "failed"]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None, *, stages: Sequence[Stage] = STAGES) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm report",
        description="Run verify, a bench, explain and every experiment; write DIR/index.html.",
    )
    parser.add_argument("--out", type=out_dir, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="short settings (1 to 2 min)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="first seed (default 0)")
    parser.add_argument("--data", default="mnist1d", help="data set for the experiments")
    parser.add_argument("--backend", default="auto", help="batch-norm backend (default auto)")
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=1,
        help="torch and numba threads (default 1; 0: their own settings)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=names(tuple(stages)),
        help="leave a stage out (repeatable)",
    )
    parser.add_argument(
        "--budget",
        type=_positive_seconds,
        default=None,
        help="seconds; stages that would start later are skipped (default: no limit)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.data not in DATASETS:  # a user's file: find out now, not after minutes of stages
        try:
            load_dataset(args.data)
        except (ValueError, TypeError, OSError) as exc:
            parser.error(f"--data: {exc}")
    with torch_threads(args.threads):
        status = build_report(
            args.out,
            quick=args.quick,
            seed=args.seed,
            data=args.data,
            backend=args.backend,
            progress=not args.no_progress,
            skip=args.skip,
            budget_s=args.budget,
            stages=stages,
        )
    wrong = failed(status)
    print(
        f"wrote {Path(args.out) / 'index.html'} in {status['seconds']:.0f} s"
        + (f"; FAILED: {', '.join(wrong)}" if wrong else "")
    )
    return 1 if wrong else 0
