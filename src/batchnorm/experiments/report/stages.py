"""The report's stages, written once: ``STAGES`` is the only list of them.

Each row names a stage (its directory under ``DIR``, its ``--skip`` value and its section's
id), the section's title, the callable that runs it, the template that shows it, and
optionally the function that turns its records into the template's context (without one the
template gets ``records``, the stage's ``records.json``). Stages run in this order and the page
shows their sections in the same order.

A runner is ``run(out, options) -> Any``: it writes its records under ``out`` and may raise
``Skipped`` when it cannot run in this installation. Imports happen inside the runners, so
that reading this table imports neither torch nor matplotlib.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..common import progress, write_csv, write_json
from . import sections


class Skipped(Exception):
    """A stage that cannot run in this installation (a module it needs is missing)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``batchnorm report``'s options mean to every stage."""

    quick: bool = False
    seed: int = 0
    data: str = "mnist1d"
    backend: str = "auto"
    progress: bool = True


Runner = Callable[[Path, Options], Any]
Context = Callable[[Path], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Runner
    template: str
    context: Context | None = None


def run_verify(out: Path, options: Options) -> dict[str, Any]:
    try:
        from ... import verify
    except ImportError as exc:
        raise Skipped(f"batchnorm.verify is not available ({exc})") from exc
    rows = [
        {**dataclasses.asdict(check), "passed": check.passed}
        for check in verify.run_checks(seed=options.seed)
    ]
    write_json(out / "verify.json", {"rows": rows})
    write_csv(out / "verify.csv", rows)
    return {"passed": sum(r["passed"] for r in rows), "total": len(rows)}


def run_bench(out: Path, options: Options, *, bench: Any = None) -> dict[str, Any]:
    """Two runs of ``batchnorm.bench`` (or the module-like ``bench`` given): the quick shapes,
    where a call's fixed cost outweighs the work, into ``bench.json``, and the representative
    ones, where the kernels do the work, into ``bench-representative.json``; each record
    judges the targets on its own shapes."""
    if bench is None:
        try:
            from ... import bench
        except ImportError as exc:
            raise Skipped(f"batchnorm.bench is not available ({exc})") from exc
    settings = {"repeats": 5, "warmup": 1} if options.quick else {}
    records = {
        name: bench.run(shapes, progress=options.progress, **settings)
        for name, shapes in (
            ("quick", bench.QUICK_SHAPES),
            ("representative", bench.REPRESENTATIVE_SHAPES),
        )
    }
    write_json(out / "bench.json", records["quick"])
    write_json(out / "bench-representative.json", records["representative"])
    write_csv(out / "bench.csv", sections.bench_rows(records))
    (out / "bench.txt").write_text(
        "".join(f"{name} shapes:\n{bench.format_table(r)}\n\n" for name, r in records.items())
    )
    # One figure: the plot labels every shape, the caption says which set each belongs to.
    both = {**records["quick"], "results": [e for r in records.values() for e in r["results"]]}
    bench.plot(both, out / "bench.png")
    return records


def run_explain(out: Path, options: Options) -> dict[str, Any]:
    from ..explain import run

    return run(out, seed=options.seed, quiet=True)


#: The cases the report's framework table runs: where frameworks are known to part (a large
#: offset: a one-pass variance; float64: computing in float32) and plain ones as the control.
#: docs/frameworks.md holds the table over every case (``python -m batchnorm.testing.frameworks``).
FRAMEWORK_CASES = "rank2,rank4,large-offset,offset-rank4,rank2-f64,last-rank4-f64"
FRAMEWORK_CASES_QUICK = "rank2,large-offset,rank2-f64"
#: --quick measures one implementation per framework (each entry is a process start-up).
FRAMEWORK_ENTRIES_QUICK = ("pytorch-eager", "flax-linen", "keras-jax")


def run_frameworks(out: Path, options: Options, *, frameworks: Any = None) -> dict[str, Any]:
    """Every framework's own batch norm through the conformance suite, one process per entry
    (``batchnorm.testing.frameworks``, or the module-like ``frameworks`` given); ``--quick``
    runs fewer cases and leaves out ``torch.compile``, which compiles every case anew."""
    import importlib.util

    if frameworks is None:
        from ...testing import frameworks

    missing = [m for m in ("jax", "flax", "keras") if importlib.util.find_spec(m) is None]
    if len(missing) == 3:
        raise Skipped(
            "the frameworks extra is not installed (jax, flax, keras; scripts/setup.sh installs "
            "it): only PyTorch would be measured"
        )
    names = [entry.name for entry in frameworks.ENTRIES]
    omitted = {}
    if options.quick:
        omitted = {n: "--quick" for n in names if n not in FRAMEWORK_ENTRIES_QUICK}
        names = [n for n in names if n in FRAMEWORK_ENTRIES_QUICK]
    cases = FRAMEWORK_CASES_QUICK if options.quick else FRAMEWORK_CASES
    records = [
        record
        for name in progress(names, desc="frameworks", enabled=options.progress)
        for record in frameworks.measure_all([name], cases=cases)
    ]
    result = {
        "cases": cases,
        "omitted": omitted,
        "records": records,
        "table": frameworks.table_rows(records),
    }
    write_json(out / "records.json", result)
    (out / "frameworks.md").write_text(frameworks.markdown(records) + "\n")
    return result


def experiment(name: str, *, trains: bool = True) -> Runner:
    """The runner of ``batchnorm experiment NAME``; ``trains=False`` for one that takes no
    data, backend or progress bar."""

    def run(out: Path, options: Options) -> dict[str, Any]:
        from ..cli import run_experiment

        kwargs: dict[str, Any] = {"seed": options.seed, "quick": options.quick}
        if trains:
            kwargs.update(data=options.data, backend=options.backend, progress=options.progress)
        return run_experiment(name, out, **kwargs)

    run.__name__ = f"run_{name.replace('-', '_')}"
    return run


STAGES: tuple[Stage, ...] = (
    Stage(
        "explain",
        "Why the mean and variance carry gradient",
        run_explain,
        "explain.html.j2",
        sections.explain,
    ),
    Stage(
        "moments",
        "What goes wrong without them",
        experiment("moments"),
        "moments.html.j2",
        sections.moments,
    ),
    Stage(
        "ioffe",
        "Reproducing Ioffe & Szegedy 2015, Figure 1",
        experiment("ioffe"),
        "ioffe.html.j2",
        sections.ioffe,
    ),
    Stage(
        "landscape",
        "The landscape along the gradient (Santurkar et al. 2018)",
        experiment("landscape"),
        "landscape.html.j2",
        sections.landscape,
    ),
    Stage(
        "reparam",
        "Batch norm as a reparameterisation (Kohler et al. 2019)",
        experiment("reparam", trains=False),
        "reparam.html.j2",
        sections.reparam,
    ),
    Stage(
        "precise",
        "When the moving average lags: PreciseBN (Wu & Johnson 2021)",
        experiment("precise"),
        "precise.html.j2",
    ),
    Stage(
        "small-batch",
        "Small and padded batches",
        experiment("small-batch"),
        "small_batch.html.j2",
        sections.small_batch,
    ),
    Stage(
        "frameworks",
        "Batch norm across frameworks",
        run_frameworks,
        "frameworks.html.j2",
    ),
    Stage(
        "verify",
        "The reference against its oracles",
        run_verify,
        "verify.html.j2",
        sections.verify,
    ),
    Stage(
        "bench",
        "A benchmark: quick and representative shapes",
        run_bench,
        "bench.html.j2",
        sections.bench,
    ),
)


def names(stages: tuple[Stage, ...] = STAGES) -> list[str]:
    return [stage.name for stage in stages]
