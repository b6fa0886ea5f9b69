"""benchmarks/model_step.py runs end to end (``--quick``) and writes its record; no timing is
judged here, only that every figure is there and that the fused pairs save less than torch.nn's
(for a whole ResNet they need not: see docs/torch.md, "Fused activations")."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"


def test_model_step_quick_writes_every_figure(tmp_path, monkeypatch):
    out = tmp_path / "model_step.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    record = json.loads(out.read_text())
    (result,) = record["results"]
    for variant in ("torch.nn", "convert", "convert+fused"):
        figures = result[variant]
        assert figures["step_ms"] > 0 and figures["speed_vs_torch_nn"] > 0
        assert figures["speed_q1"] <= figures["speed_vs_torch_nn"] <= figures["speed_q3"]
        assert figures["fastest_step_ms"] <= figures["step_ms"]
        assert 0 < figures["bn_share"] < 1 and figures["saved_bytes"] > 0
        assert figures["bn_relu_ms"] > 0
    assert result["torch.nn"]["speed_vs_torch_nn"] == 1.0
    for pairs in record["pairs"].values():
        # The fused kernels keep less; "auto" on this small pair runs PyTorch's kernel (BN+ReLU),
        # keeping what torch.nn keeps, while the In-Place ABN layer keeps its own kernels.
        assert pairs["bn+relu"]["ratio"] < 1 and pairs["bn+leaky_relu"]["ratio"] < 1
        assert pairs["bn+relu"]["auto_ran"] == "torch" and pairs["bn+relu"]["auto_ratio"] == 1.0


def test_native_limit_ab_runs_and_restores_the_limit(monkeypatch, capsys):
    from batchnorm.torch import native

    script = SCRIPT.parent / "native_limit_ab.py"
    before = dict(native.NATIVE_BELOW_LONG_ROWS)
    argv = [str(script), "--model", "tiny", "--batch", "2", "--size", "32", "--rounds", "2",
            "--threads", "1", "--limits", "0,4194304"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "long rows from 0" in out and "long rows from 4194304" in out
    assert native.NATIVE_BELOW_LONG_ROWS == before
