"""The GPU benchmark's record, from a tiny run (on CPU under the Triton interpreter in CI)."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from batchnorm import bench_gpu  # noqa: E402


def test_quick_run_writes_the_documented_record(tmp_path):
    args = bench_gpu.build_parser().parse_args(
        ["--quick", "--shapes", "4x3x6x5", "--layouts", "nchw,channels_last",
         "--dtypes", "bfloat16", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    )  # fmt: skip
    record = bench_gpu.run_gpu_bench(args)
    path = bench_gpu.write_record(record, tmp_path)
    record = json.loads(path.read_text())
    assert record["schema"] == bench_gpu.SCHEMA
    assert record["device"] in path.name or "cpu" in path.name
    assert record["copy_GBps"] > 0
    assert record["settings"]["peers"] == ["eager", "ours", "ours-kernels"]  # no compile: quick
    assert [(e["layout"], e["dtype"]) for e in record["results"]] == [
        ("nchw", "bfloat16"),
        ("channels_last", "bfloat16"),
    ]
    from batchnorm.kernels import triton_gpu

    runs_here = triton_gpu.is_interpreter() or torch.cuda.is_available()
    for entry in record["results"]:
        assert entry["bytes"] == 4 * 3 * 6 * 5 * 2
        ran = {(t["peer"], t["op"]) for t in entry["timings"]}
        if "ours" in entry["skipped"]:  # no GPU and no interpreter: said why, not fatal
            assert not runs_here, entry["skipped"]["ours"]
            assert "triton" in entry["skipped"]["ours"]
            continue
        assert {(p, op) for p in ("eager", "ours") for op in bench_gpu.OPS} <= ran
        assert {("ours-kernels", op) for op in ("forward", "backward", "fwd+bwd")} <= ran
        for t in entry["timings"]:
            assert t["median_s"] > 0 and t["GBps"] > 0 and t["x_copy_bw"] > 0
            assert t["speedup"] > 0
            expected = bench_gpu.MODEL_BYTES[t["op"]] * entry["bytes"] / t["median_s"] / 1e9
            assert t["GBps"] == pytest.approx(expected)
        eager = [t for t in entry["timings"] if t["peer"] == "eager"]
        assert all(t["speedup"] == 1 for t in eager)
        # The correctness check rode along: bfloat16 rounding, not a wrong kernel.
        assert max(entry["max_rel_diff_vs_eager"]["ours"].values()) < 2e-2
    targets = record["summary"]["targets"]
    assert set(targets) == set(bench_gpu.TARGETS)
    assert all(cell["met"] is None for cell in targets.values())  # quick says nothing


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown peers"):
        bench_gpu.run_gpu_bench(bench_gpu.build_parser().parse_args(["--peers", "cudnn"]))
    with pytest.raises(SystemExit):
        bench_gpu.build_parser().parse_args(["--shapes", "4xa"])
