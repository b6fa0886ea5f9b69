"""``check``: run an adapter over the cases, settle the conventions and the diagnoses that need
every case (one-pass), and assemble the :class:`Report`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ... import reference as ref
from ..adapters import Adapter
from ..cases import CASES, QUANTITIES, Case, tolerance
from .conventions import (
    MOMENTUM_CONVENTIONS,
    RUNNING_VARS,
    diagnose_running,
    resolve_running,
)
from .diagnose import ALL_NONFINITE, NO_FIT, named, precision
from .report import Check, Report
from .run import Outcome, run_case


def _one_pass_everywhere(outcomes: Sequence[Outcome]) -> None:
    """A large-offset forward that is not finite anywhere, from an implementation whose forward
    is finite on the ordinary cases: with few channels, the one-pass variance can come out
    negative in every channel. (An output that is NaN everywhere on every case names nothing.)"""
    forwards = [(o.case, o.quantities.get("forward(train)")) for o in outcomes]
    if not any(q and not c.large_offset and math.isfinite(q.error) for c, q in forwards):
        return
    for case, q in forwards:
        if q and q.failed and case.large_offset and ALL_NONFINITE in q.text:
            q.otherwise = (q.mistakes, q.text)
            q.mistakes, q.text = named("one_pass")


def _one_pass_only_at_large_offsets(outcomes: Sequence[Outcome]) -> None:
    """The one-pass formula breaks only where the offset is large. If the forward also fails an
    ordinary case with no named mistake, a large-offset failure is most likely that unknown
    mistake showing (a variance off by a constant factor fits one-pass's wide error budget
    there), not one-pass. (An ordinary failure that is named, say eps outside the sqrt, is a
    second mistake and leaves the one-pass diagnosis standing.)"""
    forwards = [(o.case, o.quantities.get("forward(train)")) for o in outcomes]
    if not any(q and q.failed and not q.mistakes and not c.large_offset for c, q in forwards):
        return
    for case, q in forwards:
        if q and case.large_offset and q.mistakes == ("one_pass",):
            mistakes, text = q.otherwise or ((), NO_FIT)
            q.mistakes = mistakes
            q.text = f"{text}; not the one-pass variance: ordinary cases fail too"


def check(
    adapter: Adapter,
    cases: Sequence[Case] = CASES,
    *,
    momentum: float = 0.1,
    momentum_convention: str | None = "auto",
    running_var: str | None = "auto",
) -> Report:
    """Run ``adapter`` on ``cases`` and compare with the reference.

    ``momentum`` is the value handed to the implementation. ``momentum_convention``
    (``"torch"``: momentum weighs the new batch; ``"keras"``: the old value) and
    ``running_var`` (``"unbiased"`` or ``"biased"``) are the conventions it declares; ``None``
    infers them (the convention that fits the most cases decides, and the report says which).
    ``"auto"`` (the default) takes the conventions the adapter's style implies (PyTorch's for
    the module and functional styles, which are defined as like torch.nn.BatchNorm and
    F.batch_norm) and infers them for the others.
    """
    implied = getattr(adapter, "conventions", None)
    style = adapter.style if implied else None
    # Which part the style decided (for the report's note): (momentum, variance).
    by_style = (style if momentum_convention == "auto" else None,
                style if running_var == "auto" else None)  # fmt: skip
    if momentum_convention == "auto":
        momentum_convention = implied[0] if implied else None
    if running_var == "auto":
        running_var = implied[1] if implied else None
    if momentum_convention not in (None, *MOMENTUM_CONVENTIONS):
        raise ValueError(
            f"momentum_convention must be one of {MOMENTUM_CONVENTIONS}, 'auto' or None, "
            f"got {momentum_convention!r}"
        )
    if running_var not in (None, *RUNNING_VARS):
        raise ValueError(
            f"running_var must be one of {RUNNING_VARS}, 'auto' or None, got {running_var!r}"
        )
    ref.check_momentum(momentum, "torch", "unbiased")
    if momentum is None or momentum in (0.0, 0.5, 1.0):
        raise ValueError(
            "momentum must be a number other than 0, 0.5 and 1 (at 0.5 the two momentum "
            "conventions coincide; at 0 and 1 one of them keeps the running statistics "
            f"unchanged, so a missing update would pass), got {momentum!r}"
        )
    outcomes = [run_case(adapter, case, momentum) for case in cases]
    _one_pass_everywhere(outcomes)
    _one_pass_only_at_large_offsets(outcomes)
    chosen, running_note = resolve_running(outcomes, momentum_convention, running_var, by_style)
    report = Report(f"style {adapter.style}: {adapter.signature}", [], [], chosen)
    if running_note:
        report.notes.append(running_note)
    if adapter.no_running is not None:
        report.notes.append(f"running statistics not checked: {adapter.no_running}")
    if adapter.no_eval is not None:
        report.notes.append(f"eval forward not checked: {adapter.no_eval}")
    skipped: dict[str, list[str]] = {}
    untracked = []
    for o in outcomes:
        for c in o.checks:
            if c.verdict == "skip":
                skipped.setdefault(c.diagnosis, []).append(c.case)
        if (
            adapter.no_running is None
            and not o.running
            and o.running_error is None
            and not any(c.verdict in ("skip", "ERROR") for c in o.checks)
        ):
            untracked.append(o.case.name)
        report.checks.extend(_rows(o, chosen))
    for reason, names in skipped.items():
        report.notes.append(f"skipped {len(names)} case(s), {reason}: {', '.join(names)}")
    if untracked:
        report.notes.append(
            "running statistics not checked (no running_mean/running_var "
            f"found) in {len(untracked)} case(s)"
        )
    return report


def _rows(o: Outcome, chosen: tuple[str, str] | None) -> list[Check]:
    rows: dict[str, Check] = {}
    for name, q in o.quantities.items():
        verdict = "FAIL" if q.failed else "pass"
        rows[name] = Check(
            o.case.name,
            name,
            verdict,
            q.error,
            q.tol,
            q.text if q.failed else "",
            q.mistakes if q.failed else (),
        )
    if o.running and chosen is not None and o.running_error is None:
        errors = o.running[chosen]
        for index, name in enumerate(("running_mean", "running_var")):
            tol = tolerance(o.case, name)
            failed = errors[index] > tol
            forward_failed = o.quantity("forward(train)").failed
            keys, text = (
                diagnose_running(o.running, chosen, index, tol, forward_failed)
                if failed
                else ((), "")
            )
            if failed and text.startswith(NO_FIT):
                keys, text = precision(o.case, name, errors[index]) or (keys, text)
            rows[name] = Check(
                o.case.name, name, "FAIL" if failed else "pass", errors[index], tol, text, keys
            )
    ordered = [rows[q] for q in QUANTITIES if q in rows]
    if o.running_error is not None:
        ordered.append(Check(o.case.name, "running", "ERROR", diagnosis=o.running_error))
    return ordered + o.checks
