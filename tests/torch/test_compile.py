"""``torch.compile`` of a converted model: on PyTorch's kernel (``backend="auto"``, small
calls) the layers trace into one graph, with the non-finite guard on the device (no host
read, which would break the graph at every layer), and the compiled model trains as compiled
torch.nn does, except that a non-finite batch stays out of the running statistics. The same
for ``torch.export``; and the Triton and Numba stages, named, run outside Dynamo."""

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


def _triton_layers() -> list:
    return [
        ("BatchNorm2d", lambda: bt.BatchNorm2d(4, backend="triton"), nn.BatchNorm2d(4)),
        ("BatchNormReLU2d", lambda: bt.BatchNormReLU2d(4, backend="triton"),
         nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())),
        ("BatchNormLeakyReLU2d",
         lambda: bt.BatchNormLeakyReLU2d(4, negative_slope=0.1, backend="triton"),
         nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.1))),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(3), ids=[name for name, *_ in _triton_layers()])
def test_triton_stages_run_under_torch_compile(index):
    """A layer on the Triton stages inside ``torch.compile``: Dynamo used to trace into
    Triton's launcher (here its interpreter, where fake tensors met a ``uint64`` pointer
    offset: "InterpreterError ... KeyError(torch.uint64)"), ending the step. Now the stages run
    as eager code at the layer's graph break, and the step equals torch.nn's."""
    from batchnorm.kernels.triton_gpu.backend import TritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"  # else Triton's interpreter
    x = torch.randn(6, 4, 5, 5, device=device)
    reason = TritonBackend().unavailable_reason(x)
    if reason is not None:
        pytest.skip(reason)
    dynamo.reset()
    _, make, theirs = _triton_layers()[index]
    torch.manual_seed(0)
    ours, theirs = make().to(device), theirs.to(device)
    with torch.no_grad():  # a gamma away from 1 and a beta away from 0, the same in both
        for m in (ours, theirs[0] if isinstance(theirs, nn.Sequential) else theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-0.5, 0.5, 4))
    compiled = torch.compile(ours, backend="eager")
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = compiled(x_ours), theirs(x_theirs)
    dy = torch.randn_like(y_theirs)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert ours.last_backend.startswith("triton")
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-5, rtol=1e-4)
    bn = theirs[0] if isinstance(theirs, nn.Sequential) else theirs
    torch.testing.assert_close(ours.weight.grad, bn.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.running_var, bn.running_var)
    torch.testing.assert_close(ours.running_mean, bn.running_mean)


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "convert+fused"])
def test_exported_training_program_equals_torch_nn_and_keeps_non_finite_batches_out(fuse):
    """``torch.export`` of a converted model in training mode (the start of PT2E
    quantization-aware training) refused the program: the guard's write through ``.data``
    became a lifted constant ("We found a fake tensor in the exported program constant's
    list"). Exported, it trains as exported torch.nn does, gradients included, and a NaN
    batch stays out of its running statistics; in evaluation it exports as well."""
    theirs = _model()
    ours = bt.convert(copy.deepcopy(theirs), fuse_activations=fuse)
    example = (torch.randn(4, 3, 10, 10),)
    programs = {
        name: torch.export.export(m, example).module()
        for name, m in (("ours", ours), ("theirs", theirs))
    }
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 10, 10, generator=gen)
        if step == 2:
            x[0, :, 0, 0] = float("nan")
        before = {k: v.clone() for k, v in programs["ours"].named_buffers()}
        outputs = {name: program(x) for name, program in programs.items()}
        torch.testing.assert_close(outputs["ours"], outputs["theirs"], equal_nan=True)
        mine, peer = (
            dict(programs["ours"].named_buffers()),
            dict(programs["theirs"].named_buffers()),
        )
        assert mine.keys() == peer.keys()
        for name, value in mine.items():
            if step < 2:
                torch.testing.assert_close(value, peer[name])
            elif not name.endswith("num_batches_tracked"):
                assert torch.isnan(peer[name]).all()
                torch.testing.assert_close(value, before[name], rtol=0, atol=0)
        if step == 0:
            for program in programs.values():
                program(x).square().sum().backward()
            grads = [[p.grad for p in programs[k].parameters()] for k in ("ours", "theirs")]
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(a, b)
    ours.eval()
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    x = torch.randn(2, 3, 10, 10, generator=gen)
    exported = torch.export.export(ours, (x,)).module()
    torch.testing.assert_close(exported(x), theirs(x))


def test_exported_leaky_relu_layer_equals_eager_and_numba_refuses_fake_tensors_clearly():
    """``BatchNormLeakyReLU2d`` (In-Place ABN) exports in training and in evaluation: its gamma
    guard read gamma on the host ("Could not guard on data-dependent expression"); under
    export it saves x. The Numba backend, named, cannot read a fake tensor's memory: a clear
    ``BackendUnavailable`` instead of ".numpy() is not supported for tensor subclasses"."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    for training in (True, False):
        layer = bt.BatchNormLeakyReLU2d(8, negative_slope=0.2).train(training)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        eager = copy.deepcopy(layer)
        program = torch.export.export(layer, (x,)).module()
        leaf_p, leaf_e = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_p, y_e = program(leaf_p), eager(leaf_e)
        torch.testing.assert_close(y_p, y_e)
        y_p.square().sum().backward()
        y_e.square().sum().backward()
        torch.testing.assert_close(leaf_p.grad, leaf_e.grad, atol=1e-5, rtol=1e-4)
        buffers = dict(program.named_buffers())
        torch.testing.assert_close(buffers["running_var"], eager.running_var)
    pytest.importorskip("numba")
    with pytest.raises(bt.BackendUnavailable, match="FakeTensor.*cannot read"):
        torch.export.export(bt.BatchNorm2d(8, backend="numba"), (x,))
