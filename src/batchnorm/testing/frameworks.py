"""Batch norm across frameworks: every framework's own layer run through the conformance suite.

``python -m batchnorm.testing.frameworks --out DIR`` measures PyTorch (eager layers and
``F.batch_norm`` under ``torch.compile``), Flax linen and nnx (default and
``use_fast_variance=False``) and Keras 3 on the JAX and PyTorch backends against the reference,
and writes ``DIR/frameworks.json`` (the records) and ``DIR/frameworks.md`` (the table).
:func:`measure_all` returns the same records to Python (the report builds its section from them).

Each entry runs in a process of its own: Keras reads ``KERAS_BACKEND`` once, at import, and the
frameworks' global settings (JIT caches, dynamo's) stay out of each other's way. Conventions are
inferred, not declared (the table says which ones each framework follows), and every deviation
is listed with the mistake the suite names for it, the error as a multiple of the tolerance and,
where one exists, the upstream issue.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cases import CASES, select_cases

__all__ = [
    "ENTRIES",
    "Entry",
    "adapter_for",
    "markdown",
    "measure",
    "measure_all",
    "main",
    "table_rows",
]


@dataclass(frozen=True)
class Entry:
    name: str
    label: str
    #: environment the entry's process needs (the Keras backend)
    env: dict[str, str] = field(default_factory=dict)
    #: modules that must be importable, else the entry is reported as not run
    needs: tuple[str, ...] = ()


_FLAX = ("flax", "jax")
ENTRIES: tuple[Entry, ...] = (
    Entry("pytorch-eager", "PyTorch `torch.nn.BatchNorm1d/2d/3d`, eager", needs=("torch",)),
    Entry("pytorch-compile", "PyTorch `F.batch_norm` under `torch.compile`", needs=("torch",)),
    Entry("flax-linen", "Flax `linen.BatchNorm`, defaults", needs=_FLAX),
    Entry(
        "flax-linen-two-pass",
        "Flax `linen.BatchNorm(use_fast_variance=False)`",
        needs=_FLAX,
    ),
    Entry("flax-nnx", "Flax `nnx.BatchNorm`, defaults", needs=_FLAX),
    Entry("flax-nnx-two-pass", "Flax `nnx.BatchNorm(use_fast_variance=False)`", needs=_FLAX),
    Entry(
        "keras-jax",
        "Keras 3 `layers.BatchNormalization`, JAX backend",
        {"KERAS_BACKEND": "jax"},
        ("keras", "jax"),
    ),
    Entry(
        "keras-torch",
        "Keras 3 `layers.BatchNormalization`, PyTorch backend",
        {"KERAS_BACKEND": "torch"},
        ("keras", "torch"),
    ),
    Entry(
        "keras-tensorflow",
        "Keras 3 `layers.BatchNormalization`, TensorFlow backend",
        {"KERAS_BACKEND": "tensorflow"},
        ("keras", "tensorflow"),
    ),
)
_BY_NAME = {e.name: e for e in ENTRIES}

#: Upstream reports of a deviation, by (entry prefix, mistake key). Checked by hand against the
#: framework's source of the measured version (see docs/frameworks.md).
UPSTREAM: dict[tuple[str, str], str] = {
    ("flax-linen", "one_pass"): "google/flax#1491 (open): one-pass variance by default",
    ("flax-nnx", "one_pass"): "google/flax#1491 (open): one-pass variance by default",
    ("keras-", "float32_compute"): (
        "keras-team/keras#23223 (closed by keras-team/keras#23225): `result_type` demotes "
        "float64 to float32, so BatchNormalization and `ops.mean` compute float64 in float32 "
        "(still so in keras 3.15.1)"
    ),
    ("keras-torch", "one_pass"): (
        "keras-team/keras-core#866 made `ops.moments` one-pass; keras-team/keras#18795 fixed "
        "JAX and TensorFlow, not PyTorch"
    ),
}

_VERSIONED = ("torch", "jax", "flax", "keras")


def versions(names: Sequence[str] = _VERSIONED) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones left out)."""
    found = {}
    for name in names:
        # TensorFlow's CPU wheel is distributed as tensorflow-cpu, imported as tensorflow
        for dist in (name, f"{name}-cpu"):
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                pass
    return found


def _compiled_batch_norm() -> Any:
    import torch
    import torch._dynamo

    # Every case is a new shape and dtype; past the default limit dynamo would fall back to
    # eager silently and the row would measure the wrong thing.
    torch._dynamo.config.cache_size_limit = 1024
    compiled = torch.compile(torch.nn.functional.batch_norm)
    compiled.__name__ = "torch.compile(F.batch_norm)"
    return compiled


def adapter_for(name: str) -> Any:
    """The conformance adapter of entry ``name``, built in this process (imports its framework;
    for the Keras entries, KERAS_BACKEND must already be the entry's)."""
    from . import adapters

    if name == "pytorch-eager":
        import torch

        return adapters.ModuleStyle(
            [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d]
        )
    if name == "pytorch-compile":
        return adapters.FunctionalStyle(_compiled_batch_norm())
    if name.startswith("flax-"):
        options = {"use_fast_variance": False} if name.endswith("-two-pass") else {}
        if name.startswith("flax-linen"):
            import flax.linen as nn

            return adapters.FlaxLinenStyle(nn.BatchNorm, **options)
        from flax import nnx

        return adapters.FlaxNnxStyle(nnx.BatchNorm, **options)
    if name.startswith("keras-"):
        import keras

        return adapters.KerasStyle(keras.layers.BatchNormalization)
    raise ValueError(f"unknown entry {name!r}; known: {', '.join(_BY_NAME)}")


def not_run_reason(entry: Entry) -> str | None:
    """Why ``entry`` cannot run here (a framework is not installed), or None."""
    missing = [m for m in entry.needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    return None


def _deviations(entry: str, report: Any) -> list[dict[str, Any]]:
    """The report's failures grouped by what the suite names (a mistake key, else the text)."""
    groups: dict[str, dict[str, Any]] = {}
    for row in report.failures:
        key = row.mistakes[0] if row.mistakes else None
        text = row.diagnosis
        if key is None and text.startswith("no known mistake fits ("):
            text = "no known mistake fits"  # they differ only in their worst element
        group = groups.setdefault(
            key or text,
            {"mistake": key, "diagnosis": text, "cases": [], "quantities": [], "rows": 0,
             "upstream": None},
        )  # fmt: skip
        group["rows"] += 1
        if row.case not in group["cases"]:
            group["cases"].append(row.case)
        if row.quantity not in group["quantities"]:
            group["quantities"].append(row.quantity)
        if row.error is not None and row.tol:
            ratio = float(row.error / row.tol) if np.isfinite(row.error) else float("inf")
            if ratio > group.get("worst_ratio", -1.0):
                group.update(
                    worst_ratio=ratio, worst_error=float(row.error), worst_tol=float(row.tol)
                )
                group["worst_at"] = f"{row.case} {row.quantity}"
        if key:
            group["upstream"] = next(
                (v for (p, k), v in UPSTREAM.items() if k == key and entry.startswith(p)), None
            )
    # Named mistakes first: the consequences ("consistent with its own forward") follow.
    return sorted(groups.values(), key=lambda g: (g["mistake"] is None, -len(g["cases"])))


def measure(name: str, cases: Sequence[Any] = CASES) -> dict[str, Any]:
    """Run entry ``name`` in this process; its record (see :func:`measure_all`)."""
    from .checker import check

    entry = _BY_NAME[name]
    record: dict[str, Any] = {
        "entry": name, "label": entry.label, "versions": versions(entry.needs)
    }  # fmt: skip
    reason = not_run_reason(entry)
    if reason is not None:
        return {**record, "status": "not run", "reason": reason}
    start = time.perf_counter()
    adapter = adapter_for(name)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the frameworks' own warnings; the rows say it all
        report = check(adapter, cases, momentum_convention=None, running_var=None)
    skipped: dict[str, list[str]] = {}
    for row in report.checks:
        if row.verdict == "skip":
            skipped.setdefault(row.diagnosis, []).append(row.case)
    counted = [c for c in report.checks if c.verdict in ("pass", "FAIL", "ERROR")]
    return {
        **record,
        "status": "measured",
        "signature": report.signature,
        "ok": report.ok,
        "summary": report.summary(),
        "checks": len(counted),
        "passed": sum(c.verdict == "pass" for c in counted),
        "failed": sum(c.verdict == "FAIL" for c in counted),
        "errors": sum(c.verdict == "ERROR" for c in counted),
        "cases": len({c.case for c in counted}),
        "skipped": skipped,
        "conventions": list(report.running_convention or ()),
        "convention_note": next((n for n in report.notes if n.startswith("running stat")), ""),
        "deviations": _deviations(name, report),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _child_env(entry: Entry) -> dict[str, str]:
    env = {**os.environ, **entry.env}
    # The child imports this very package, wherever it was imported from here.
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def measure_all(
    names: Sequence[str] | None = None, cases: str | None = None, timeout: float = 1800
) -> list[dict[str, Any]]:
    """One record per entry, each measured in a fresh process: ``entry``, ``label``,
    ``versions``, ``status`` ("measured", "not run" with ``reason``, or "error" with
    ``reason``), and when measured ``checks``/``passed``/``failed``/``errors``, ``cases``,
    ``skipped`` {reason: cases}, ``conventions`` [momentum, running variance] as inferred,
    ``deviations`` [{mistake, diagnosis, cases, quantities, worst_ratio, worst_error,
    worst_tol, worst_at, upstream}] and ``seconds``. ``cases``: shell patterns, as
    ``batchnorm conform --cases``."""
    records = []
    for name in names or [e.name for e in ENTRIES]:
        entry = _BY_NAME[name]
        reason = not_run_reason(entry)
        if reason is not None:
            records.append(
                {"entry": name, "label": entry.label, "versions": versions(entry.needs),
                 "status": "not run", "reason": reason}
            )  # fmt: skip
            continue
        command = [sys.executable, "-m", "batchnorm.testing.frameworks", "--entry", name]
        if cases:
            command += ["--cases", cases]
        try:
            done = subprocess.run(
                command, env=_child_env(entry), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0:
            tail = "timed out" if done is None else (done.stderr.strip().splitlines() or ["?"])[-1]
            records.append(
                {"entry": name, "label": entry.label, "versions": versions(entry.needs),
                 "status": "error", "reason": tail}
            )  # fmt: skip
            continue
        records.append(json.loads(done.stdout))
    return records


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if not np.isfinite(value) else f"{value:.2g}x"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_CONVENTION = {
    "torch": "momentum weighs the new batch",
    "keras": "momentum weighs the old value",
    "unbiased": "running var unbiased",
    "biased": "running var biased",
}


#: Failures that follow from another one in the same case, not deviations of their own.
_CONSEQUENCES = (
    "forward(train) is already wrong",
    "the running statistics it normalises with are invalid",
)


def _is_consequence(d: dict[str, Any]) -> bool:
    return d["mistake"] == "forward_stats" or d["diagnosis"].startswith(_CONSEQUENCES)


def table_rows(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The table's content, one row per entry, as plain text (the markdown table and the
    report's HTML are two renderings of it): ``rows`` [{implementation, versions, passed,
    conventions, deviations: [str], upstream: [str]}], ``mistakes`` {name: description} of the
    mistakes named, ``skipped``: the reasons cases were skipped."""
    from .mistakes import MISTAKES

    rows, named = [], []
    for r in records:
        row = {
            "implementation": r["label"],
            "versions": ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()) or "-",
            "status": r["status"],
        }
        if r["status"] != "measured":
            rows.append({**row, "passed": f"{r['status']}: {r['reason']}", "conventions": "",
                         "deviations": [], "upstream": []})  # fmt: skip
            continue
        passed = f"{r['passed']}/{r['checks']} in {r['cases']} cases"
        if r["skipped"]:
            passed += f" ({sum(len(v) for v in r['skipped'].values())} skipped)"
        devs, upstream, following = [], [], 0
        for d in r["deviations"]:
            if _is_consequence(d):
                following += d["rows"]
                continue
            what = f"`{d['mistake']}`" if d["mistake"] else d["diagnosis"]
            if d["mistake"] and d["mistake"] not in named:
                named.append(d["mistake"])
            error = d.get("worst_error")
            size = "" if error is None else f", error {error:.2g}"
            devs.append(
                f"{what} ({', '.join(d['cases'])}): {_ratio(d.get('worst_ratio'))} "
                f"({d.get('worst_at', '-')}{size})"
            )
            if d["upstream"] and d["upstream"] not in upstream:
                upstream.append(d["upstream"])
        if following:
            devs.append(f"and {following} failing check(s) that follow from these")
        conventions = ", ".join(_CONVENTION.get(c, c) for c in r["conventions"]) or "-"
        rows.append({**row, "passed": passed, "conventions": conventions, "deviations": devs,
                     "upstream": upstream})  # fmt: skip
    skipped = sorted({reason for r in records for reason in r.get("skipped", {})})
    return {"rows": rows, "mistakes": {k: MISTAKES[k] for k in named}, "skipped": skipped}


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The table: one row per entry; each deviation with the mistake the suite names, its
    cases and its worst error as a multiple of the tolerance; a legend of the mistakes below."""
    table = table_rows(records)
    lines = [
        "| implementation | versions | checks passed | conventions found | deviations: mistake "
        "named (cases): worst error / tolerance | upstream issue |",
        "|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        if row["status"] != "measured":
            lines.append(f"| {row['implementation']} | {row['versions']} | "
                         f"{_cell(row['passed'])} | | | |")  # fmt: skip
            continue
        devs = "<br>".join(_cell(d) for d in row["deviations"]) or "none"
        lines.append(
            f"| {row['implementation']} | {row['versions']} | {row['passed']} | "
            f"{row['conventions']} | {devs} | {_cell('; '.join(row['upstream'])) or '-'} |"
        )
    if table["mistakes"]:
        lines += ["", "Mistakes named:"]
        lines += [f"- `{k}`: {_cell(v)}" for k, v in table["mistakes"].items()]
    if table["skipped"]:
        lines += ["", "Cases skipped, by reason:", *[f"- {_cell(s)}" for s in table["skipped"]]]
    return "\n".join(lines)


#: The generated block of docs/frameworks.md lies between these lines.
DOC_BEGIN = "<!-- frameworks table: generated by python -m batchnorm.testing.frameworks -->"
DOC_END = "<!-- end of generated table -->"


def update_doc(path: str, table: str) -> None:
    """Replace the generated block of the markdown file ``path`` with ``table``."""
    with open(path) as f:
        text = f.read()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"{path} has no generated block ({DOC_BEGIN} ... {DOC_END})")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}")


def generated_block(path: str) -> str:
    """The table currently in the generated block of ``path``."""
    with open(path) as f:
        text = f.read()
    return text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip("\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m batchnorm.testing.frameworks",
        description="Measure every framework's batch norm against the reference; write "
        "frameworks.json and frameworks.md (docs/frameworks.md).",
    )
    p.add_argument("--out", help="directory for frameworks.json and frameworks.md")
    p.add_argument("--entries", help=f"comma-separated, of: {', '.join(_BY_NAME)}")
    p.add_argument("--cases", help="shell patterns of case names (default: every case)")
    p.add_argument(
        "--doc",
        help="also rewrite the generated table of this markdown file (docs/frameworks.md), "
        "and keep the records next to it (same name, .json)",
    )
    p.add_argument("--entry", help=argparse.SUPPRESS)  # the child: one entry, JSON to stdout
    args = p.parse_args(argv)
    if args.entry:
        cases = select_cases(args.cases) if args.cases else CASES
        print(json.dumps(measure(args.entry, cases)))
        return 0
    names = args.entries.split(",") if args.entries else None
    unknown = [n for n in names or () if n not in _BY_NAME]
    if unknown:
        p.error(f"unknown entries {unknown}; known: {', '.join(_BY_NAME)}")
    records = measure_all(names, args.cases)
    table = markdown(records)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "frameworks.json"), "w") as f:
            json.dump(records, f, indent=1, default=float)
        with open(os.path.join(args.out, "frameworks.md"), "w") as f:
            f.write(table + "\n")
    if args.doc:
        update_doc(args.doc, table)
        with open(os.path.splitext(args.doc)[0] + ".json", "w") as f:
            json.dump(records, f, indent=1, default=float)
            f.write("\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
