"""The running-statistics conventions: which momentum meaning and which running variance an
implementation follows. Each step's running statistics are predicted from the implementation's
*own* previous values under every convention of ``reference.update_running_stats`` (and under
the usual mistakes: not updated, the padding counted, the forward's own wrong moments); the
declared convention decides the verdicts, or, when none is declared, the one that fits the most
cases is inferred and reported. The others serve as diagnoses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import reference as ref
from ..cases import real_values, tolerance
from ..mistakes import MISTAKES, Implied, rel_error
from .diagnose import FORWARD_WRONG, NO_FIT, named

if TYPE_CHECKING:
    from .run import Outcome

MOMENTUM_CONVENTIONS: tuple[str, ...] = ("torch", "keras")
RUNNING_VARS: tuple[str, ...] = ("unbiased", "biased")
COMBOS = tuple((c, v) for c in MOMENTUM_CONVENTIONS for v in RUNNING_VARS)

_MOMENTUM_MEANING = {
    "torch": "weighs the new batch (PyTorch meaning)",
    "keras": "weighs the old value (Keras/Flax/cs231n meaning)",
}


def _momentum_keys(fitting: str, expected: str) -> tuple[str, ...]:
    if fitting == expected:
        return ()
    return ("momentum_old",) if fitting == "keras" else ("momentum_new",)


def diagnose_running(
    errors: dict[Any, list[float]],
    chosen: tuple[str, str],
    index: int,
    tol: float,
    forward_failed: bool,
) -> tuple[tuple[str, ...], str]:
    """Which other convention (or not updating at all) fits running_mean (0) / running_var (1)."""
    others = sorted(
        (cv for cv in COMBOS if cv != chosen),
        key=lambda cv: (cv[0] != chosen[0]) + (cv[1] != chosen[1]),
    )
    for conv, var in others:
        if errors[(conv, var)][index] <= tol:
            keys = _momentum_keys(conv, chosen[0])
            if index == 1 and var != chosen[1]:
                keys += ("biased_running_var",) if var == "biased" else ("unbiased_running_var",)
            if keys:
                return keys, "; ".join(MISTAKES[k] for k in keys)
    if errors["not_updated"][index] <= tol:
        return named("not_updated")
    key = ("padding_counted", *chosen)
    if key in errors and errors[key][index] <= tol:
        return named("padding_counted")
    key = ("forward_stats", *chosen)
    if key in errors and errors[key][index] <= tol:
        return named("forward_stats")
    if forward_failed:
        return (), FORWARD_WRONG
    return (), NO_FIT


def resolve_running(
    outcomes: Sequence[Outcome],
    momentum_convention: str | None,
    running_var: str | None,
    by_style: tuple[str | None, str | None] = (None, None),
) -> tuple[tuple[str, str] | None, str]:
    """Pick the convention that decides the verdicts; returns it and a note for the report."""
    allowed = [
        cv for cv in COMBOS if momentum_convention in (None, cv[0]) and running_var in (None, cv[1])
    ]
    tracked = [o for o in outcomes if o.running]
    if not tracked:
        return None, ""

    def fits(o: Outcome, cv: tuple[str, str]) -> bool:
        assert o.running is not None
        em, ev = o.running[cv]
        return em <= tolerance(o.case, "running_mean") and ev <= tolerance(o.case, "running_var")

    declared = (momentum_convention, running_var)

    def agrees_where_inferred(a: tuple[str, str], b: tuple[str, str]) -> bool:
        return all(d is not None or x == y for d, x, y in zip(declared, a, b, strict=True))

    scores = [sum(fits(o, cv) for o in tracked) for cv in allowed]
    # When a declared part is wrong nothing allowed fits; the inferred part is then the one
    # that fits together with *some* value of the declared part, so that the diagnosis
    # names only what is wrong with the declaration.
    partial = [
        sum(
            any(fits(o, other) for other in COMBOS if agrees_where_inferred(cv, other))
            for o in tracked
        )
        for cv in allowed
    ]
    best = max(range(len(allowed)), key=lambda i: (scores[i], partial[i], -i))
    chosen = allowed[best]
    how = []
    parts = (("momentum", momentum_convention), ("variance", running_var))
    for (part, declared), style in zip(parts, by_style, strict=True):
        if style:
            how.append(f"{part} as style {style} implies")
        else:
            how.append(f"{part} {'declared' if declared else 'inferred'}")
    if by_style[0] and by_style[0] == by_style[1]:
        how = [f"as style {by_style[0]} implies"]
    note = (
        f"running statistics: momentum {_MOMENTUM_MEANING[chosen[0]]}, running variance "
        f"{chosen[1]} ({', '.join(how)}; fits {scores[best]} of {len(tracked)} cases)"
    )
    return chosen, note


def record_running(
    out: Outcome,
    x_all: np.ndarray,
    mask: np.ndarray | None,
    momentum: float,
    prev: tuple[np.ndarray, np.ndarray],
    cur: tuple[np.ndarray, np.ndarray],
    implied: Implied | None,
    eps: float,
) -> None:
    assert out.running is not None
    ax = out.case.channel_axis if mask is None else 1
    stats = ref.batch_stats(real_values(x_all, mask), ax)
    # A masked case: what the statistics of every position, padding included, would give.
    every = None if mask is None else ref.batch_stats(x_all, 1)
    predictions: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    for conv, var in COMBOS:
        new = ref.update_running_stats(
            prev[0],
            prev[1],
            0,
            stats.mean,
            stats.var,
            stats.count,
            momentum=momentum,
            convention=conv,
            variance=var,
            warn=False,
        )
        predictions[(conv, var)] = (new.running_mean, new.running_var)
        if implied is not None:
            new = ref.update_running_stats(
                prev[0],
                prev[1],
                0,
                implied.mean,
                implied.var(eps),
                stats.count,
                momentum=momentum,
                convention=conv,
                variance=var,
                warn=False,
            )
            predictions[("forward_stats", conv, var)] = (new.running_mean, new.running_var)
        if every is not None:
            new = ref.update_running_stats(
                prev[0],
                prev[1],
                0,
                every.mean,
                every.var,
                every.count,
                momentum=momentum,
                convention=conv,
                variance=var,
                warn=False,
            )
            predictions[("padding_counted", conv, var)] = (new.running_mean, new.running_var)
    predictions["not_updated"] = prev

    def scales(batch: ref.BatchStats) -> tuple[float, float]:
        """The larger of the two values each update mixes."""
        unbiased = batch.var * batch.count / (batch.count - 1)
        return (
            max(float(np.max(np.abs(prev[0]))), float(np.max(np.abs(batch.mean)))),
            max(float(np.max(np.abs(prev[1]))), float(np.max(unbiased))),
        )

    for key, (mean, var) in predictions.items():
        errors = out.running.setdefault(key, [0.0, 0.0])
        # the padding's statistics are on their own scale (float32 rounds them there)
        scale = scales(every if every is not None and key[0] == "padding_counted" else stats)
        for i, (actual, expected) in enumerate(((cur[0], mean), (cur[1], var))):
            e = rel_error(actual, expected, scale[i])
            errors[i] = max(errors[i], math.inf if math.isnan(e) else e)
