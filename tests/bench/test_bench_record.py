"""The benchmark's pure parts: shapes and layouts, the summary and targets, the run log, and
``--device cuda`` taking the same command line (no timing runs here)."""

from __future__ import annotations

import csv
import math
from collections import Counter

import pytest

from batchnorm.bench import cli as bench_cli
from batchnorm.bench import record as rec
from batchnorm.bench import shapes
from batchnorm.bench.timing import round_orders


def test_parse_shapes():
    assert shapes.parse_shapes("2x3x4x5,2x3x4x5:channels_last,7x3,6x3x16:channels_last") == [
        ((2, 3, 4, 5), "nchw"),
        ((2, 3, 4, 5), "channels_last"),
        ((7, 3), "nc"),
        ((6, 3, 16), "channels_last"),
    ]
    with pytest.raises(ValueError, match="layout 'channels_last' for 2-D"):
        shapes.parse_shapes("7x3:channels_last")
    with pytest.raises(ValueError, match="'nhwc'"):
        shapes.parse_shapes("2x3x4x5:nhwc")
    with pytest.raises(ValueError, match="'12xA'"):
        shapes.parse_shapes("12xA")
    with pytest.raises(ValueError, match="positive"):
        shapes.parse_shapes("0x3")


def test_bare_shapes_and_layout_crossing():
    assert shapes.normalize((32, 64, 56, 56)) == ((32, 64, 56, 56), "nchw")
    assert shapes.normalize(((8, 3), "nc")) == ((8, 3), "nc")
    crossed = shapes.with_layouts([(4, 3, 6, 5), (6, 3)], ["nchw", "channels_last"])
    assert crossed == [((4, 3, 6, 5), "nchw"), ((4, 3, 6, 5), "channels_last"), ((6, 3), "nc")]


def test_kinds():
    assert shapes.REPRESENTATIVE_SHAPES == [(32, 64, 56, 56)]
    assert shapes.kind_of((32, 64, 56, 56), "nchw") == "representative"
    assert shapes.kind_of((32, 64, 56, 56), "channels_last") == "custom"
    for shape, layout in shapes.QUICK_SHAPES:
        assert shapes.kind_of(shape, layout) == "quick"
    for shape, layout in shapes.DEFAULT_SHAPES:
        assert shapes.kind_of(shape, layout) == "default"
    assert shapes.kind_of((256, 64, 56, 56), "channels_last") == "default"


def _record(device, rows, peers=("numba", "torch")):
    """A record with fwd+bwd and inference timings: rows of (shape, bytes, {peer: fwd+bwd s})."""
    results = []
    for shape, nbytes, times in rows:
        timings = []
        for peer, seconds in times.items():
            for op, scale in (("fwd+bwd", 1.0), ("inference", 0.25)):
                timings.append({"peer": peer, "op": op, "median_s": seconds * scale,
                                "speedup": times["torch"] / seconds, "x_copy": 2.0 * scale,
                                "x_clone": 1.0, "x_limit": 0.5, "GBps": 1.0})  # fmt: skip
        results.append({"shape": list(shape), "layout": "nchw", "bytes": nbytes,
                        "timings": timings})  # fmt: skip
    record = {
        "settings": {"device": device, "peers": list(peers), "baseline": "torch",
                     "dtypes": ["float32"]},
        "results": results,
        "created": "2026-12-04T00:00:00+00:00",
        "machine": {"cpu": "Test CPU", "cpu_count": 2},
        "command": "batchnorm bench",
    }  # fmt: skip
    record["summary"] = rec.summarize(record)
    return record


def test_summary_and_cpu_targets():
    record = _record("cpu", [((8, 4, 2, 2), 512, {"numba": 1.0, "torch": 4.0}),
                             ((8, 16, 2, 2), 2048, {"numba": 2.0, "torch": 2.0})])  # fmt: skip
    s = record["summary"]
    assert s["peers"]["numba"]["fwd+bwd"]["median_speedup"] == pytest.approx(2.5)
    assert s["peers"]["numba"]["fwd+bwd"]["min_speedup"] == pytest.approx(1.0)
    t = s["targets"]
    assert t["peer"] == "numba"
    assert t["fwd+bwd median speedup"] == {"target": 3.0, "value": 2.5, "met": False}
    assert t["fwd+bwd min speedup"]["met"] is False
    assert t["fwd+bwd median x_copy"] == {"target": 3.5, "value": 2.0, "met": True}
    assert t["inference median speedup"]["met"] is True


def test_gpu_targets_filter_few_channels_and_large_tensors():
    big = rec.LARGE_BYTES
    rows = [((8, 4, 2, 2), 512, {"triton-layer": 1.0, "torch": 5.0}),
            ((8, 64, 2, 2), big, {"triton-layer": 1.0, "torch": 1.2})]  # fmt: skip
    t = _record("cuda", rows, peers=("triton-layer", "torch"))["summary"]["targets"]
    assert t["peer"] == "triton-layer"
    assert t["fwd+bwd min speedup (few channels)"]["value"] == pytest.approx(5.0)  # the 4-channel
    large = t["fwd+bwd median x_limit (large tensors)"]
    assert large == {"target": 1.25, "value": 0.5, "met": True}
    assert t["fwd+bwd median speedup"]["value"] == pytest.approx(3.1)
    # Judged only on the device they are stated for.
    t_cpu = _record("cpu", rows, peers=("triton-layer", "torch"))["summary"]["targets"]
    assert all(cell["met"] is None for name, cell in t_cpu.items() if name != "peer")


def test_log_row_and_append(tmp_path):
    record = _record("cpu", [((8, 4, 2, 2), 512, {"numba": 1e-3, "torch": 4e-3}),
                             ((8, 16, 2, 2), 2048, {"numba": 2e-3, "torch": 2e-3})])  # fmt: skip
    row = rec.log_row(record, source="x.json")
    assert row["peer_fwd_bwd_ms"] == "3" and row["baseline_fwd_bwd_ms"] == "6"
    assert row["ratio"] == "2" and row["median_speedup"] == "2.5" and row["min_speedup"] == "1"
    assert row["targets_met"] == "2/4" and row["machine"] == "Test CPU (2 cores)"
    assert row["shapes"] == "8x4x2x2:nchw;8x16x2x2:nchw"
    log = tmp_path / "sub" / "log.csv"
    rec.append_log(log, row)
    rec.append_log(log, {**row, "source": "y.json"})
    rows = list(csv.DictReader(log.open()))
    assert [r["source"] for r in rows] == ["x.json", "y.json"]
    assert list(rows[0]) == list(rec.LOG_FIELDS)
    with pytest.raises(ValueError, match="nope"):
        rec.append_log(log, {"nope": "1"})


def test_device_cuda_takes_the_same_command_line(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    seen = {}

    def fake_run(shapes_, **kwargs):
        seen.update(shapes=shapes_, **kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_cli, "run", fake_run)
    assert bench_cli.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert seen["device"] == "cuda" and seen["dtype"] == ["float32", "bfloat16"]
    assert seen["compile"] is True and seen["fused"] is None  # run: fused by default on cuda
    assert seen["shapes"] == shapes.with_layouts(shapes.GPU_SHAPES, ["nchw", "channels_last"])
    assert bench_cli.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == 2
    assert seen["compile"] is False and seen["repeats"] == 3
    assert seen["shapes"] == shapes.with_layouts(shapes.GPU_QUICK_SHAPES, ["nchw", "channels_last"])
    assert bench_cli.main(["--device", "cuda", "--peers", "triton", "--out", str(tmp_path)]) == 2
    assert seen["compile"] is False and seen["peers"] == ["triton"]


def test_importing_the_bench_imports_no_heavy_package():
    import subprocess
    import sys

    code = (
        "import sys, batchnorm.bench\n"
        "print(sorted(m for m in ('torch', 'numba', 'triton', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bench_sets_a_passive_openmp_policy_before_torch_loads_unless_given():
    """``batchnorm bench`` without OMP_WAIT_POLICY timed torch.nn at 24-75 ms a call on tiny
    tensors on a busy machine (0.1-0.3 ms with PASSIVE), reporting 70-400x speed-ups: the
    command now sets PASSIVE before torch loads OpenMP; a policy in the environment wins, and
    after torch is loaded nothing is set (too late to matter)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from batchnorm.bench.cli import passive_openmp\n"
        "if len(sys.argv) > 1: import torch\n"
        "passive_openmp()\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(*args, **extra):
        done = subprocess.run([sys.executable, "-c", code, *args], env={**env, **extra},
                              capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    assert policy() == "PASSIVE"
    assert policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy("torch first") == "None"


def test_cuda_clock_times_loops_of_calls_and_divides(monkeypatch):
    """The CUDA path without a GPU: events read a fake clock that each call advances by 0.5 ms,
    so a sample must hold ceil(2 ms / 0.5 ms) = 4 calls and report 0.5 ms per call."""
    torch = pytest.importorskip("torch")
    from batchnorm.bench import timing

    now = [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = now[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # milliseconds, like CUDA's

    calls = []

    def step():
        calls.append(1)
        now[0] += 5e-4

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(timing, "sync", lambda device: None)
    ops = {("p", "op"): timing.Op(step), ("p", "capped"): timing.Op(step, max_repeats=1)}
    out = timing.time_interleaved(ops, repeats=3, warmup=2, device="cuda")
    assert out[("p", "op")]["calls"] == 4 and out[("p", "op")]["n"] == 3
    assert out[("p", "op")]["median_s"] == pytest.approx(5e-4)
    assert out[("p", "capped")]["n"] == 1
    # warm-up 2 + sizing 1 per op, then 3 samples of 4 calls and 1 sample of 4 calls
    assert len(calls) == 2 * (2 + 1) + 3 * 4 + 1 * 4


def test_round_orders_let_every_variant_follow_every_other():
    # Oracle: counted from the orders. In a block of n! rounds every name comes first
    # (n-1)! times and every ordered pair (a right before b, inside a round) occurs (n-1)!
    # times. A rotating order has each name right before one other name only.
    for names in (["a", "b", "c"], ["a", "b", "c", "d", "e"]):
        n, block = len(names), math.factorial(len(names))
        orders = round_orders(names, 2 * block)
        assert all(sorted(order) == names for order in orders)  # each round runs each once
        for part in (orders[:block], orders[block:]):
            first = Counter(order[0] for order in part)
            pairs = Counter(pair for order in part for pair in zip(order, order[1:], strict=False))
            each = math.factorial(n - 1)
            assert set(first.values()) == {each} and len(first) == n
            assert set(pairs.values()) == {each} and len(pairs) == n * (n - 1)
        assert orders[:block] != orders[block:]  # blocks shuffled apart
    assert round_orders(names, 7) == round_orders(names, 7)  # seeded: a run can be repeated
    assert round_orders(names, 7, seed=1) != round_orders(names, 7)
    # Too many names to list every order: a permutation per round, each name first about
    # equally often (1,000 rounds of 8: about 125 each).
    many = [str(i) for i in range(8)]
    orders = round_orders(many, 1000)
    assert all(sorted(order) == many for order in orders)
    assert all(80 < count < 170 for count in Counter(o[0] for o in orders).values())
