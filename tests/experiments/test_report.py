"""``batchnorm report --quick`` and ``batchnorm experiment``: the files the page promises exist."""

from __future__ import annotations

import dataclasses
import functools
import html
import importlib.util
import json
import re
import time
import types
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytest.importorskip("torch")

from batchnorm import cli  # noqa: E402
from batchnorm.experiments import report  # noqa: E402
from batchnorm.experiments.report import sections  # noqa: E402


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


@pytest.mark.slow
def test_report_quick_writes_a_page_whose_every_file_exists(tmp_path):
    out = tmp_path / "report"
    assert cli.main(["report", "--out", str(out), "--quick", "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    # explain: graph (if dot) + jacobian; moments 3; ioffe, landscape, reparam, precise,
    # small-batch 1 each
    assert len(parser.images) >= 9
    for reference in parser.images + parser.links:
        parsed = urlparse(reference)
        if parsed.scheme or reference.startswith("#"):
            if reference.startswith("#"):
                assert reference[1:] in parser.ids, reference
            continue
        assert not Path(parsed.path).is_absolute(), f"{reference} must be relative"
        target = out / unquote(parsed.path)
        assert target.is_file() and target.stat().st_size > 0, f"{reference} is missing"
    status = json.loads((out / "report.json").read_text())
    for stage in ("explain", "ioffe", "moments", "landscape", "reparam", "precise", "small-batch"):
        assert status["stages"][stage]["state"] == "ok", (stage, status["stages"][stage])
    assert status["stages"]["verify"]["state"] in ("ok", "skipped")
    sections = ("explain", "moments", "ioffe", "landscape", "reparam", "precise", "small-batch")
    sections = (*sections, "verify")
    for section in (*sections, "bench"):
        assert f'id="{section}"' in page
    # The prose quotes this run's records, not fixed numbers or internal file names.
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    assert "seeds/0" not in text and "-0.0e+00" not in text and "Reference point" not in text
    moments = json.loads((out / "moments" / "records.json").read_text())
    drift = moments["summary"]["no mean grad"]["final_bias_norm"]
    assert f"{drift:.3g} without the mean's gradient" in text
    if status["stages"]["verify"]["state"] == "ok":
        rows = json.loads((out / "verify" / "verify.json").read_text())["rows"]
        gaps = [1 / r["error"] if r["error"] else 0.0 for r in rows if "(1/gap)" in r["name"]]
        assert gaps and all(f"{gap:.3g}" in text for gap in gaps)
    # The bench section measures the representative shape too, says so, and quotes its record.
    representative = json.loads((out / "bench" / "bench-representative.json").read_text())
    assert [e["shape"] for e in representative["results"]] == [[32, 64, 56, 56]]
    targets = representative["summary"]["targets"]
    met = sum(1 for t in targets.values() if isinstance(t, dict) and t["met"])
    assert f"judged on the representative shape in this run: {met} of 4 met." in text
    step = next(
        t["speedup"]
        for t in representative["results"][0]["timings"]
        if t["peer"] == targets["peer"] and t["op"] == "fwd+bwd"
    )
    assert "32x64x56x56 (nchw), numba's speed-up over torch (PyTorch eager) in this run: " in text
    assert f"{step:.2f}× for a training step" in text
    assert "Representative shapes: 32x64x56x56 nchw." in text
    assert "<td>quick</td>" in page and "<td>representative</td>" in page
    # Frameworks, measured for real where the extra is installed (scripts/setup.sh does):
    # Flax's default one-pass variance must be caught on the large-offset case.
    if importlib.util.find_spec("flax") is not None:
        assert status["stages"]["frameworks"]["state"] == "ok", status["stages"]["frameworks"]
        fw = json.loads((out / "frameworks" / "records.json").read_text())
        flax = next(r for r in fw["records"] if r["entry"] == "flax-linen")
        assert [d["cases"] for d in flax["deviations"] if d["mistake"] == "one_pass"] == [
            ["large-offset"]
        ]
        assert 'id="frameworks"' in page


def _with(**runners):
    """The report's table with some stages' runners replaced."""
    return tuple(
        dataclasses.replace(stage, run=runners[stage.name]) if stage.name in runners else stage
        for stage in report.STAGES
    )


def test_report_survives_a_failing_stage_and_says_so(tmp_path):
    def broken(out, options):
        raise RuntimeError("deliberately broken")

    skip = ["verify", "bench", "ioffe", "moments", "landscape", "precise", "small-batch"]
    skip.append("frameworks")
    argv = ["--out", str(tmp_path), "--no-progress"] + [f"--skip={s}" for s in skip]
    assert report.main(argv, stages=_with(reparam=broken)) == 1
    page = (tmp_path / "index.html").read_text()
    assert "reparam failed: RuntimeError: deliberately broken" in page
    assert "Failed stages: reparam" in page
    assert (tmp_path / "explain" / "explain.json").exists()  # the other stage still ran
    status = json.loads((tmp_path / "report.json").read_text())
    assert status["stages"]["reparam"]["state"] == "failed"
    assert "deliberately broken" in status["stages"]["reparam"]["traceback"]
    for s in skip:
        assert status["stages"][s]["state"] == "skipped"


def test_stages_past_the_time_budget_are_skipped_and_said_so(tmp_path):
    ran = []

    def slow(out, options):
        ran.append(out.name)
        time.sleep(0.3)

    def quick(out, options):
        ran.append(out.name)

    stages = _with(explain=slow, **{s.name: quick for s in report.STAGES if s.name != "explain"})
    status = report.build_report(tmp_path, progress=False, budget_s=0.2, stages=stages)
    assert ran == ["explain"]  # started within the budget, never cut short
    assert status["stages"]["explain"]["state"] == "ok"
    assert status["stages"]["explain"]["seconds"] >= 0.3
    for stage in report.names()[1:]:
        assert status["stages"][stage]["state"] == "skipped"
        assert "time budget of 0.2 s was spent" in status["stages"][stage]["note"]
    page = (tmp_path / "index.html").read_text()
    assert "bench was skipped: the time budget of 0.2 s was spent" in " ".join(page.split())
    with pytest.raises(ValueError, match="budget_s must be above 0"):
        report.build_report(tmp_path, progress=False, budget_s=0, stages=stages)


def test_one_table_names_the_stages_the_page_and_the_options(tmp_path):
    def nothing(out, options):
        pass

    stages = _with(**{s.name: nothing for s in report.STAGES})
    report.build_report(tmp_path, progress=False, stages=stages)
    page = (tmp_path / "index.html").read_text()
    nav = re.search(r"<nav>(.*?)</nav>", page, re.S).group(1)
    assert re.findall(r'href="#([^"]+)"', nav) == report.names()
    assert re.findall(r'<section id="([^"]+)"', page) == report.names()
    for stage in report.STAGES:
        assert f"<h2>{html.escape(stage.title)}</h2>" in page
    with pytest.raises(ValueError, match="unknown stage"):
        report.build_report(tmp_path, progress=False, skip=["nosuch"], stages=stages)
    with pytest.raises(SystemExit):
        report.main(["--out", str(tmp_path), "--skip", "nosuch"])


def test_every_stage_has_a_template_that_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(report.__file__).parent
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["batchnorm.experiments.report"]
    templates = [p.relative_to(root).as_posix() for p in (root / "templates").rglob("*.j2")]
    for stage in report.STAGES:
        assert f"templates/sections/{stage.template}" in templates, stage
    shipped = {p.relative_to(root).as_posix() for g in globs for p in root.glob(g)}
    unshipped = sorted(set(templates) - shipped)
    assert not unshipped, f"templates outside [tool.setuptools.package-data]: {unshipped}"
    extra = pyproject["project"]["optional-dependencies"]["experiments"]
    assert any(dependency.lower().startswith("jinja2") for dependency in extra)


def test_experiment_cli(tmp_path, capsys):
    assert cli.main(["experiment", "list"]) == 0
    assert "moments" in capsys.readouterr().out
    assert cli.main(["experiment", "reparam", "--lr", "0.1", "--out", str(tmp_path)]) == 2
    assert "does not take --lr" in capsys.readouterr().err
    assert cli.main(["experiment", "reparam", "--replot", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["experiment", "reparam", "--quick", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    (tmp_path / "reparam.png").unlink()
    assert cli.main(["experiment", "reparam", "--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "reparam.png").exists()
    with pytest.raises(SystemExit):
        cli.main(["experiment", "nosuch"])


def test_report_calls_bench_and_skips_a_missing_verify(tmp_path):
    calls = []

    def run(shapes, *, repeats=15, warmup=3, progress=True):
        calls.append({"shapes": shapes, "repeats": repeats, "warmup": warmup})
        speedup = 1.7 if len(calls) == 1 else 3.25
        timing = {"op": "fwd+bwd", "median_s": 2e-3, "speedup": speedup, "x_copy": 4.0}
        shape, layout = shapes[0]
        return {
            "results": [
                {"shape": list(shape), "layout": layout, "timings": [{"peer": "numba", **timing}]}
            ],
            "settings": {"baseline": "torch", "peers": ["numba"]},
            "summary": {"targets": {"peer": "numba", "t": {"met": len(calls) == 2}}},
            "first_call": {},
        }

    def plot(record, path):
        plotted.append([e["shape"] for e in record["results"]])
        path.write_bytes(b"\x89PNG fake")
        return path

    plotted = []
    fake = types.SimpleNamespace(
        QUICK_SHAPES=[((4, 3), "nc")],
        REPRESENTATIVE_SHAPES=[((32, 64, 56, 56), "nchw")],
        run=run,
        plot=plot,
        format_table=lambda record: "a table",
    )

    def no_verify(out, options):
        raise report.Skipped("batchnorm.verify is not available (a test)")

    stages = _with(bench=functools.partial(report.run_bench, bench=fake), verify=no_verify)
    skip = ["explain", "ioffe", "moments", "landscape", "reparam", "precise", "small-batch"]
    skip.append("frameworks")
    status = report.build_report(tmp_path, quick=True, progress=False, skip=skip, stages=stages)
    assert status["stages"]["bench"]["state"] == "ok"
    quick = {"repeats": 5, "warmup": 1}
    assert calls == [
        {"shapes": fake.QUICK_SHAPES, **quick},
        {"shapes": fake.REPRESENTATIVE_SHAPES, **quick},
    ]
    assert plotted == [[[4, 3], [32, 64, 56, 56]]]  # one figure with both sets
    assert status["stages"]["verify"]["state"] == "skipped"
    page = (tmp_path / "index.html").read_text()
    assert "verify was skipped: batchnorm.verify is not available (a test)" in page
    assert "<td>numba</td>" in page and "<td>1.70</td>" in page and "<td>3.25</td>" in page
    assert "<td>quick</td><td>4x3</td>" in page
    assert "<td>representative</td><td>32x64x56x56</td>" in page
    assert page.index("<td>representative</td>") < page.index("<td>quick</td>")
    assert "<strong>3.25×</strong>" in page  # the representative shape's, not the quick one's
    assert "in this run: 1 of 1 met." in " ".join(page.split())
    assert 'src="bench/bench.png"' in page
    for name in ("bench.csv", "bench.json", "bench-representative.json", "bench.txt"):
        assert (tmp_path / "bench" / name).exists(), name
    assert (tmp_path / "bench" / "bench.txt").read_text().count("a table") == 2
    sets = [row.split(",")[0] for row in (tmp_path / "bench" / "bench.csv").read_text().split()]
    assert sets == ["set", "quick", "representative"]


def test_importing_the_experiments_imports_no_heavy_package():
    import subprocess
    import sys

    modules = ", ".join(
        f"batchnorm.experiments.{m}"
        for m in (
            "data",
            "explain",
            "report",
            "cli",
            "reparam",
            "precise",
            "small_batch",
            "moments",
            "ioffe",
            "landscape",
            "plots",
        )
    )
    code = (
        f"import sys, {modules}; "
        "print([m for m in ('torch', 'matplotlib', 'tqdm', 'mnist1d', 'sklearn') "
        "if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["experiment", "moments", "--quick", "--seeds", "0"], "--seeds: must be at least 1"),
        (["experiment", "ioffe", "--steps", "-5"], "--steps: must be at least 1"),
        (["experiment", "moments", "--threads", "-2"], "--threads: must be 0 or more"),
        (["experiment", "moments", "--seed", "-1"], "--seed: must be 0 or more"),
        (["experiment", "moments", "--lr", "nan"], "--lr: must be a finite number above 0"),
        (["explain", "--seed", "-1"], "--seed: must be 0 or more"),
        (["verify", "--seed", "-1"], "--seed: must be 0 or more"),
        (["bench", "--quick", "--repeats", "0"], "--repeats: must be at least 1"),
        (["report", "--quick", "--out", "{file}"], "exists and is not a directory"),
        (["explain", "--out", "{file}"], "exists and is not a directory"),
        (["explain", "--out", "{file}/x"], "afile is not a directory"),
        (["report", "--quick", "--out", "{file}/x/y"], "afile is not a directory"),
        (["experiment", "reparam", "--quick", "--out", "{file}/x"], "afile is not a directory"),
        (["bench", "--quick", "--out", "{file}/x"], "afile is not a directory"),
        (["report", "--quick", "--out", "{dir}", "--data", "bogus"], "--data: unknown data set"),
        (["report", "--out", "{dir}", "--budget", "0"], "--budget: must be a number of seconds"),
        (["report", "--out", "{dir}", "--budget", "nan"], "--budget: must be a number of seconds"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("")
    argv = [a.format(file=tmp_path / "afile", dir=tmp_path / "r") for a in argv]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_replot_refuses_records_of_another_experiment_or_unreadable_ones(tmp_path, capsys):
    (tmp_path / "records.json").write_text(json.dumps({"experiment": "moments"}))
    assert cli.main(["experiment", "ioffe", "--replot", "--out", str(tmp_path)]) == 2
    assert "are from 'moments', not 'ioffe'" in capsys.readouterr().err
    (tmp_path / "records.json").write_text("{not json")
    assert cli.main(["experiment", "ioffe", "--replot", "--out", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_verify_mutants_and_bench_note_read_their_records(tmp_path):
    # A mutant whose gap is 0 (1/gap = inf, stored as null) is the failure that matters: it
    # must be shown as a gap of 0 that failed, in the mutants' table.
    (tmp_path / "verify").mkdir()
    rows = [
        {"name": "forward", "error": 1e-16, "tolerance": 1e-12, "passed": True, "note": ""},
        {"name": "mean as constant differs from true dx (1/gap)", "error": None,
         "tolerance": 100.0, "passed": False, "note": "relative gap 0"},
        {"name": "var as constant differs from true dx (1/gap)", "error": 0.25,
         "tolerance": 100.0, "passed": True, "note": "relative gap 4"},
    ]  # fmt: skip
    (tmp_path / "verify" / "verify.json").write_text(json.dumps({"rows": rows}))
    status = {"stages": {"verify": {"state": "ok", "seconds": 0.5}}}
    verify = next(stage for stage in report.STAGES if stage.name == "verify")
    page = str(report.render_section(verify, tmp_path, status))
    errors, mutants = page.split("Mutants that must be rejected")
    assert "(1/gap)" not in page and "forward" in errors
    assert "mean as constant differs from true dx" in mutants and ">0<" in mutants
    assert ">4<" in mutants and "FAIL" in mutants
    record = {
        "results": [],
        "summary": {"targets": {"a": {"met": True}, "b": {"met": False}, "c": {"met": None}}},
        "first_call": {"numba": {"warm_in_process": True, "first_calls_s": 0.01}},
    }
    context = sections.bench_context(record, {**record, "summary": {"targets": {
        "peer": "numba", **record["summary"]["targets"]}}})  # fmt: skip
    note = str(report.render_section(bench_stage(context), tmp_path, {"stages": {}}))
    note = " ".join(note.split())
    assert "in this run: 1 of 2 met." in note and "already compiled" in note


def bench_stage(context):
    bench = next(stage for stage in report.STAGES if stage.name == "bench")
    return dataclasses.replace(bench, context=lambda out: context)


def test_threads_bound_numba_as_well_as_torch_and_are_restored():
    # backend="auto" runs large evaluation batches on numba: its threads count too.
    import torch

    from batchnorm.experiments.common import torch_threads

    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one numba thread at most: nothing to bound")
    before = (torch.get_num_threads(), numba.get_num_threads())
    with torch_threads(1):
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    assert (torch.get_num_threads(), numba.get_num_threads()) == before
    with torch_threads(0):  # 0: leave both as they are
        assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_settings_and_threads_refuse_bad_counts_from_python_too():
    from batchnorm.experiments.common import resolve_settings, torch_threads

    for bad in (
        {"steps": 0, "seeds": None},
        {"steps": None, "seeds": -1},
        {"steps": 2.5, "seeds": 1},
    ):
        with pytest.raises(ValueError, match="must be an integer of at least 1"):
            resolve_settings({"steps": 10, "seeds": 2, "eval_every": 5}, {}, quick=False, **bad)
    with pytest.raises(ValueError, match="threads must be 0"):
        with torch_threads(-1):
            pass


def test_the_frameworks_section_renders_the_measured_table(tmp_path):
    # The records docs/frameworks.md was generated from, handed in through a fake module: the
    # section must show every implementation, each deviation with its mistake, and the count.
    from batchnorm.testing import frameworks

    stored = json.loads((Path(__file__).parents[2] / "docs" / "frameworks.json").read_text())
    calls = []

    def measure_all(names, cases):
        calls.append((tuple(names), cases))
        return [r for r in stored if r["entry"] in names]

    fake = types.SimpleNamespace(
        ENTRIES=frameworks.ENTRIES,
        measure_all=measure_all,
        table_rows=frameworks.table_rows,
        markdown=frameworks.markdown,
    )
    stages = _with(frameworks=functools.partial(report.run_frameworks, frameworks=fake))
    skip = [s.name for s in report.STAGES if s.name != "frameworks"]
    status = report.build_report(tmp_path, quick=True, progress=False, skip=skip, stages=stages)
    assert status["stages"]["frameworks"]["state"] == "ok", status["stages"]["frameworks"]
    # --quick: one process per entry, one entry per framework, the others named as left out
    assert [names[0] for names, _ in calls] == list(report.FRAMEWORK_ENTRIES_QUICK)
    assert all(len(names) == 1 and cases == report.FRAMEWORK_CASES_QUICK for names, cases in calls)
    page = (tmp_path / "index.html").read_text()
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())
    quick = report.FRAMEWORK_ENTRIES_QUICK
    measured = [r for r in stored if r["status"] == "measured" and r["entry"] in quick]
    deviating = [r for r in measured if r["passed"] < r["checks"]]
    assert deviating and len(deviating) < len(measured)
    assert f"Of {len(measured)} implementations measured" in text
    assert f"{len(measured) - len(deviating)} agree with the reference on every check" in text
    assert "Left out by --quick: pytorch-compile, flax-linen-two-pass," in text
    assert "Flax `linen.BatchNorm`, defaults" in text
    assert "`one_pass` (large-offset, offset-rank4, large-offset-f64)" in text
    assert "google/flax#1491" in text and "keras-team/keras#23223" in text
    assert (tmp_path / "frameworks" / "frameworks.md").read_text().startswith("| implementation")


def test_the_frameworks_section_is_skipped_without_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("jax", "flax", "keras") else real(name, *a),
    )
    skip = [s.name for s in report.STAGES if s.name != "frameworks"]
    status = report.build_report(tmp_path, quick=True, progress=False, skip=skip)
    assert status["stages"]["frameworks"]["state"] == "skipped"
    page = (tmp_path / "index.html").read_text()
    assert "the frameworks extra is not installed" in page
