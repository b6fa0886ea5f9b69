"""benchmarks/triton_host_cost.py runs end to end (``--quick``): every figure is there, the
per-call counts are the Triton path's (3 launches forward, 1 for the running statistics, 3
backward; 1 in evaluation; no host read), and the stubs are gone afterwards. No timing is
judged."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from batchnorm.kernels.triton_gpu import is_interpreter, launchers, runtime  # noqa: E402
from batchnorm.torch import functional, native  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_host_cost.py"


@pytest.mark.skipif(
    not (is_interpreter() or torch.cuda.is_available()),
    reason="triton was imported without TRITON_INTERPRET=1 and there is no GPU",
)
def test_host_cost_quick_counts_the_triton_path(tmp_path, monkeypatch):
    out = tmp_path / "host.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick", "--json", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    record = json.loads(out.read_text())
    (row,) = record["rows"]
    assert row["shape"] == [4, 3, 2, 2]
    for mode, launches in (("train", 7), ("eval", 1)):
        per_call = row[mode]["per_call"]
        assert per_call["triton_launches"] == launches
        assert per_call["host_reads"] == 0
        assert per_call["aten_ops"] > 0 and row[mode]["torch.nn_per_call"]["aten_ops"] > 0
        assert all(t > 0 for t in row[mode]["host_us"].values())
        assert "triton, kernels stubbed" in row[mode]["host_us"]
    assert launchers._kernels is runtime._kernels
    assert functional.host_read_is_cheap is native.host_read_is_cheap
    assert native.host_read_is_cheap(torch.zeros(1))
