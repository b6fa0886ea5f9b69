"""``batchnorm bench``'s GPU side (fused tails, the layer peer, the check against eager), from a
tiny run: on CPU under the Triton interpreter in CI, on a GPU where there is one."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from batchnorm import bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quick_run_writes_the_documented_record(tmp_path):
    argv = ["--quick", "--device", DEVICE, "--shapes", "4x3x6x5", "--layouts",
            "nchw,channels_last", "--dtype", "bfloat16", "--repeats", "1", "--warmup", "0",
            "--peers", "triton,triton-layer", "--fused", "--no-plot", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    path = tmp_path / f"bench-{DEVICE}-bfloat16-quick.json"
    record = json.loads(path.read_text())
    assert record["schema"] == bench.SCHEMA
    assert record["settings"]["peers"] == ["triton", "triton-layer", "torch"]  # no compile: quick
    assert record["settings"]["fused"] is True
    assert [(e["layout"], e["dtype"]) for e in record["results"]] == [
        ("nchw", "bfloat16"),
        ("channels_last", "bfloat16"),
    ]
    from batchnorm.kernels import triton_gpu

    runs_here = triton_gpu.is_interpreter() or torch.cuda.is_available()
    for entry in record["results"]:
        assert entry["bytes"] == 4 * 3 * 6 * 5 * 2
        assert entry["copy"]["bandwidth_GBps"] > 0
        ran = {(t["peer"], t["op"]) for t in entry["timings"]}
        if "triton-layer" in entry["skipped"]:  # no GPU and no interpreter: said why, not fatal
            assert not runs_here, entry["skipped"]["triton-layer"]
            assert "triton" in entry["skipped"]["triton-layer"]
            continue
        every_op = bench.OPS + bench.FUSED_OPS
        assert {(p, op) for p in ("torch", "triton-layer") for op in every_op} <= ran
        assert {("triton", op) for op in ("forward", "backward", "fwd+bwd")} <= ran
        for t in entry["timings"]:
            assert t["median_s"] > 0 and t["GBps"] > 0 and t["x_limit"] > 0
            assert t["speedup"] > 0
            expected = bench.MODEL_BYTES[t["op"]] * entry["bytes"] / t["median_s"] / 1e9
            assert t["GBps"] == pytest.approx(expected)
        eager = [t for t in entry["timings"] if t["peer"] == "torch"]
        assert all(t["speedup"] == 1 for t in eager)
        # The correctness check rode along: bfloat16 rounding, not a wrong kernel.
        assert max(entry["max_rel_diff_vs_torch"]["triton-layer"].values()) < 2e-2
    targets = record["summary"]["targets"]
    assert targets.pop("peer") == "triton-layer"
    assert set(targets) == set(bench.TARGETS["triton-layer"])
    if DEVICE == "cpu":  # the interpreter says nothing about the GPU targets
        assert all(cell["met"] is None for cell in targets.values())


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown peers"):
        bench.run([(4, 3)], peers=["cudnn"], progress=False)
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--shapes", "4xa"])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--layouts", "nhwc"])


def test_tuning_overrides_reach_the_triton_plans_only_inside_the_run():
    from batchnorm.bench.gpu import triton_tuning
    from batchnorm.kernels.triton_gpu import plan

    before = (plan._TUNING.tile_elems, plan._TUNING.programs)
    with triton_tuning(4096, None):
        assert (plan._TUNING.tile_elems, plan._TUNING.programs) == (4096, None)
    with triton_tuning(None, None):  # nothing asked: whatever was set stays
        assert (plan._TUNING.tile_elems, plan._TUNING.programs) == before
    assert (plan._TUNING.tile_elems, plan._TUNING.programs) == before
