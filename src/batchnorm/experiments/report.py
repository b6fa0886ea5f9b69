"""``batchnorm report --out DIR [--quick] [--seed S]``: run everything, write ``DIR/index.html``.

Stages, each timed, each allowed to fail without losing the others (a failed stage is shown on
the page and makes the exit status 1; a stage whose module is not installed is skipped with a
note): ``verify`` (``batchnorm.verify.run_checks``), a quick ``bench`` (``batchnorm.bench``),
``explain``, and every experiment. Each writes its records under ``DIR/<stage>/``; the page is
built from those records only, with figures as relative files, so ``DIR`` can be copied or
served as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import html
import importlib
import inspect
import math
import os
import platform
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._args import non_negative_int, out_dir
from .common import Timer, read_json, torch_threads, write_csv, write_json
from .data import DATASETS, load_dataset

__all__ = ["main", "build_report", "render_html", "STAGES"]

STAGES = (
    "verify", "bench", "explain", "ioffe", "moments", "landscape", "reparam", "precise",
    "small-batch",
)  # fmt: skip


class Skipped(Exception):
    """A stage that cannot run in this installation (its module is missing)."""


def _rows(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows from dataclasses, named tuples, mappings or objects with attributes."""
    rows = []
    for item in items:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            row = dataclasses.asdict(item)
            if hasattr(item, "passed"):
                row["passed"] = bool(item.passed)
        elif hasattr(item, "_asdict"):
            row = dict(item._asdict())
        elif isinstance(item, dict):
            row = dict(item)
        else:
            row = {"value": str(item)}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- stages


def _stage_verify(out: Path, options: dict[str, Any]) -> dict[str, Any]:
    try:
        verify = importlib.import_module("batchnorm.verify")
    except ImportError as exc:
        raise Skipped(f"batchnorm.verify is not available ({exc})") from exc
    if not hasattr(verify, "run_checks"):
        raise Skipped("batchnorm.verify has no run_checks()")
    run_checks = verify.run_checks
    takes_seed = "seed" in inspect.signature(run_checks).parameters
    rows = _rows(run_checks(seed=options["seed"]) if takes_seed else run_checks())
    write_json(out / "verify.json", {"rows": rows})
    write_csv(out / "verify.csv", rows)
    passed = sum(bool(r.get("passed")) for r in rows)
    return {"rows": rows, "passed": passed, "total": len(rows)}


def _bench_rows(record: Any) -> list[dict[str, Any]]:
    """One row per (shape, peer, op) from ``batchnorm.bench.run``'s record."""
    if not isinstance(record, dict):
        return _rows(record)
    rows = []
    for entry in record.get("results", []):
        shape = "x".join(str(s) for s in entry.get("shape", []))
        for t in entry.get("timings", []):
            median = t.get("median_s")
            rows.append(
                {
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


def _stage_bench(out: Path, options: dict[str, Any]) -> dict[str, Any]:
    try:
        bench = importlib.import_module("batchnorm.bench")
    except ImportError as exc:
        raise Skipped(f"batchnorm.bench is not available ({exc})") from exc
    run = getattr(bench, "run", None)
    if not callable(run):
        raise Skipped("batchnorm.bench has no run()")
    parameters = inspect.signature(run).parameters
    args = [bench.QUICK_SHAPES] if "shapes" in parameters and hasattr(bench, "QUICK_SHAPES") else []
    wanted = {"quick": True, "progress": options["progress"]}
    if options["quick"]:
        wanted.update(repeats=5, warmup=1)
    record = run(*args, **{k: v for k, v in wanted.items() if k in parameters})
    rows = _bench_rows(record)
    write_json(out / "bench.json", record)
    write_csv(out / "bench.csv", rows)
    text = getattr(bench, "format_table", None)
    if callable(text) and isinstance(record, dict):
        (out / "bench.txt").write_text(text(record) + "\n")
    draw = getattr(bench, "plot", None)
    if callable(draw) and isinstance(record, dict):
        draw(record, out / "bench.png")
    return {"rows": rows}


def _stage_explain(out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from .explain import run

    return run(out, seed=options["seed"], quiet=True)


def _experiment_stage(name: str) -> Callable[[Path, dict[str, Any]], dict[str, Any]]:
    def stage(out: Path, options: dict[str, Any]) -> dict[str, Any]:
        from .cli import run_experiment

        kwargs = {"seed": options["seed"], "quick": options["quick"]}
        if name != "reparam":
            kwargs.update(
                data=options["data"], backend=options["backend"], progress=options["progress"]
            )
        return run_experiment(name, out, **kwargs)

    return stage


RUNNERS: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "verify": _stage_verify,
    "bench": _stage_bench,
    "explain": _stage_explain,
    **{
        name: _experiment_stage(name)
        for name in ("ioffe", "moments", "landscape", "reparam", "precise", "small-batch")
    },
}


def build_report(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    data: str = "mnist1d",
    backend: str = "auto",
    progress: bool = True,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every stage into ``out/<stage>/`` and write ``out/index.html``; returns the status."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(skip) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) to skip: {unknown}; stages: {list(STAGES)}")
    options = {"quick": quick, "seed": seed, "data": data, "backend": backend, "progress": progress}
    status: dict[str, Any] = {
        "options": options,
        "stages": {},
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    with Timer() as total:
        for name in STAGES:
            entry: dict[str, Any] = {"state": "skipped", "seconds": 0.0}
            if name in skip:
                entry["note"] = "skipped on request (--skip)"
            else:
                if progress:
                    print(f"[report] {name} ...", file=sys.stderr, flush=True)
                with Timer() as timer:
                    try:
                        RUNNERS[name](out / name, options)
                        entry["state"] = "ok"
                    except Skipped as exc:
                        entry["note"] = str(exc)
                    except Exception as exc:  # one failed stage must not lose the others
                        entry["state"] = "failed"
                        entry["note"] = f"{type(exc).__name__}: {exc}"
                        entry["traceback"] = traceback.format_exc(limit=6)
                entry["seconds"] = timer.seconds
                if progress:
                    print(
                        f"[report] {name}: {entry['state']} in {timer.seconds:.1f} s"
                        + (f" ({entry['note']})" if entry.get("note") else ""),
                        file=sys.stderr,
                        flush=True,
                    )
            status["stages"][name] = entry
    status["seconds"] = total.seconds
    write_json(out / "report.json", status)
    (out / "index.html").write_text(render_html(out, status))
    return status


# ------------------------------------------------------------------------------------ HTML

CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e3e6ec; --bg:#fafbfc; --blue:#1f77b4;
        --red:#d62728; --green:#2ca02c; --orange:#ff7f0e; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.55 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
main { max-width:1180px; margin:0 auto; padding:28px 22px 60px; }
header h1 { font-size:30px; margin:0 0 4px; letter-spacing:-0.5px; }
header p.sub { color:var(--muted); margin:0 0 18px; }
nav { display:flex; flex-wrap:wrap; gap:8px; margin:10px 0 26px; }
nav a { text-decoration:none; color:var(--blue); background:#fff; border:1px solid var(--line);
        border-radius:999px; padding:3px 12px; font-size:13px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(220px, 1fr)); gap:14px;
         margin:8px 0 26px; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card .big { font-size:26px; font-weight:650; letter-spacing:-0.5px; }
.card .label { color:var(--muted); font-size:13px; }
section { background:#fff; border:1px solid var(--line); border-radius:12px;
          padding:20px 24px; margin:0 0 22px; }
section h2 { margin:0 0 6px; font-size:21px; }
section .lead { color:#333a48; max-width:860px; }
figure { margin:16px 0; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px;
             background:#fff; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; max-width:900px; }
table { border-collapse:collapse; margin:10px 0 6px; font-size:13px; }
th, td { padding:4px 10px; border-bottom:1px solid var(--line); text-align:right; }
th:first-child, td:first-child { text-align:left; }
th { background:#f3f5f8; font-weight:600; }
tr:nth-child(even) td { background:#fbfcfd; }
.pass { color:var(--green); font-weight:600; } .fail { color:var(--red); font-weight:600; }
.note { background:#fff8e6; border:1px solid #f3dfa8; border-radius:8px; padding:8px 12px;
        color:#6b5310; font-size:14px; }
.error { background:#fdecec; border:1px solid #f2b8b8; border-radius:8px; padding:8px 12px;
         color:#8a1c1c; font-size:13px; white-space:pre-wrap; font-family:ui-monospace, monospace; }
pre { background:#f6f8fa; border:1px solid var(--line); border-radius:8px; padding:12px 14px;
      font-size:12.5px; line-height:1.45; overflow-x:auto; }
code { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:0.92em; }
.files { color:var(--muted); font-size:13px; } .files a { color:var(--blue); }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:18px; align-items:start; }
@media (max-width: 900px) { .grid2 { grid-template-columns:1fr; } }
footer { color:var(--muted); font-size:13px; text-align:center; margin-top:30px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec or 'pass')."""
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in columns)
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            if spec == "pass":
                cells.append(
                    f'<td class="{"pass" if value else "fail"}">{"pass" if value else "FAIL"}</td>'
                )
            else:
                cells.append(f"<td>{_e(_fmt(value, spec))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure(out: Path, relative: str, caption: str) -> str:
    if not (out / relative).exists():
        return f'<p class="note">Figure {_e(relative)} was not written.</p>'
    return (
        f'<figure><img src="{_e(relative)}" alt="{_e(caption)}" loading="lazy">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _files(out: Path, stage: str) -> str:
    directory = out / stage
    if not directory.is_dir():
        return ""
    names = sorted(
        p.name for p in directory.iterdir() if p.suffix in (".json", ".csv", ".txt", ".dot", ".svg")
    )
    links = ", ".join(f'<a href="{_e(stage)}/{_e(n)}">{_e(n)}</a>' for n in names)
    return f'<p class="files">Records: {links}</p>' if links else ""


def _section(
    sid: str,
    title: str,
    lead: str,
    body: str,
    status: dict[str, Any],
    out: Path,
    stages: Sequence[str] | None = None,
) -> str:
    notes = []
    for stage in stages or (sid,):
        entry = status["stages"].get(stage, {})
        if entry.get("state") == "failed":
            notes.append(
                f'<div class="error">{_e(stage)} failed: {_e(entry.get("note"))}\n'
                f"{_e(entry.get('traceback', ''))}</div>"
            )
        elif entry.get("state") == "skipped":
            notes.append(f'<p class="note">{_e(stage)} was skipped: {_e(entry.get("note"))}</p>')
    seconds = sum(status["stages"].get(s, {}).get("seconds", 0.0) for s in stages or (sid,))
    files = "".join(_files(out, s) for s in stages or (sid,))
    return (
        f'<section id="{_e(sid)}"><h2>{_e(title)}</h2><p class="lead">{lead}</p>'
        f"{''.join(notes)}{body}{files}"
        f'<p class="files">Ran in {seconds:.1f} s.</p></section>'
    )


def _load(out: Path, stage: str, name: str = "records.json") -> dict[str, Any] | None:
    path = out / stage / name
    try:
        return read_json(path) if path.exists() else None
    except ValueError:
        return None


def _cards(out: Path) -> str:
    cards = []
    io = _load(out, "ioffe")
    if io:
        s = io["summary"]
        cards.append(
            (
                f"{s['bn']['final_test_accuracy_mean']:.2f} vs "
                f"{s['plain']['final_test_accuracy_mean']:.2f}",
                f"test accuracy with vs without BN after {io['config']['steps']} steps "
                f"({io['config']['data']['name']}, {io['config']['seeds']} seeds)",
            )
        )
    mo = _load(out, "moments")
    if mo:
        err = mo["gradient_check"]["overall_rel_error"]
        cards.append(
            (
                f"{err['full']:.0e} vs {err['no mean grad']:.2g}",
                "relative gradient error ‖g − fd‖/‖fd‖ against finite differences: the true "
                "gradient vs the one with the mean treated as a constant",
            )
        )
    ex = _load(out, "explain", "explain.json")
    if ex:
        steps = ex["two_sample"]["batch_norm"]["steps"]
        true_dx = ", ".join(f"{v + 0.0:.3g}" for v in steps["true"]["dl_dx"])  # + 0.0: no -0
        cards.append(
            (
                f"dx = ({true_dx})",
                "the true input gradient in the two-sample example of the question "
                "“why take the gradient of the batch mean?” "
                f"(mean as a constant: {steps['mean constant']['dl_dx'][0]:.2f} each)",
            )
        )
    rp = _load(out, "reparam")
    if rp:
        cards.append(
            (
                f"{rp['summary']['max_abs_error']:.0e}",
                "max |BN(xᵀw) − γ xᵀw/‖w‖_S − β| in float64 (Kohler et al.)",
            )
        )
    pr = _load(out, "precise")
    if pr:
        s = pr["summary"]
        cards.append(
            (
                f"{s['final_precise_accuracy']:.2f} vs {s['final_ema_accuracy']:.2f}",
                "test accuracy with PreciseBN statistics vs the moving average, same weights "
                f"({pr['settings']['seeds']} seeds)",
            )
        )
    ve = _load(out, "verify", "verify.json")
    if ve:
        rows = ve["rows"]
        cards.append(
            (
                f"{sum(bool(r.get('passed')) for r in rows)}/{len(rows)}",
                "reference checks passed (batchnorm verify)",
            )
        )
    return "".join(
        f'<div class="card"><div class="big">{_e(big)}</div>'
        f'<div class="label">{_e(label)}</div></div>'
        for big, label in cards
    )


def _explain_body(out: Path) -> str:
    ex = _load(out, "explain", "explain.json")
    if not ex:
        return ""
    text = (
        (out / "explain" / "explain.txt").read_text()
        if (out / "explain" / "explain.txt").exists()
        else ""
    )
    rendered = ex.get("files", {}).get("rendered", [])
    graph = (
        "explain/bn_graph.svg"
        if "bn_graph.svg" in rendered
        else "explain/bn_graph.png"
        if "bn_graph.png" in rendered
        else None
    )
    graph_html = (
        _figure(
            out,
            graph,
            "Batch norm on three examples: every edge carries its local "
            "derivative at this batch. Red: the “triangle of (gradient) death” of the "
            "question that asks how to backpropagate through it — x1 reaches x̂1 directly "
            "and through μ. The two red routes do not cancel each other: shift every input "
            "by δ and the direct route from x1 is cancelled by the m routes from all the "
            "inputs through μ (the routes through σ² cancel among themselves), which is why "
            "every row of the Jacobian J = ∂x̂/∂x sums to zero.",
        )
        if graph
        else '<p class="note">Graphviz is not installed, so the graph is '
        'only available as <a href="explain/bn_graph.dot">DOT</a>.</p>'
    )
    return f"<pre>{_e(text)}</pre>{graph_html}" + _figure(
        out,
        "explain/jacobian.png",
        "The matrix M with dl/dx = M·dl/dy for one channel of 8 values (M is the "
        "transpose of the Jacobian J above, so its columns are J's rows). With the "
        "true gradient every column sums to 0: a backward step never moves the "
        "batch mean, which the forward ignores (“moves batch mean” in the titles is the "
        "largest |column sum|). And x̂ᵀM is 0 up to ε: a step never rescales the batch "
        "(“rescales batch” is max |x̂ᵀM|). Drop a moment's gradient and that protection "
        "is gone.",
    )


def _moments_body(out: Path) -> str:
    mo = _load(out, "moments")
    if not mo:
        return ""
    minimal = mo["minimal_case"]
    rows = []
    for key in (
        "shift/true gradient",
        "shift/moment as constant",
        "scale/true gradient",
        "scale/moment as constant",
    ):
        m = minimal[key]
        rows.append(
            {
                "case": key.replace("/", ": "),
                "max_abs_grad": m["max_abs_grad"],
                "increment_mean": m["increment_mean"],
                "increment_spread": m["increment_spread"],
                "final_param": m["final_param"],
                "max_loss_change": m["max_loss_change"],
            }
        )
    minimal_table = _table(
        rows,
        [
            ("case", "case", ""),
            ("max_abs_grad", "max |gradient|", ".2g"),
            ("increment_mean", "mean step", ".4g"),
            ("increment_spread", "range of the step (max − min)", ".1e"),
            ("final_param", f"value after {minimal['steps']} steps", ".4g"),
            ("max_loss_change", "max loss change", ".1e"),
        ],
    )
    finals: dict[str, list[float]] = {}
    for run in mo.get("runs", []):
        if run["history"]:
            finals.setdefault(run["variant"], []).append(run["history"][-1]["test_accuracy"])
    summary_rows = []
    for v, stats in mo["summary"].items():
        accs = finals.get(v, [])
        spread = f" ({min(accs):.3f}..{max(accs):.3f})" if len(accs) > 1 else ""
        summary_rows.append(
            {"variant": v, **stats, "accuracy": f"{stats['final_test_accuracy']:.3f}{spread}"}
        )
    summary_table = _table(
        summary_rows,
        [
            ("variant", "gradient", ""),
            ("accuracy", "test accuracy", ""),
            ("final_train_loss", "train loss", ".3f"),
            ("final_bias_norm", "‖pre-BN biases‖", ".3g"),
            ("initial_weight_norm", "‖weights‖ at start", ".3g"),
            ("final_weight_norm", "‖weights‖ at end", ".3g"),
        ],
    )
    variants = list(mo["variants"])
    check_columns = (
        [("group", "parameters", ""), ("fd_norm", "‖fd‖", ".2g")]
        + [(f"{v}/rel_error", f"{v}: rel. error", ".1e") for v in variants]
        + [(f"{v}/abs_error", f"{v}: abs. error", ".1e") for v in variants[1:2]]
    )
    check_table = _table(mo["gradient_check"]["table"], check_columns)
    config = mo["config"]
    summary = mo["summary"]

    def norm(variant: str, key: str) -> str:
        value = summary.get(variant, {}).get(key)
        return "–" if value is None else f"{value:.3g}"

    return (
        "<h3>The minimal case of the paper's section 2</h3>"
        + _figure(
            out,
            "moments/moments_minimal.png",
            "Left and middle (the shift): x = u + b, x̂ = x − E[x], loss = mean((x̂ − t)²). "
            "Treat E[x] as a constant and every SGD step moves b by the same amount, "
            "forever, while the loss does not change in the 16th digit. The true gradient "
            "with respect to b is exactly zero. Right (the scale): x = c·u normalised by "
            "its standard deviation. Treated as a constant, the standard deviation lets c "
            "grow without end as well, though by shrinking steps (c grows like √t, c² by "
            "about the same amount each step); the true gradient is again zero.",
        )
        + minimal_table
        + "<h3>The ablation in training</h3>"
        + _figure(
            out,
            "moments/moments_ablation.png",
            f"{config['data']['name']}, 3×100 sigmoid MLP with BN, SGD lr {config['lr']}, "
            f"{config['steps']} steps, {config['seeds']} seed(s) (line = mean, band = "
            "min..max over seeds). Without the mean's gradient the pre-BN biases, whose "
            "true gradient is 0, drift far from 0 (‖b‖ at the end, mean over seeds: "
            f"{norm('no mean grad', 'final_bias_norm')} without the mean's gradient, "
            f"{norm('neither', 'final_bias_norm')} without either, "
            f"{norm('full', 'final_bias_norm')} with the true gradient). With the true "
            "gradient ‖w‖ can only grow, and only at second order (the gradient of a "
            "scale-invariant loss is orthogonal to w, so a step adds lr²‖g‖² to ‖w‖²): "
            f"{norm('full', 'initial_weight_norm')} → {norm('full', 'final_weight_norm')} "
            "here. The wrong gradients are not orthogonal to w, and the weights grew more "
            f"(to {norm('no var grad', 'final_weight_norm')} without the variance's "
            f"gradient, {norm('no mean grad', 'final_weight_norm')} without the mean's). "
            "Test accuracy is the mean over seeds, with min..max in brackets.",
        )
        + summary_table
        + "<h3>Which gradient is the gradient?</h3>"
        + _figure(
            out,
            "moments/moments_gradcheck.png",
            "At one point — the network trained with the true gradient (seed "
            f"{config['seed']}), in float64, on one mini-batch — each variant's gradient "
            "against central finite differences of the actual loss, at "
            f"{mo['gradient_check']['coordinates_per_tensor']} random coordinates per "
            "parameter tensor. Relative error = ‖g − fd‖/‖fd‖ over those coordinates "
            "(‖fd‖ is their norm too, not the whole gradient's).",
        )
        + check_table
        + '<p class="files">Pre-BN biases have a true gradient of zero, so their relative '
        "error is undefined (–); their absolute error is the gradient the variant invents.</p>"
    )


def _ioffe_body(out: Path) -> str:
    io = _load(out, "ioffe")
    if not io:
        return ""
    rows = []
    for variant, label in io["variants"].items():
        s = io["summary"][variant]
        rows.append(
            {
                "variant": label,
                "mean": s["final_test_accuracy_mean"],
                "min": s["final_test_accuracy_min"],
                "max": s["final_test_accuracy_max"],
                "seeds": ", ".join(f"{a:.3f}" for a in s["final_test_accuracy"]),
            }
        )
    c = io["config"]
    return (
        _figure(
            out,
            "ioffe/ioffe.png",
            f"{c['data']['name']} ({c['data']['train']} train / {c['data']['test']} test), "
            f"3×100 sigmoid units, N(0, {c['init_std']}²) init, batch {c['batch_size']}, "
            f"SGD lr {c['lr']}, {c['steps']} steps. (a) test accuracy, mean of "
            f"{c['seeds']} seeds with min..max band; (b, c) the 15th/50th/85th "
            "percentiles of the input to one sigmoid of the last hidden layer, over the "
            f"test set, for seed {c['seed']}. With BN that input is the BN output, so it "
            "stays near N(β, γ²) largely by construction, as in the paper; without BN it "
            "drifts and spreads. Without BN this network stalls early: sigmoid units, a "
            "small initialisation and lr 0.1 leave the lower layers with vanishing "
            "gradients, which is the setting of the paper's figure (a ReLU network with He "
            "initialisation and no BN does learn this data: see the landscape section).",
        )
        + _table(
            rows,
            [
                ("variant", "network", ""),
                ("mean", "final test accuracy", ".3f"),
                ("min", "min", ".3f"),
                ("max", "max", ".3f"),
                ("seeds", "per seed", ""),
            ],
        )
        + '<p class="files">The paper trained this network on MNIST for 50,000 steps '
        "(its Figure 1a); MNIST is not shipped with any package, so this runs on "
        f"{_e(c['data']['name'])} for {c['steps']} steps. Accuracy gap with − without BN "
        f"here: {io['summary']['accuracy_gap']:.3f}. Other data: <code>batchnorm report "
        "--data digits</code> (scikit-learn's bundled digits) or a file of your own.</p>"
    )


def _landscape_body(out: Path) -> str:
    la = _load(out, "landscape")
    if not la:
        return ""
    rows = [{"variant": la["variants"][v], **s} for v, s in la["summary"].items()]
    c = la["config"]
    return _figure(
        out,
        "landscape/landscape.png",
        f"{c['data']['name']}, 3×100 {c['activation']} MLP ({c['init_std']} "
        f"initialisation), SGD lr {c['lr']}, {c['steps']} steps, {c['seeds']} seed(s). "
        f"Every {c['probe_every']} steps, on that step's batch, the loss and gradient at "
        f"θ − η·lr·g for {c['etas']} values of η in "
        f"[{c['eta_range'][0]}, {c['eta_range'][1]}]. (a) the band of losses along that "
        "step, min..max (the table's “loss range” is the mean of max − min); (b) the "
        "same band for the change of the gradient, ‖∇l(θ − η·lr·g) − ∇l(θ)‖ (the table "
        "gives the mean of its max); (c) the effective β-smoothness, the largest such "
        "change divided by the distance moved. Noisy BN: "
        f"per-unit scale in [1/{c['noise_scale_range']}, {c['noise_scale_range']}] and "
        f"shift in ±{c['noise_shift_range']} after every BN, redrawn every step. BN "
        "narrows the loss range and the gradient change along the step most; β, a "
        "worst case over the step, moves less, and late in training the two β curves "
        "come close. Test accuracy is the mean over seeds.",
    ) + _table(
        rows,
        [
            ("variant", "network", ""),
            ("mean_loss_range", "mean loss range", ".3g"),
            ("mean_grad_change_max", "mean max ‖Δ∇l‖", ".3g"),
            ("median_beta", "median β", ".3g"),
            ("max_beta", "max β", ".3g"),
            ("final_test_accuracy", "test accuracy", ".3f"),
        ],
    )


def _reparam_body(out: Path) -> str:
    rp = _load(out, "reparam")
    if not rp:
        return ""
    orth = [{"variant": k, **v} for k, v in rp["orthogonality"]["variants"].items()]
    return (
        _figure(
            out,
            "reparam/reparam.png",
            "Left: batch norm of a linear unit with population statistics against its "
            "reparameterisation, on zero-mean correlated data (S = E[xxᵀ], the input's "
            f"covariance; ε = {_reparam_eps():g} in this check, so that only rounding "
            "separates the two sides; “effect of ε” is how much the output moves when ε "
            "shrinks a thousandfold). Unless the data is whitened (S = I), BN is not "
            "weight normalisation, and the “max |BN − weight norm|” column is large by "
            "design. Right (ε = "
            f"{rp['orthogonality'].get('eps', 1e-5):g}, as in training): because the loss "
            "ignores ‖w‖, its true gradient is orthogonal to w; drop the variance's "
            "gradient and it is not. The true gradient's |cos| is ε's trace, not rounding: "
            "with ε > 0 the loss is only nearly scale invariant. (With zero-mean input the "
            "mean's path adds nothing to ∂l/∂w — it matters for the bias, see the moments "
            "section.)",
        )
        + _table(
            rp["checks"],
            [
                ("n", "n", ""),
                ("d", "d", ""),
                ("k", "units", ""),
                ("whitened", "whitened (S = I)", ""),
                ("max_abs_error", "max |BN − reparam|", ".1e"),
                ("max_abs_diff_to_weight_norm", "max |BN − weight norm|", ".1e"),
                ("eps_effect", "effect of ε", ".1e"),
            ],
        )
        + _table(
            orth,
            [("variant", "gradient", ""), ("max_abs_cosine_w_grad", "max |cos(w, ∂l/∂w)|", ".1e")],
        )
    )


def _precise_body(out: Path) -> str:
    pr = _load(out, "precise")
    if not pr:
        return ""
    s, settings = pr["summary"], pr["settings"]
    last = pr["curves"]["step"][-1]
    return (
        _figure(
            out,
            "precise/precise.png",
            f"A small 1-D CNN on {_e(pr['data'])}, SGD with learning rate {settings['lr']:g} "
            f"and momentum {settings['momentum']:g}, batch-norm momentum "
            f"{settings['bn_momentum']:g} ({settings['seeds']} seeds; band: min to max). "
            "Every few steps the same weights are evaluated twice: with the running "
            "statistics the training kept (an exponential moving average over past weights) "
            f"and with statistics recomputed on {settings['precise_samples']} training "
            "samples with the weights fixed (<code>batchnorm.torch.recompute_stats</code>). "
            f"After {last} steps: {s['final_ema_accuracy']:.3f} test accuracy with the "
            f"moving average, {s['final_precise_accuracy']:.3f} with PreciseBN; over all "
            f"evaluations after the first the mean gap is {s['mean_gap']:+.3f} "
            f"(largest {s['max_gap']:+.3f}), and PreciseBN was ahead in "
            f"{100 * s['precise_better_fraction']:.0f}% of them.",
        )
        + "<p>The same running statistics under activation checkpointing and gradient "
        "accumulation, after a few steps of one <code>BatchNorm1d(3)</code> (float64), "
        "against the exact values (a plain layer over the whole batch). PyTorch's layer "
        "counts a checkpointed batch twice (its forward runs again in the backward) and "
        "updates once per micro-batch; ours counts once and, inside "
        "<code>accumulate_stats</code>, updates once with the merged statistics.</p>"
        + _table(
            pr["lifecycle"],
            [
                ("case", "case", ""),
                ("layer", "layer", ""),
                ("num_batches_tracked", "batches counted", ""),
                ("exact_num_batches_tracked", "exact", ""),
                ("running_mean_error", "max |running mean − exact|", ".1e"),
                ("running_var_error", "max |running var − exact|", ".1e"),
            ],
        )
    )


def _small_batch_body(out: Path) -> str:
    sb = _load(out, "small-batch")
    if not sb:
        return ""
    s, sizes = sb["summary"], sb["sizes"]
    acc = s["accuracy"]
    rows = [
        {"norm": name, **{str(b): acc[key][str(b)] for b in sizes}}
        for key, name in (
            ("bn", "batch norm"),
            ("renorm", "Batch Renorm"),
            ("ghost", f"Ghost (batches of {sb['settings']['ghost_batch']})"),
            ("group", "GroupNorm"),
        )
    ]
    small, large = sizes[0], sizes[-1]
    verdict = (
        f"batch norm loses {s['bn_drop']:.3f} test accuracy from {large} down to {small} "
        "samples per batch here"
        if s["bn_drop"] > 0
        else f"batch norm does not degrade from {large} down to {small} samples per batch here "
        f"(it gains {-s['bn_drop']:.3f}): with the same number of samples, small batches take "
        "many more SGD steps on this small problem, which outweighs their noisier statistics"
    )
    return (
        _figure(
            out,
            "small-batch/small_batch.png",
            f"Left: a small 1-D CNN on {_e(sb['data'])} trained on "
            f"{sb['settings']['samples']} samples at each batch size (learning rate scaled "
            f"with the batch), {sb['settings']['seeds']} seeds, band min to max. Right: the "
            "largest change of batch norm's output at the real positions of a batch of "
            "sequences as zero padding is appended; the masked form "
            "(<code>BatchNorm1d(...)(x, mask=mask)</code>) does not move "
            f"(max {s['max_masked_padding_drift']:.1g} against "
            f"{s['max_plain_padding_drift']:.3g}).",
        )
        + "<p>The papers: batch norm degrades at small batches (Wu &amp; He 2018: ImageNet "
        "error rises quickly below 8 images per GPU); Batch Renorm recovers much of it "
        "(Ioffe 2017, micro-batches of 4); small ghost batches inside a large batch help "
        f"generalisation (Hoffer et al. 2017). This run: {verdict}. At {small} per batch, "
        f"Batch Renorm is {s['renorm_minus_bn_at_smallest']:+.3f} and GroupNorm "
        f"{s['group_minus_bn_at_smallest']:+.3f} against batch norm, and Ghost batch norm "
        f"(fewer, larger steps) {s['ghost_minus_bn_at_smallest']:+.3f}.</p>"
        + _table(
            rows,
            [("norm", "test accuracy at batch size", "")]
            + [(str(b), str(b), ".3f") for b in sizes],
        )
    )


def _reparam_eps() -> float:
    import inspect

    from . import reparam

    return inspect.signature(reparam.identity_check).parameters["eps"].default


def _verify_body(out: Path) -> str:
    ve = _load(out, "verify", "verify.json")
    if not ve:
        return ""
    rows, mutants = [], []
    for row in ve["rows"]:
        # "X differs from true dx (1/gap)": a mutant that must be far from the truth; its
        # "error" is 1/gap, which reads backwards in an error table, so it gets its own.
        if "(1/gap)" in row["name"]:
            # A gap of 0 (the failure that matters) has 1/gap = inf, stored as null.
            error = row.get("error")
            gap = 0.0 if error is None or error == math.inf else 1.0 / error
            least = 1.0 / row["tolerance"]
            name = row["name"].replace(" (1/gap)", "")
            mutants.append({**row, "name": name, "gap": gap, "least": least})
        else:
            rows.append(row)
    table = _table(
        rows,
        [
            ("name", "check", ""),
            ("error", "max error", ".2e"),
            ("tolerance", "tolerance", ".0e"),
            ("passed", "result", "pass"),
            ("note", "note", ""),
        ],
    )
    if not mutants:
        return table
    return (
        table + "<p>Mutants that must be rejected: a wrong gradient has to differ from the true "
        "one by a clear margin (relative gap ‖wrong − true‖/‖true‖).</p>"
        + _table(
            mutants,
            [
                ("name", "mutant", ""),
                ("gap", "relative gap", ".3g"),
                ("least", "required at least", ".2g"),
                ("passed", "result", "pass"),
            ],
        )
    )


def _bench_body(out: Path) -> str:
    be = _load(out, "bench", "bench.json")
    if not be:
        return ""
    rows = _bench_rows(be)
    order = {"forward": 0, "backward": 1, "fwd+bwd": 2, "inference": 3}
    rows.sort(key=lambda r: (str(r["shape"]), order.get(str(r["op"]), 9), str(r["peer"])))
    figure = (
        _figure(
            out,
            "bench/bench.png",
            "Speed-up over PyTorch eager (top) and time as a "
            "multiple of one copy of the tensor (bottom), per shape and operation.",
        )
        if (out / "bench" / "bench.png").exists()
        else ""
    )
    return (
        figure
        + _table(
            rows,
            [
                ("shape", "shape", ""),
                ("layout", "layout", ""),
                ("op", "op", ""),
                ("peer", "peer", ""),
                ("median_ms", "median ms", ".3g"),
                ("speedup", "speed-up vs eager", ".2f"),
                ("x_copy", "× copy time", ".2f"),
            ],
        )
        + _bench_note(be)
    )


def _bench_note(be: dict[str, Any]) -> str:
    """What the report's quick run (always ``bench.QUICK_SHAPES``) can and cannot say, with
    its own targets and first-call time."""
    targets = be.get("summary", {}).get("targets", {})
    judged = [v for v in targets.values() if isinstance(v, dict) and v.get("met") is not None]
    met = [v for v in judged if v["met"]]
    total = len(judged)
    first = (be.get("first_call") or {}).get("numba") or {}
    parts = [
        "numba is this library's CPU kernels and numpy its reference (the oracle, not a "
        "competitor); torch is PyTorch eager, the baseline."
    ]
    parts.append(
        "These are the quick shapes: tensors of a few thousand values, where a call's fixed "
        "cost (Python, thread start-up) outweighs the work, so even the ratios measure "
        "overhead rather than the kernels, and numba can be slower than PyTorch. "
        "<code>batchnorm bench</code> runs the real shapes; the repository's README and "
        "docs/bench.md quote its reference runs."
    )
    if total:
        parts.append(f"Issue targets met in this run: {len(met)} of {total}.")
    if first.get("warm_in_process"):
        parts.append("numba's kernels were already compiled in this process.")
    elif first.get("first_calls_s") is not None:
        cached = first.get("jit_cache_hits", 0)
        parts.append(
            f"numba's first calls took {first['first_calls_s']:.1f} s "
            f"({cached} kernel signature(s) from the on-disk JIT cache, "
            f"{first.get('jit_cache_misses', 0)} compiled)."
        )
    return f'<p class="files">{" ".join(parts)}</p>'


def render_html(out: str | Path, status: dict[str, Any]) -> str:
    out = Path(out)
    options = status["options"]
    command = (
        "batchnorm report --out DIR"
        + (" --quick" if options["quick"] else "")
        + (f" --seed {options['seed']}" if options["seed"] else "")
    )
    sections = [
        _section(
            "explain",
            "Why the mean and variance carry gradient",
            "The mean and variance are computed from the batch, so it is tempting to treat "
            "them as constants (a question asked again and again: “why take the gradient "
            "of the batch mean?”). But they are functions of the very inputs the "
            "gradient is about to move. Here is the paper's chain rule on a batch of three, "
            "checked against the compact form and finite differences, next to what the "
            "constants version would say.",
            _explain_body(out),
            status,
            out,
        ),
        _section(
            "moments",
            "What goes wrong without them",
            "Ioffe &amp; Szegedy's section 2 argues that a gradient step which ignores the "
            "normalisation's dependence on the parameters can make a parameter grow "
            "forever while the loss stays fixed. Here is that, exactly, and then the same "
            "network trained four ways.",
            _moments_body(out),
            status,
            out,
        ),
        _section(
            "ioffe",
            "Reproducing Ioffe & Szegedy 2015, Figure 1",
            "Section 4.1 of the paper: a 3×100 sigmoid network, trained with and without "
            "batch norm (ours, with Algorithm 2's population statistics at test time).",
            _ioffe_body(out),
            status,
            out,
        ),
        _section(
            "landscape",
            "The landscape along the gradient (Santurkar et al. 2018)",
            "How far can a gradient step be trusted? Along the gradient direction, the "
            "range of the loss, how much the gradient changes, and the effective "
            "β-smoothness — without BN, with BN, and with noise injected after BN.",
            _landscape_body(out),
            status,
            out,
        ),
        _section(
            "reparam",
            "Batch norm as a reparameterisation (Kohler et al. 2019)",
            "With population statistics and zero-mean input, BN(xᵀw) = γ·xᵀw/‖w‖_S + β with "
            "‖w‖_S² = wᵀSw: direction and length are decoupled. Checked in float64.",
            _reparam_body(out),
            status,
            out,
        ),
        _section(
            "precise",
            "When the moving average lags: PreciseBN (Wu & Johnson 2021)",
            "At inference batch norm uses running statistics, an exponential moving average "
            "of batch statistics over training: statistics of weights that no longer exist. "
            "With a large learning rate or a small batch-norm momentum the eval-mode model "
            "suffers; recomputing the statistics with the final weights fixes it.",
            _precise_body(out),
            status,
            out,
        ),
        _section(
            "small-batch",
            "Small and padded batches",
            "Batch norm's statistics are only as good as the batch they come from. Batch "
            "Renorm corrects towards the running statistics, Ghost batch norm normalises "
            "small virtual batches inside a large one, GroupNorm ignores the batch; and "
            "padded sequences need a mask.",
            _small_batch_body(out),
            status,
            out,
        ),
        _section(
            "verify",
            "The reference against its oracles",
            "<code>batchnorm verify</code>: finite differences, the staged derivation, the "
            "closed-form Jacobian and PyTorch's own batch norm, on seeded random data.",
            _verify_body(out),
            status,
            out,
        ),
        _section(
            "bench",
            "A quick benchmark",
            "<code>batchnorm bench</code> with quick settings.",
            _bench_body(out),
            status,
            out,
        ),
    ]
    nav = "".join(
        f'<a href="#{s}">{s}</a>'
        for s in (
            "explain",
            "moments",
            "ioffe",
            "landscape",
            "reparam",
            "precise",
            "verify",
            "bench",
        )
    )
    failed = [k for k, v in status["stages"].items() if v["state"] == "failed"]
    banner = f'<div class="error">Failed stages: {_e(", ".join(failed))}</div>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>batchnorm report</title><style>{CSS}</style></head>
<body><main>
<header><h1>batchnorm: the report</h1>
<p class="sub">Why batch norm backpropagates through its own statistics, and whether this
library reproduces the papers. Generated by <code>{_e(command)}</code> on {_e(status["started"])}
in {status["seconds"]:.0f} s ({_e(status["cpus"])} CPUs, Python {_e(status["python"])});
data: {_e(options["data"])}; seed {_e(options["seed"])}.</p></header>
{banner}
<div class="cards">{_cards(out)}</div>
<nav>{nav}</nav>
{"".join(sections)}
<footer>Every figure is drawn from the JSON/CSV records linked under it; redraw one with
<code>batchnorm experiment NAME --replot --out DIR/NAME</code>. Run status:
<a href="report.json">report.json</a>.</footer>
</main></body></html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm report",
        description="Run verify, a quick bench, explain and every experiment; write "
        "DIR/index.html.",
    )
    parser.add_argument("--out", type=out_dir, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="short settings (about 1 min)")
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
        "--skip", action="append", default=[], choices=STAGES, help="leave a stage out (repeatable)"
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
        )
    failed = [k for k, v in status["stages"].items() if v["state"] == "failed"]
    print(
        f"wrote {Path(args.out) / 'index.html'} in {status['seconds']:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0
