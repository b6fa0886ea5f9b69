"""Records I/O, progress bars and seeding shared by every experiment.

Records are the contract between the experiments and everything that shows them: an experiment
writes ``records.json`` (config, summary, series) and CSV tables; ``plots`` and ``report`` read
only those files, so a figure can be redrawn without re-running anything.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "jsonable",
    "write_json",
    "read_json",
    "write_csv",
    "read_csv",
    "write_records",
    "progress",
    "Timer",
    "torch_threads",
    "mean_and_spread",
    "resolve_settings",
    "seed_runs",
    "curves_over_seeds",
]

T = TypeVar("T")


def jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj``: arrays/tensors to lists, non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; None says "not a number" to every reader
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per mapping; the columns are the union of keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: jsonable(v) for k, v in row.items()})
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_records(
    out: str | os.PathLike, record: Mapping[str, Any], tables: Mapping[str, Sequence[Any]]
) -> Path:
    """An experiment's ``records.json`` and its CSV tables (file name -> rows) under ``out``."""
    out = Path(out)
    write_json(out / "records.json", record)
    for name, rows in tables.items():
        write_csv(out / name, rows)
    return out


def progress(
    iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Iterator[T]:
    """A tqdm bar on stderr (plain iteration when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            enabled = False
    if not enabled:
        yield from iterable
        return
    yield from tqdm(
        iterable,
        total=total,
        desc=desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )


class Timer:
    """Wall-clock seconds of a ``with`` block (``.seconds``)."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def torch_threads(threads: int | None = 1) -> Iterator[None]:
    """Run the block on ``threads`` torch threads, and as many numba threads (the numba backend
    that ``backend="auto"`` picks for large batches), then restore the caller's settings.

    Small models on shared cores run fastest on one thread (and do not starve neighbours: numba's
    idle workers spin for a while after each kernel, taking a core from torch or from other jobs).
    """
    import torch

    if threads is not None and threads < 0:
        raise ValueError(f"threads must be 0 (torch's own setting) or more, got {threads}")
    previous = torch.get_num_threads()
    # Only when asked to set them: the first call starts numba's threading layer.
    numba = _numba_or_none() if threads else None
    numba_previous = numba.get_num_threads() if numba else None
    if threads:
        torch.set_num_threads(int(threads))
        if numba:
            numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if numba:
            numba.set_num_threads(numba_previous)


def _numba_or_none() -> Any:
    try:
        import numba
    except ImportError:
        return None
    return numba


def mean_and_spread(runs: Sequence[Sequence[float | None]]) -> dict[str, list[float | None]]:
    """Per-position mean, min and max over runs (None where a run has no finite value)."""
    array = np.array([[np.nan if v is None else v for v in run] for run in runs], dtype=float)
    result: dict[str, list[float | None]] = {}
    for name, fn in (("mean", np.nanmean), ("min", np.nanmin), ("max", np.nanmax)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are expected
            result[name] = jsonable(fn(array, axis=0))
    return result


def resolve_settings(
    defaults: Mapping[str, Any],
    quick_defaults: Mapping[str, Any],
    *,
    quick: bool,
    steps: int | None,
    seeds: int | None,
    intervals: Mapping[str, int] = MappingProxyType({"eval_every": 10}),
) -> dict[str, Any]:
    """An experiment's settings: its quick or full defaults, with ``steps``/``seeds`` overridden.

    A shorter run keeps its resolution: each ``intervals`` key (``eval_every``, ...) is capped so
    that at least that many points fall within the ``steps``.
    """
    for name, value in (("steps", steps), ("seeds", seeds)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    settings = dict(quick_defaults if quick else defaults)
    if steps is not None:
        settings["steps"] = int(steps)
        for key, points in intervals.items():
            settings[key] = max(1, min(settings[key], int(steps) // points))
    if seeds is not None:
        settings["seeds"] = int(seeds)
    return settings


def seed_runs(variants: Iterable[str], seeds: int, seed: int) -> Iterator[tuple[str, int, int]]:
    """``(variant, k, seed + k)`` for every variant and each of its ``seeds`` runs."""
    for variant in variants:
        for k in range(seeds):
            yield variant, k, seed + k


def curves_over_seeds(
    runs: Sequence[Mapping[str, Any]], keys: Iterable[str], *, series: str = "history"
) -> dict[str, Any]:
    """``step`` and the ``mean_and_spread`` of each key over one variant's runs' ``series``."""
    return {
        "step": [row["step"] for row in runs[0][series]],
        **{key: mean_and_spread([[row[key] for row in r[series]] for r in runs]) for key in keys},
    }
