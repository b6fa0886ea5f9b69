"""Records -> template context, one function per section that needs more than its records.

Each function takes the report's directory and returns the mapping its template renders;
``records`` is ``None`` when the stage wrote nothing readable, and the template then shows
nothing but the stage's status. Numbers are computed here, words live in the templates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..common import read_json

_BENCH_OPS = {"forward": 0, "backward": 1, "fwd+bwd": 2, "inference": 3}
#: The table leads with the shapes whose ratios measure the kernels.
_BENCH_SETS = {"representative": 0, "quick": 1}


def load(out: Path, stage: str, name: str = "records.json") -> Any:
    """A stage's JSON record, or ``None`` if it is missing or unreadable."""
    path = out / stage / name
    try:
        return read_json(path) if path.exists() else None
    except ValueError:
        return None


def records(stage: str) -> Any:
    """The default context: the stage's ``records.json`` as ``records``."""

    def context(out: Path) -> dict[str, Any]:
        return {"records": load(out, stage)}

    return context


def cards(out: Path) -> dict[str, Any]:
    """The headline cards' records, by stage (each may be ``None``)."""
    explain_record = load(out, "explain", "explain.json")
    verify_record = load(out, "verify", "verify.json")
    return {
        "ioffe": load(out, "ioffe"),
        "moments": load(out, "moments"),
        "explain": explain_record and explain_record["two_sample"]["batch_norm"]["steps"],
        "reparam": load(out, "reparam"),
        "precise": load(out, "precise"),
        "verify": verify_record
        and {
            "passed": sum(bool(r.get("passed")) for r in verify_record["rows"]),
            "total": len(verify_record["rows"]),
        },
    }


def explain(out: Path) -> dict[str, Any]:
    record = load(out, "explain", "explain.json")
    if not record:
        return {"records": None}
    text = out / "explain" / "explain.txt"
    rendered = record.get("files", {}).get("rendered", [])
    graph = next((f"explain/{n}" for n in ("bn_graph.svg", "bn_graph.png") if n in rendered), None)
    return {"records": record, "text": text.read_text() if text.exists() else "", "graph": graph}


def moments(out: Path) -> dict[str, Any]:
    record = load(out, "moments")
    if not record:
        return {"records": None}
    minimal = record["minimal_case"]
    cases = ("shift/true gradient", "shift/moment as constant")
    cases += ("scale/true gradient", "scale/moment as constant")
    minimal_rows = [{"case": key.replace("/", ": "), **minimal[key]} for key in cases]
    finals: dict[str, list[float]] = {}
    for run in record.get("runs", []):
        if run["history"]:
            finals.setdefault(run["variant"], []).append(run["history"][-1]["test_accuracy"])
    summary_rows = []
    for variant, stats in record["summary"].items():
        accuracies = finals.get(variant, [])
        spread = f" ({min(accuracies):.3f}..{max(accuracies):.3f})" if len(accuracies) > 1 else ""
        accuracy = f"{stats['final_test_accuracy']:.3f}{spread}"
        summary_rows.append({"variant": variant, **stats, "accuracy": accuracy})
    return {
        "records": record,
        "minimal_rows": minimal_rows,
        "summary_rows": summary_rows,
        "variants": list(record["variants"]),
    }


def ioffe(out: Path) -> dict[str, Any]:
    record = load(out, "ioffe")
    if not record:
        return {"records": None}
    rows = []
    for variant, label in record["variants"].items():
        s = record["summary"][variant]
        rows.append(
            {
                "variant": label,
                "mean": s["final_test_accuracy_mean"],
                "min": s["final_test_accuracy_min"],
                "max": s["final_test_accuracy_max"],
                "seeds": ", ".join(f"{a:.3f}" for a in s["final_test_accuracy"]),
            }
        )
    return {"records": record, "rows": rows}


def landscape(out: Path) -> dict[str, Any]:
    record = load(out, "landscape")
    if not record:
        return {"records": None}
    rows = [{"variant": record["variants"][v], **s} for v, s in record["summary"].items()]
    return {"records": record, "rows": rows}


def reparam(out: Path) -> dict[str, Any]:
    record = load(out, "reparam")
    if not record:
        return {"records": None}
    variants = record["orthogonality"]["variants"]
    return {"records": record, "orthogonality": [{"variant": k, **v} for k, v in variants.items()]}


def small_batch(out: Path) -> dict[str, Any]:
    record = load(out, "small-batch")
    if not record:
        return {"records": None}
    accuracy, sizes = record["summary"]["accuracy"], record["sizes"]
    norms = {
        "bn": "batch norm",
        "renorm": "Batch Renorm",
        "ghost": f"Ghost (batches of {record['settings']['ghost_batch']})",
        "group": "GroupNorm",
    }
    rows = [
        {"norm": name, **{str(b): accuracy[key][str(b)] for b in sizes}}
        for key, name in norms.items()
    ]
    return {"records": record, "rows": rows, "sizes": [str(b) for b in sizes]}


def verify(out: Path) -> dict[str, Any]:
    record = load(out, "verify", "verify.json")
    if not record:
        return {"records": None}
    rows, mutants = [], []
    for row in record["rows"]:
        # "X differs from true dx (1/gap)": a mutant that must be far from the truth; its
        # "error" is 1/gap, which reads backwards in an error table, so it gets its own.
        if "(1/gap)" in row["name"]:
            # A gap of 0 (the failure that matters) has 1/gap = inf, stored as null.
            error = row.get("error")
            gap = 0.0 if error is None or error == math.inf else 1.0 / error
            name = row["name"].replace(" (1/gap)", "")
            mutants.append({**row, "name": name, "gap": gap, "least": 1.0 / row["tolerance"]})
        else:
            rows.append(row)
    return {"records": record, "rows": rows, "mutants": mutants}


def bench_rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set, shape, peer, op) from ``{set name: batchnorm.bench.run's record}``."""
    rows = []
    for shape_set, record in records.items():
        for entry in record.get("results", []):
            shape = "x".join(str(s) for s in entry.get("shape", []))
            for t in entry.get("timings", []):
                median = t.get("median_s")
                rows.append(
                    {
                        "set": shape_set,
                        "shape": shape,
                        "layout": entry.get("layout"),
                        "op": t.get("op"),
                        "peer": t.get("peer"),
                        "median_ms": None if median is None else 1e3 * median,
                        "speedup": t.get("speedup"),
                        "x_copy": t.get("x_copy"),
                    }
                )
    return rows


def _targets(record: dict[str, Any]) -> dict[str, Any]:
    """How many of the record's own target checks were judged and met."""
    targets = record.get("summary", {}).get("targets", {})
    judged = [v for v in targets.values() if isinstance(v, dict) and v.get("met") is not None]
    return {
        "peer": targets.get("peer"),
        "met": sum(bool(v["met"]) for v in judged),
        "of": len(judged),
    }


def bench_context(quick: Any, representative: Any) -> dict[str, Any]:
    """The bench section from its two records (either may be ``None``)."""
    records = {
        name: record
        for name, record in (("quick", quick), ("representative", representative))
        if record
    }
    if not records:
        return {"records": None}
    rows = bench_rows(records)
    rows.sort(
        key=lambda r: (
            _BENCH_SETS[r["set"]],
            r["shape"],
            _BENCH_OPS.get(str(r["op"]), 9),
            str(r["peer"]),
        )
    )
    targets = _targets(representative) if representative else None
    either = representative or quick
    # The peer the targets are about is this library's fast backend (numba on a CPU).
    ours = either.get("summary", {}).get("targets", {}).get("peer")
    speedups = [
        {
            "shape": "x".join(str(s) for s in entry["shape"]),
            "layout": entry["layout"],
            **{t["op"]: t["speedup"] for t in entry["timings"] if t["peer"] == ours},
        }
        for entry in (representative or {}).get("results", [])
    ]
    shapes = {
        name: ", ".join(f"{'x'.join(map(str, e['shape']))} {e['layout']}" for e in r["results"])
        for name, r in records.items()
    }
    first_call = (quick or {}).get("first_call", {}).get(ours) or {}
    return {
        "records": records,
        "rows": rows,
        "shapes": shapes,
        "targets": targets,
        "ours": ours,
        "baseline": either.get("settings", {}).get("baseline"),
        "speedups": speedups,
        "first_call": first_call,
    }


def bench(out: Path) -> dict[str, Any]:
    return bench_context(
        load(out, "bench", "bench.json"), load(out, "bench", "bench-representative.json")
    )
