"""``batchnorm bench --quick``: runs end to end and writes the documented JSON (no timing is
asserted: speed is measured by the benchmark, never by the tests)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from batchnorm import bench  # noqa: E402
from batchnorm.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.xdist_group("numba")

TIMING_KEYS = {"peer", "op", "median_s", "min_s", "q1_s", "q3_s", "n", "speedup", "x_copy",
               "x_clone", "x_limit"}  # fmt: skip


def test_quick_bench_writes_the_documented_json(tmp_path, capsys):
    assert cli_main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    record = json.loads((tmp_path / "bench-cpu-float32-quick.json").read_text())
    assert (tmp_path / "bench-cpu-float32-quick.png").stat().st_size > 0
    assert record["schema"] == bench.SCHEMA
    assert record["command"].startswith("batchnorm bench --quick")
    for key in ("cpu_count", "torch", "numpy", "numba", "torch_threads", "numba_threads"):
        assert key in record["machine"], key
    settings = record["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["repeats"] == 3 and "torch.compile" not in settings["peers"]
    assert {"numba", "torch", "numpy"} <= set(settings["peers"])
    first = record["first_call"]["numba"]
    assert first["first_calls_s"] > 0 and "jit_cache_hits" in first

    assert [(tuple(e["shape"]), e["layout"]) for e in record["results"]] == bench.QUICK_SHAPES
    for entry in record["results"]:
        assert entry["bytes"] == 4 * _prod(entry["shape"])
        for name in ("copy", "clone", "numpy copyto"):
            assert entry["copy"][name]["median_s"] > 0
        assert entry["copy"]["bandwidth_GBps"] > 0
        seen = {(t["peer"], t["op"]) for t in entry["timings"]}
        assert seen == {(p, op) for p in ("numba", "torch", "numpy") for op in bench.OPS}
        copy_s = entry["copy"]["copy"]["median_s"]
        for t in entry["timings"]:
            assert set(t) == TIMING_KEYS
            assert t["min_s"] <= t["median_s"] and t["n"] == 3
            assert t["x_copy"] == pytest.approx(t["median_s"] / copy_s)
            assert t["x_clone"] == pytest.approx(t["median_s"] / entry["copy"]["clone"]["median_s"])
            assert t["x_limit"] == pytest.approx(
                t["x_copy"] * bench.MODEL_BYTES["copy"] / bench.MODEL_BYTES[t["op"]]
            )
            torch_t = next(u for u in entry["timings"] if u["peer"] == "torch" and
                           u["op"] == t["op"])  # fmt: skip
            assert t["speedup"] == pytest.approx(torch_t["median_s"] / t["median_s"])

    summary = record["summary"]
    assert set(summary["numba"]) == set(bench.OPS)
    assert summary["targets"]["peer"] == "numba"
    for name, target in bench.TARGETS.items():
        assert summary["targets"][name]["target"] == target
        assert summary["targets"][name]["met"] in (True, False)
    out = capsys.readouterr().out
    assert "speed-up" in out and "targets (numba" in out
    assert "indicative only" in out  # quick shapes: the targets are not for them


def test_peer_selection_and_bad_arguments(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    assert bench.main(args + ["--peers", "numba", "--shapes", "64x8", "--repeats", "2"]) == 0
    record = json.loads((tmp_path / "bench-cpu-float32-quick.json").read_text())
    assert record["settings"]["peers"] == ["numba", "torch"]  # the baseline is always timed
    assert record["results"][0]["shape"] == [64, 8]
    assert bench.main(args + ["--peers", "nope"]) == 2
    import torch

    if not torch.cuda.is_available():
        assert bench.main(args + ["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(args + ["--shapes", "12xA"])


def test_parse_shapes():
    assert bench._parse_shapes("2x3x4x5,2x3x4x5:nhwc,7x3") == [
        ((2, 3, 4, 5), "nchw"),
        ((2, 3, 4, 5), "nhwc"),
        ((7, 3), "nc"),
    ]
    with pytest.raises(Exception, match="layout"):
        bench._parse_shapes("7x3:nhwc")


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def test_device_cuda_is_routed_to_the_gpu_bench(monkeypatch):
    import torch

    bench_gpu = pytest.importorskip("batchnorm.bench_gpu")
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_gpu, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["--device", "cuda", "--quick", "--no-progress", "--no-plot"]) == 0
    assert seen == [["--device", "cuda", "--quick"]]


def test_a_second_run_in_the_process_still_reports_first_calls():
    shapes = (
        [((4, 3, 2, 2), "nchw")]
        if ((4, 3, 2, 2), "nchw") in bench.QUICK_SHAPES
        else [bench.QUICK_SHAPES[0]]
    )
    records = [
        bench.run(shapes, repeats=1, warmup=0, peers=["numba", "torch"], progress=False)
        for _ in range(2)
    ]
    assert all("numba" in r["first_call"] for r in records)
    assert records[1]["first_call"]["numba"]["warm_in_process"] is True
