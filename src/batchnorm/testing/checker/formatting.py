"""The report as text: the table ``batchnorm conform`` prints, the grouped diagnoses, the
summary line."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .diagnose import NO_FIT

if TYPE_CHECKING:
    from .report import Check, Report


def _ratio(c: Check) -> float:
    if c.error is None or c.tol is None:
        return 0.0
    return c.error / c.tol if c.tol > 0 else (math.inf if c.error > 0 else 0.0)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1e}"


def summary(report: Report) -> str:
    """One line: PASS or FAIL with the counts of checks and cases."""
    cases = list(dict.fromkeys(c.case for c in report.checks))
    skipped = [n for n in cases if all(c.verdict == "skip" for c in report.checks if c.case == n)]
    ran = len(cases) - len(skipped)
    n_pass = sum(c.verdict == "pass" for c in report.checks)
    n_fail = sum(c.verdict == "FAIL" for c in report.checks)
    n_error = sum(c.verdict == "ERROR" for c in report.checks)
    bad_cases = len({c.case for c in report.failures})
    tail = f" ({len(skipped)} case(s) skipped)" if skipped else ""
    if report.ok:
        return f"PASS: all {n_pass} checks in {ran} cases{tail}"
    if not ran or n_pass + n_fail + n_error == 0:
        return f"FAIL: nothing could be checked{tail}"
    return (
        f"FAIL: {n_fail} check(s) failed and {n_error} raised an error, in {bad_cases} "
        f"of {ran} cases; {n_pass} passed{tail}"
    )


def table(report: Report, *, verbose: bool = False) -> str:
    """The report as a text table; passing cases collapse to one row unless ``verbose``."""
    rows: list[tuple[str, ...]] = []
    by_case: dict[str, list[Check]] = {}
    for c in report.checks:
        by_case.setdefault(c.case, []).append(c)
    first_seen: dict[str, str] = {}  # error message -> first case that raised it
    for name, checks in by_case.items():
        if not verbose and all(c.verdict == "skip" for c in checks):
            continue
        if not verbose and all(c.verdict in ("pass", "skip") for c in checks):
            passed = [c for c in checks if c.verdict == "pass"]
            worst = max(passed, key=_ratio)
            rows.append(
                (
                    name,
                    f"all {len(passed)}",
                    _num(worst.error),
                    _num(worst.tol),
                    "pass",
                    f"worst: {worst.quantity}",
                )
            )
            continue
        for c in checks:
            if not verbose and c.verdict in ("pass", "skip"):
                continue
            text = c.diagnosis
            if c.verdict in ("ERROR", "FAIL") and not verbose and text:
                # The same exception or diagnosis in every case says nothing new after
                # the first; the per-case error still shows where it bites.
                first = first_seen.setdefault(f"{c.quantity}\0{text}", c.case)
                if first != c.case:
                    text = f"same {'error' if c.verdict == 'ERROR' else 'as'} {first}"
                    text = text.replace("same error", "same error as")
            rows.append((c.case, c.quantity, _num(c.error), _num(c.tol), c.verdict, text))
    header = ("case", "quantity", "max error", "tol", "verdict", "diagnosis")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    return "\n".join(line.rstrip() for line in lines)


def diagnoses(report: Report) -> str:
    """Each distinct diagnosis of a failure, with the cases and quantities it covers."""
    groups: dict[str, tuple[set[str], list[str]]] = {}
    for c in report.failures:
        # Unnamed failures differ only in their worst element: one group for them all.
        text = NO_FIT if c.diagnosis.startswith(NO_FIT + " (worst") else c.diagnosis
        cases, quantities = groups.setdefault(text, (set(), []))
        cases.add(c.case)
        if c.quantity not in quantities:
            quantities.append(c.quantity)
    if not groups:
        return ""
    lines = ["diagnoses:"]
    for text, (cases, quantities) in sorted(groups.items(), key=lambda g: -len(g[1][0])):
        lines.append(f"  {len(cases):>3} case(s), {', '.join(quantities)}: {text}")
    return "\n".join(lines)


def format_report(report: Report, *, verbose: bool = False) -> str:
    """Header, notes, table, diagnoses (if anything failed) and summary."""
    parts = [
        report.signature,
        *[f"note: {n}" for n in report.notes],
        "",
        table(report, verbose=verbose),
    ]
    if report.failures:
        parts += ["", diagnoses(report)]
    parts += ["", summary(report)]
    return "\n".join(parts)
