"""benchmarks/model_step.py runs end to end (``--quick``) and writes its record; no timing is
judged here, only that every figure is there and that the fused pairs save less than torch.nn's
(for a whole ResNet they need not: see docs/torch.md, "Fused activations")."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_model_step_quick_writes_every_figure(tmp_path, monkeypatch, device):
    out = tmp_path / "model_step.json"
    argv = [str(SCRIPT), "--quick", "--threads", "1", "--device", device, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    record = json.loads(out.read_text())
    assert record["device"] == (torch.cuda.get_device_name() if device == "cuda" else "cpu")
    (result,) = record["results"]
    for variant in ("torch.nn", "convert", "convert+fused"):
        figures = result[variant]
        assert figures["step_ms"] > 0 and figures["speed_vs_torch_nn"] > 0
        assert figures["speed_q1"] <= figures["speed_vs_torch_nn"] <= figures["speed_q3"]
        assert figures["fastest_step_ms"] <= figures["step_ms"]
        assert 0 < figures["bn_share"] < 1 and figures["saved_bytes"] > 0
        assert figures["bn_relu_ms"] > 0
        low, high = figures["speed_ci95"]
        assert low <= figures["speed_vs_torch_nn"] <= high
        assert figures["verdict"] == "too few rounds"  # --quick runs 2 rounds
        if device == "cuda":  # the kernels' side: batch norm is a part of them, not all
            assert 0 < figures["bn_device_share"] < 1
            assert 0 < figures["bn_relu_device_ms"] < figures["kernels_ms"]
            # One stream: its kernels, each counted once, fit in the profiled steps' time.
            assert figures["kernels_ms"] <= figures["profiled_step_ms"]
        else:
            assert "bn_device_share" not in figures
    assert result["torch.nn"]["speed_vs_torch_nn"] == 1.0
    # The tiny ResNet's batch norms: the stem's, two per block (4 blocks) and one in each of the
    # 3 downsampling shortcuts, 12 (fused modules are BatchNorm2d subclasses); at batch 4,
    # 32x32 "auto" runs PyTorch's kernel in every one.
    assert result["torch.nn"]["paths"] == {"torch.nn": 12}
    assert result["convert"]["paths"] == result["convert+fused"]["paths"] == {"torch": 12}
    for pairs in record["pairs"].values():
        # The fused kernels keep less; "auto" on this small pair runs PyTorch's kernel (BN+ReLU),
        # keeping what torch.nn keeps (on CUDA at every size: native.NATIVE_BELOW).
        assert pairs["bn+relu"]["ratio"] < 1 and pairs["bn+leaky_relu"]["ratio"] < 1
        kernels = ("triton",) if device == "cuda" else ("numba", "reference")
        assert pairs["bn+relu"]["kernels"] in kernels
        assert pairs["bn+relu"]["auto_ran"] == "torch" and pairs["bn+relu"]["auto_ratio"] == 1.0


def test_model_step_rejects_an_unknown_device(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick", "--device", "tpu"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    err = capsys.readouterr().err
    assert "--device" in err and "'tpu': cpu or cuda[:N]" in err


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
    general = dict(native.NATIVE_BELOW)
    monkeypatch.setattr(sys, "argv", [*argv, "--general"])
    runpy.run_path(str(script), run_name="__main__")
    assert "general from 0" in capsys.readouterr().out
    assert native.NATIVE_BELOW == general


def _script():
    return runpy.run_path(str(SCRIPT), run_name="model_step")


@pytest.mark.parametrize("n", [6, 9, 15, 25, 40])
def test_median_interval_has_the_binomial_order_statistics(n):
    # Oracle: the coverage of [x_(k), x_(n+1-k)] summed term by term from the binomial law
    # (P(x_(k) <= median < x_(n+1-k)) = P(k <= B <= n - k), B ~ Bin(n, 1/2)); the interval is
    # the narrowest symmetric one with coverage >= 95%.
    from math import comb

    median_interval = _script()["median_interval"]

    def coverage(k):
        return sum(comb(n, b) for b in range(k, n - k + 1)) / 2**n

    k = max(j for j in range(1, n // 2 + 1) if coverage(j) >= 0.95)
    values = [float(v) for v in range(100, 100 + n)][::-1]  # unsorted on purpose
    assert median_interval(values) == (100.0 + k - 1, 100.0 + n - k)


def test_median_interval_known_values_and_bad_input():
    median_interval = _script()["median_interval"]
    # Conover's table: n = 15 -> 4th smallest to 4th largest (coverage 96.5%).
    assert median_interval(list(range(1, 16))) == (4, 12)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few: the extremes
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])
    with pytest.raises(ValueError, match="confidence"):
        median_interval([1.0, 2.0], confidence=1.5)


def test_verdict_reads_the_interval():
    ns = _script()
    speed_figures = ns["speed_figures"]
    base = [1.0] * 15
    faster = speed_figures(base, [0.9 + 0.001 * i for i in range(15)])
    slower = speed_figures(base, [1.1 + 0.001 * i for i in range(15)])
    mixed = speed_figures(base, [0.95 + 0.01 * i for i in range(15)])
    assert faster["verdict"] == "faster" and faster["speed_ci95"][0] > 1
    assert slower["verdict"] == "slower" and slower["speed_ci95"][1] < 1
    assert mixed["verdict"] == "within noise"
    few = speed_figures([1.0] * 5, [0.5] * 5)  # twice as fast, but 5 rounds prove nothing at 95%
    assert few["verdict"] == "too few rounds"


def test_profiled_part_counts_each_backward_node_once():
    # Event names as torch.profiler gives them (printed from a Conv-BN-ReLU step, torch 2.13).
    profiled_part = _script()["profiled_part"]
    assert profiled_part("NativeBatchNormBackward0") == "bn"
    assert profiled_part("BatchNormFunctionBackward") == "bn"
    assert profiled_part("FusedBatchNormReLUFunctionBackward") == "bn"
    assert profiled_part("autograd::engine::evaluate_function: NativeBatchNormBackward0") is None
    assert profiled_part("autograd::engine::evaluate_function: ReluBackward0") is None
    assert profiled_part("ReluBackward0") == "relu" and profiled_part("bench::relu") == "relu"
    assert profiled_part("LeakyReluBackward0") == "relu"
    assert profiled_part("bench::bn") == "bn" and profiled_part("aten::convolution") is None


def test_row_length_scan_runs(monkeypatch, capsys):
    pytest.importorskip("numba")
    script = SCRIPT.parent / "row_length_scan.py"
    argv = [str(script), "--values", "4096", "--inner", "16,130", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert "relu_backward" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["16", "130"]
    assert all(float(v) > 0 for r in rows for v in r[1:])


def test_kernel_shares_count_each_kernel_once():
    """The GPU side of the profile, on made-up events: the host-side ops' self device times add
    up to every kernel once; the kernels' own events and the GPU-side copy of a range (which
    spans the gaps between its kernels) are not counted again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, device_type, total, self_total):
        return SimpleNamespace(name=name, device_type=device_type, device_time_total=total,
                               self_device_time_total=self_total)  # fmt: skip

    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    events = [
        event("aten::convolution", cpu, 100.0, 100.0),
        event("bench::bn", cpu, 30.0, 0.0),  # the range: its child launched the kernel
        event("aten::native_batch_norm", cpu, 30.0, 30.0),
        event("NativeBatchNormBackward0", cpu, 20.0, 20.0),
        event("bench::relu", cpu, 5.0, 5.0),
        event("implicit_gemm_kernel", gpu, 100.0, 100.0),  # kernels: already counted above
        event("batch_norm_collect_statistics_kernel", gpu, 30.0, 30.0),
        event("bench::bn", gpu, 80.0, 80.0),  # the range on the GPU timeline, gaps included
    ]
    shares = _script()["_kernel_shares"](events, steps=1)
    assert shares["kernels_ms"] == pytest.approx(0.155)
    assert shares["bn_device_share"] == pytest.approx(50 / 155)
    assert shares["bn_relu_device_ms"] == pytest.approx(0.055)


def test_model_step_compiled_runs_every_variant(tmp_path, monkeypatch):
    """``--compile aot_eager`` (inductor's code generation is too slow for the suite): each
    variant trains through torch.compile, the converted ones on PyTorch's kernel in every
    layer, and the eager-only figures are left out rather than made up."""
    out = tmp_path / "model_step.json"
    argv = [str(SCRIPT), "--quick", "--threads", "1", "--compile", "aot_eager", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    record = json.loads(out.read_text())
    assert record["compiled"] == "aot_eager"
    (result,) = record["results"]
    for variant in ("torch.nn", "convert", "convert+fused"):
        assert result[variant]["step_ms"] > 0
        assert "saved_bytes" not in result[variant] and "bn_share" not in result[variant]
    assert result["convert"]["paths"] == result["convert+fused"]["paths"] == {"torch": 12}


@pytest.mark.parametrize("option", [["--models", "resnet9"], ["--dtypes", "float16"]])
def test_model_step_refuses_unknown_choices(monkeypatch, capsys, option):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *option])
    with pytest.raises(SystemExit, match=option[1]):
        runpy.run_path(str(SCRIPT), run_name="__main__")
