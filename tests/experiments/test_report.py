"""``batchnorm report --quick`` and ``batchnorm experiment``: the files the page promises exist."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytest.importorskip("torch")

from batchnorm import cli  # noqa: E402
from batchnorm.experiments import report  # noqa: E402


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
    targets = json.loads((out / "bench" / "bench.json").read_text())["summary"]["targets"]
    met = sum(1 for t in targets.values() if isinstance(t, dict) and t["met"])
    assert f"Issue targets met in this run: {met} of 4." in text


def test_report_survives_a_failing_stage_and_says_so(tmp_path, monkeypatch):
    def broken(out, options):
        raise RuntimeError("deliberately broken")

    monkeypatch.setitem(report.RUNNERS, "reparam", broken)
    skip = ["verify", "bench", "ioffe", "moments", "landscape", "precise", "small-batch"]
    argv = ["--out", str(tmp_path), "--no-progress"] + [f"--skip={s}" for s in skip]
    assert report.main(argv) == 1
    page = (tmp_path / "index.html").read_text()
    assert "reparam failed: RuntimeError: deliberately broken" in page
    assert (tmp_path / "explain" / "explain.json").exists()  # the other stage still ran
    for s in skip:
        assert json.loads((tmp_path / "report.json").read_text())["stages"][s]["state"] == "skipped"


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


def test_report_calls_bench_and_skips_a_missing_verify(tmp_path, monkeypatch):
    import sys
    import types

    calls = {}
    fake = types.ModuleType("batchnorm.bench")
    fake.QUICK_SHAPES = [((4, 3), "nc")]

    def run(shapes, *, repeats=15, warmup=3, progress=True):
        calls.update(shapes=shapes, repeats=repeats)
        timing = {"op": "fwd+bwd", "median_s": 2e-3, "speedup": 1.7, "x_copy": 4.0}
        return {
            "results": [{"shape": [4, 3], "layout": "nc", "timings": [{"peer": "numba", **timing}]}]
        }

    def plot(record, path):
        path.write_bytes(b"\x89PNG fake")
        return path

    fake.run, fake.plot = run, plot
    fake.format_table = lambda record: "a table"
    monkeypatch.setitem(sys.modules, "batchnorm.bench", fake)
    monkeypatch.setitem(sys.modules, "batchnorm.verify", None)  # import raises ImportError
    skip = ["explain", "ioffe", "moments", "landscape", "reparam", "precise", "small-batch"]
    status = report.build_report(tmp_path, quick=True, progress=False, skip=skip)
    assert status["stages"]["bench"]["state"] == "ok"
    assert calls == {"shapes": fake.QUICK_SHAPES, "repeats": 5}
    assert status["stages"]["verify"]["state"] == "skipped"
    page = (tmp_path / "index.html").read_text()
    assert "verify was skipped" in page and "<td>numba</td>" in page and "<td>1.70</td>" in page
    assert 'src="bench/bench.png"' in page and (tmp_path / "bench" / "bench.csv").exists()


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
    page = report._verify_body(tmp_path)
    errors, mutants = page.split("Mutants that must be rejected")
    assert "(1/gap)" not in page and "forward" in errors
    assert "mean as constant differs from true dx" in mutants and ">0<" in mutants
    assert ">4<" in mutants and "FAIL" in mutants
    record = {
        "summary": {"targets": {"a": {"met": True}, "b": {"met": False}, "c": {"met": None}}},
        "first_call": {"numba": {"warm_in_process": True, "first_calls_s": 0.01}},
    }
    note = report._bench_note(record)
    assert "met in this run: 1 of 2." in note and "already compiled" in note


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
