"""``batchnorm bench --quick`` on CPU: runs end to end and writes the documented JSON (no timing
is asserted: speed is measured by the benchmark, never by the tests)."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("torch")

from batchnorm import bench  # noqa: E402
from batchnorm.bench import shapes as bench_shapes  # noqa: E402
from batchnorm.cli import main as cli_main  # noqa: E402

pytestmark = pytest.mark.xdist_group("numba")

TIMING_KEYS = {"peer", "op", "median_s", "min_s", "q1_s", "q3_s", "n", "calls", "speedup",
               "x_copy", "x_clone", "x_limit", "GBps"}  # fmt: skip


def test_quick_bench_writes_the_documented_json(tmp_path, capsys):
    log = tmp_path / "log.csv"
    argv = ["bench", "--quick", "--out", str(tmp_path), "--no-progress", "--log", str(log)]
    assert cli_main(argv) == 0
    record = json.loads((tmp_path / "bench-cpu-float32-quick.json").read_text())
    assert (tmp_path / "bench-cpu-float32-quick.png").stat().st_size > 0
    assert record["schema"] == bench.SCHEMA
    assert record["command"].startswith("batchnorm bench --quick")
    for key in ("cpu_count", "torch", "numpy", "numba", "torch_threads", "numba_threads"):
        assert key in record["machine"], key
    settings = record["settings"]
    assert settings["device"] == "cpu" and settings["dtypes"] == ["float32"]
    assert settings["repeats"] == 3 and "torch.compile" not in settings["peers"]
    assert {"numba", "torch", "numpy"} <= set(settings["peers"])
    assert settings["fused"] is False
    first = record["first_call"]["numba"]
    assert first["first_calls_s"] > 0 and "jit_cache_hits" in first

    assert [(tuple(e["shape"]), e["layout"]) for e in record["results"]] == bench.QUICK_SHAPES
    for entry in record["results"]:
        assert entry["kind"] == "quick"
        assert entry["bytes"] == 4 * _prod(entry["shape"])
        for name in ("copy", "clone", "numpy copyto"):
            assert entry["copy"][name]["median_s"] > 0
        assert entry["copy"]["bandwidth_GBps"] > 0
        seen = {(t["peer"], t["op"]) for t in entry["timings"]}
        assert seen == {(p, op) for p in ("numba", "torch", "numpy") for op in bench.OPS}
        copy_s = entry["copy"]["copy"]["median_s"]
        for t in entry["timings"]:
            assert set(t) == TIMING_KEYS
            assert t["min_s"] <= t["median_s"] and t["n"] == 3 and t["calls"] == 1
            assert t["x_copy"] == pytest.approx(t["median_s"] / copy_s)
            assert t["x_clone"] == pytest.approx(t["median_s"] / entry["copy"]["clone"]["median_s"])
            assert t["x_limit"] == pytest.approx(
                t["x_copy"] * bench.MODEL_BYTES["copy"] / bench.MODEL_BYTES[t["op"]]
            )
            expected = bench.MODEL_BYTES[t["op"]] * entry["bytes"] / t["median_s"] / 1e9
            assert t["GBps"] == pytest.approx(expected)
            torch_t = next(u for u in entry["timings"] if u["peer"] == "torch" and
                           u["op"] == t["op"])  # fmt: skip
            assert t["speedup"] == pytest.approx(torch_t["median_s"] / t["median_s"])

    summary = record["summary"]
    assert set(summary["peers"]["numba"]) == set(bench.OPS)
    assert summary["targets"]["peer"] == "numba"
    for name, target in bench.TARGETS["numba"].items():
        assert summary["targets"][name]["target"] == target.bound
        assert summary["targets"][name]["met"] in (True, False)
    out = capsys.readouterr().out
    assert "speed-up" in out and "targets (numba" in out
    assert "indicative only" in out  # quick shapes: the targets are not for them
    [row] = list(csv.DictReader(log.open()))
    assert row["command"] == record["command"] and row["peer"] == "numba"
    assert row["source"] == "bench-cpu-float32-quick.json"


def test_peer_selection_and_bad_arguments(tmp_path, capsys):
    args = ["--quick", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    assert bench.main(args + ["--peers", "numba", "--shapes", "64x8", "--repeats", "2"]) == 0
    record = json.loads((tmp_path / "bench-cpu-float32-quick.json").read_text())
    assert record["settings"]["peers"] == ["numba", "torch"]  # the baseline is always timed
    assert record["results"][0]["shape"] == [64, 8]
    assert record["results"][0]["kind"] == "custom"
    assert bench.main(args + ["--peers", "nope"]) == 2
    assert "unknown peers ['nope']" in capsys.readouterr().err
    assert bench.main(args + ["--dtype", "float8"]) == 2
    assert "float8" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert bench.main(args + ["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(args + ["--shapes", "12xA"])
    with pytest.raises(SystemExit):
        bench.main(args + ["--shapes", "2x3x4x5:nhwc"])  # one vocabulary: channels_last


def _prod(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def test_a_second_run_in_the_process_still_reports_first_calls():
    shapes = [bench.QUICK_SHAPES[0]]
    records = [
        bench.run(shapes, repeats=1, warmup=0, peers=["numba", "torch"], progress=False)
        for _ in range(2)
    ]
    assert all("numba" in r["first_call"] for r in records)
    assert records[1]["first_call"]["numba"]["warm_in_process"] is True


def test_rows_say_which_kind_of_shape_they_are(monkeypatch):
    """The report runs QUICK_SHAPES + REPRESENTATIVE_SHAPES and labels the rows by kind; a small
    stand-in for the representative shape keeps this test fast."""
    monkeypatch.setattr(bench_shapes, "REPRESENTATIVE_SHAPES", [(2, 3, 5, 7)])
    shapes = [bench.QUICK_SHAPES[2], *bench_shapes.REPRESENTATIVE_SHAPES]
    record = bench.run(shapes, repeats=1, warmup=0, peers=["torch"], progress=False)
    got = [(e["shape"], e["layout"], e["kind"]) for e in record["results"]]
    assert got == [([128, 32], "nc", "quick"), ([2, 3, 5, 7], "nchw", "representative")]
    assert "[representative]" in bench.format_table(record)


def test_check_against_eager_tells_a_relu_boundary_flip_from_a_wrong_gradient():
    """``TorchPeer.check``: a ReLU output that rounds to 0 in one peer and just above it in the
    other passes dy in one only; that is judged by the output there (tiny), not by dx. A wrong
    gradient is still seen."""
    import torch
    import torch.nn.functional as F

    from batchnorm.bench.peers import EPS, TorchPeer

    # m = 8192 values per channel: a flipped mask moves the channel's backward sums, and with
    # them every dx of the channel, by about |dy| / m, far below a wrong gradient's 1%.
    problem = bench_shapes.make_problem((32, 3, 16, 16), "nchw", "float32", "cpu")

    def bn(x, w, b):
        return F.batch_norm(x, None, None, w, b, True, 0.1, EPS)

    class Peer(TorchPeer):
        name = "probe"

        def __init__(self, nudge, scale_dx):
            self.nudge, self.scale_dx = nudge, scale_dx

        def functions(self):
            nudge, scale_dx = self.nudge, self.scale_dx

            class Relu(torch.autograd.Function):
                # ReLU whose output at the smallest positive pre-activation is 0 (nudge):
                # the rounding that sends a value to the other side of 0.
                @staticmethod
                def forward(ctx, z):
                    y = z.clamp_min(0)
                    if nudge:
                        flat = y.view(-1)
                        flat[torch.where(flat > 0, flat, torch.inf).argmin()] = 0
                    ctx.save_for_backward(y)
                    return y

                @staticmethod
                def backward(ctx, dy):
                    (y,) = ctx.saved_tensors
                    return dy * (y > 0) * scale_dx

            return {
                **super().functions(),
                "relu": lambda x, w, b: Relu.apply(bn(x, w, b)),
                "add_relu": lambda x, r, w, b: Relu.apply(bn(x, w, b) + r),
            }

    exact = Peer(nudge=False, scale_dx=1.0).check(problem)
    assert max(exact.values()) < 1e-5 and exact["relu flip y"] == 0
    flipped = Peer(nudge=True, scale_dx=1.0).check(problem)
    for op in ("relu", "add_relu"):
        assert flipped[f"{op} dx"] < 1e-3  # the flipped position is left out of dx
        assert 0 < flipped[f"{op} flip y"] < 0.05  # and judged by its (small) output
    wrong = Peer(nudge=True, scale_dx=1.01).check(problem)
    assert wrong["relu dx"] > 5e-3 and wrong["add_relu dx"] > 5e-3
