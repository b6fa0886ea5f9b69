"""``torch.compile`` of a converted model: on PyTorch's kernel (``backend="auto"``, small
calls) the layers trace into one graph, with the non-finite guard on the device (no host
read, which would break the graph at every layer), and the compiled model trains as compiled
torch.nn does, except that a non-finite batch stays out of the running statistics."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm.torch as bt

dynamo = pytest.importorskip("torch._dynamo")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    )


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "convert+fused"])
def test_converted_model_traces_into_one_graph(fuse):
    model = bt.convert(_model(), fuse_activations=fuse)
    explained = dynamo.explain(lambda x: model(x).sum())(torch.randn(4, 3, 10, 10))
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
    assert {m.last_backend for m in model.modules() if hasattr(m, "last_backend")} == {"torch"}


def test_compiled_training_equals_compiled_torch_nn_and_keeps_non_finite_batches_out():
    dynamo.reset()
    theirs = _model()
    ours = bt.convert(copy.deepcopy(theirs))
    compiled = {name: torch.compile(m, backend="aot_eager") for name, m in
                (("theirs", theirs), ("ours", ours))}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 10, 10, generator=gen)
        if step == 2:
            x[0, :, 0, 0] = float("nan")  # every channel's statistics become NaN
        before = {k: v.clone() for k, v in ours.named_buffers()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # silently, under compile: no host read to warn
            outputs = {name: fn(x) for name, fn in compiled.items()}
        for y in outputs.values():
            y.sum().backward()
        torch.testing.assert_close(outputs["ours"], outputs["theirs"], equal_nan=True)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
        mine, peer = dict(ours.named_buffers()), dict(theirs.named_buffers())
        for name, value in mine.items():
            if step < 2:
                torch.testing.assert_close(value, peer[name])
            elif name.endswith("num_batches_tracked"):
                assert value == peer[name] == 3
            else:
                assert torch.isnan(peer[name]).all()  # torch.nn poisons its buffers
                torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(m.last_backend == "torch" for m in ours.modules() if hasattr(m, "last_backend"))


_NUMBA_UNDER_COMPILE = """
import warnings
import numpy
from batchnorm.kernels import get_backend
get_backend("numba", numpy.zeros((2, 2)))  # the Numba stages loaded before torch
import torch
import batchnorm.torch as bt
warnings.simplefilter("ignore")
conv = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
model = torch.nn.Sequential(conv, bt.BatchNorm2d(64, backend="numba"), torch.nn.ReLU())
compiled = torch.compile(model, backend="eager")
compiled(torch.randn(16, 3, 64, 64)).sum().backward()
print("ran", model[1].last_backend)
"""


def test_numba_stages_run_under_torch_compile():
    """A layer on the Numba stages (named: under compile ``auto`` runs PyTorch's kernel) at a
    ResNet stem's size (64x64, batch 16) inside ``torch.compile``: Dynamo used to trace into
    numba's dispatcher on its first call and fail there ("AssertionError: exception table
    entry start instruction has no offset"), ending the step. In a fresh process, so that the
    first call is the compiled one, with the Numba backend loaded before torch is imported
    (a NumPy user's order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("numba")
    src = str(Path(bt.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", _NUMBA_UNDER_COMPILE], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ran numba"


def test_under_compile_every_size_runs_pytorch_kernel(monkeypatch):
    """Above the size limits eager ``auto`` runs our stages; under ``torch.compile`` those would
    break the graph (one break per layer), so there PyTorch's kernel runs at every size."""
    from batchnorm.torch import native

    monkeypatch.setitem(native.NATIVE_BELOW, "cpu", (16, 16))  # every layer here is "large"
    monkeypatch.setitem(native.NATIVE_BELOW_LONG_ROWS, "cpu", 16)
    model = bt.convert(_model())
    x = torch.randn(4, 3, 10, 10)
    model(x)
    assert {m.last_backend for m in model.modules() if hasattr(m, "last_backend")} != {"torch"}
    assert "our stages are faster" in bt.explain_backend(torch.randn(4, 8, 8, 8))
    explained = dynamo.explain(lambda x: model(x).sum())(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert {m.last_backend for m in model.modules() if hasattr(m, "last_backend")} == {"torch"}
