"""The record a run writes (schema ``batchnorm-bench/2``, every field in docs/bench.md): the
bytes model, the ratios derived from the timings, the summary across shapes, the targets, and
the one-line CSV summary kept in ``benchmarks/results/log.csv``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import machine
from .shapes import shape_str
from .timing import median

__all__ = [
    "SCHEMA", "OPS", "FUSED_OPS", "MODEL_BYTES", "BASELINE", "Target", "TARGETS",
    "derive", "summarize", "write_json", "LOG_FIELDS", "log_row", "append_log",
]  # fmt: skip

SCHEMA = "batchnorm-bench/2"
OPS = ("forward", "backward", "fwd+bwd", "inference")
FUSED_OPS = ("relu fwd+bwd", "add_relu fwd+bwd")
#: Bytes moved per byte of x if nothing stays in cache between passes (design notes): a copy
#: reads and writes x; the forward reads x twice (statistics, then normalise) and writes y; the
#: backward reads x and dy twice and writes dx; the fused tails read and write the same plus,
#: with the residual, its read and its gradient's write (the 1-bit ReLU mask is not counted).
MODEL_BYTES = {
    "forward": 3, "backward": 5, "fwd+bwd": 8, "inference": 2,
    "relu fwd+bwd": 8, "add_relu fwd+bwd": 10, "copy": 2,
}  # fmt: skip
#: Every speed-up is this peer's median / the other's.
BASELINE = "torch"
#: Shapes with at most this many channels count as "few channels"; tensors of at least
#: LARGE_BYTES as "large tensors" (past any cache, so the bandwidth target means memory).
FEW_CHANNELS = 16
LARGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Target:
    """``reduce`` (median or min) of ``metric`` of ``op`` across shapes, against ``bound``."""

    device: str
    op: str
    metric: str
    reduce: str
    bound: float
    at_most: bool = False
    only: str | None = None  # "few channels" | "large tensors"


#: The issues' targets, by the peer they judge (reported, never asserted by a test). Issue 4:
#: the Numba stages on CPU. Issue 7: what a user calls on a GPU (x_limit <= 1.25 is ">= 0.8 of
#: the copy bandwidth").
TARGETS: dict[str, dict[str, Target]] = {
    "numba": {
        "fwd+bwd median speedup": Target("cpu", "fwd+bwd", "speedup", "median", 3.0),
        "fwd+bwd min speedup": Target("cpu", "fwd+bwd", "speedup", "min", 1.5),
        "fwd+bwd median x_copy": Target("cpu", "fwd+bwd", "x_copy", "median", 3.5, at_most=True),
        "inference median speedup": Target("cpu", "inference", "speedup", "median", 1.5),
    },
    "triton-layer": {
        "fwd+bwd median x_limit (large tensors)": Target(
            "cuda", "fwd+bwd", "x_limit", "median", 1.25, at_most=True, only="large tensors"
        ),
        "fwd+bwd median speedup": Target("cuda", "fwd+bwd", "speedup", "median", 1.3),
        "fwd+bwd min speedup (few channels)": Target(
            "cuda", "fwd+bwd", "speedup", "min", 3.0, only="few channels"
        ),
        "relu fwd+bwd median speedup": Target("cuda", "relu fwd+bwd", "speedup", "median", 1.5),
        "add_relu fwd+bwd median speedup": Target(
            "cuda", "add_relu fwd+bwd", "speedup", "median", 1.5
        ),
    },
}


def derive(entry: dict[str, Any], summaries: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Fill ``entry["copy"]`` and ``entry["timings"]`` from one problem's timed summaries."""
    copies = {op: s for (peer, op), s in summaries.items() if peer == "copy"}
    copy_s, clone_s = copies["copy"]["median_s"], copies["clone"]["median_s"]
    bandwidth = MODEL_BYTES["copy"] * entry["bytes"] / copy_s / 1e9
    entry["copy"] = {**copies, "bandwidth_GBps": bandwidth}
    base = {op: s["median_s"] for (peer, op), s in summaries.items() if peer == BASELINE}
    timings = []
    for (peer, op), s in summaries.items():
        if peer == "copy":
            continue
        t = {"peer": peer, "op": op, **s}
        t["speedup"] = base[op] / s["median_s"] if op in base else None
        t["x_copy"] = s["median_s"] / copy_s
        t["x_clone"] = s["median_s"] / clone_s
        t["x_limit"] = t["x_copy"] * MODEL_BYTES["copy"] / MODEL_BYTES[op]
        t["GBps"] = MODEL_BYTES[op] * entry["bytes"] / s["median_s"] / 1e9
        timings.append(t)
    entry["timings"] = timings


def _values(record: dict[str, Any], peer: str, op: str, metric: str, only: str | None) -> list:
    out = []
    for entry in record["results"]:
        if only == "few channels" and entry["shape"][1] > FEW_CHANNELS:
            continue
        if only == "large tensors" and entry["bytes"] < LARGE_BYTES:
            continue
        for t in entry["timings"]:
            if t["peer"] == peer and t["op"] == op and t.get(metric) is not None:
                out.append(t[metric])
    return out


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Per peer and op across shapes (median/min speed-up, median multiples of the copy time
    and of the bandwidth limit), and the targets of the first judged peer that ran."""
    peers: dict[str, dict[str, Any]] = {}
    for entry in record["results"]:
        for t in entry["timings"]:
            peers.setdefault(t["peer"], {}).setdefault(t["op"], None)
    for peer, ops in peers.items():
        for op in ops:
            speedups = _values(record, peer, op, "speedup", None)
            ops[op] = {
                "median_speedup": median(speedups),
                "min_speedup": min(speedups) if speedups else None,
                **{
                    f"median_{m}": median(_values(record, peer, op, m, None))
                    for m in ("x_copy", "x_clone", "x_limit", "GBps")
                },
            }
    summary: dict[str, Any] = {"peers": peers}
    judged = next((p for p in TARGETS if p in peers), None)
    if judged is not None:
        device = record["settings"]["device"].split(":")[0]
        targets: dict[str, Any] = {"peer": judged}
        for name, target in TARGETS[judged].items():
            values = _values(record, judged, target.op, target.metric, target.only)
            value = median(values) if target.reduce == "median" else min(values, default=None)
            met = None
            # A run on another device (the Triton interpreter on a CPU) says nothing of them.
            if value is not None and device == target.device:
                met = value <= target.bound if target.at_most else value >= target.bound
            targets[name] = {"target": target.bound, "value": value, "met": met}
        summary["targets"] = targets
    return summary


def write_json(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------- the run log (CSV)

LOG_FIELDS = (
    "created", "machine", "command", "device", "dtypes", "shapes", "peer", "baseline",
    "peer_fwd_bwd_ms", "baseline_fwd_bwd_ms", "ratio", "median_speedup", "min_speedup",
    "median_x_copy", "inference_median_speedup", "targets_met", "source",
)  # fmt: skip


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def log_row(record: dict[str, Any], source: str = "") -> dict[str, str]:
    """One line for a whole run: the judged peer's and the baseline's fwd+bwd times summed over
    the shapes both ran, their ratio, the per-shape speed-ups' median and min, and the targets
    met. Reads records of schema 1 too (for the log of the runs that were removed)."""
    settings = record["settings"]
    baseline = settings.get("baseline", BASELINE)
    targets = record.get("summary", {}).get("targets") or {}
    peer = targets.get("peer") or next((p for p in settings["peers"] if p != baseline), "")
    ours = theirs = 0.0
    for entry in record["results"]:
        times = {t["peer"]: t["median_s"] for t in entry["timings"] if t["op"] == "fwd+bwd"}
        if peer in times and baseline in times:
            ours, theirs = ours + times[peer], theirs + times[baseline]
    judged = [t for t in targets.values() if isinstance(t, dict) and t.get("met") is not None]
    speedups = _values(record, peer, "fwd+bwd", "speedup", None)
    shapes = ";".join(f"{shape_str(e['shape'])}:{e['layout']}" for e in record["results"])
    return {
        "created": record.get("created", ""),
        "machine": machine.label(record.get("machine", {})),
        "command": record.get("command") or "",
        "device": settings.get("device", ""),
        "dtypes": "+".join(settings.get("dtypes") or [settings.get("dtype", "")]),
        "shapes": shapes,
        "peer": peer,
        "baseline": baseline,
        "peer_fwd_bwd_ms": _fmt(ours * 1e3 if ours else None),
        "baseline_fwd_bwd_ms": _fmt(theirs * 1e3 if theirs else None),
        "ratio": _fmt(theirs / ours if ours else None),
        "median_speedup": _fmt(median(speedups)),
        "min_speedup": _fmt(min(speedups, default=None)),
        "median_x_copy": _fmt(median(_values(record, peer, "fwd+bwd", "x_copy", None))),
        "inference_median_speedup": _fmt(
            median(_values(record, peer, "inference", "speedup", None))
        ),
        "targets_met": f"{sum(bool(t['met']) for t in judged)}/{len(judged)}" if judged else "",
        "source": source,
    }


def append_log(path: Path, row: dict[str, str]) -> Path:
    """Append ``row`` to the CSV at ``path`` (header first if the file is new or empty)."""
    unknown = set(row) - set(LOG_FIELDS)
    if unknown:
        raise ValueError(f"log row has fields the log does not: {sorted(unknown)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow(row)
    with open(path, "a", newline="") as fh:
        fh.write(buf.getvalue())
    return path
