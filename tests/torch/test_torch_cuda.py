"""The same drop-in promises on a CUDA device (skipped without one): whatever ``"auto"`` picks
there (PyTorch's kernel, ``native.NATIVE_BELOW``) and the Triton stages must agree with
PyTorch's layer and keep the memory format; a non-finite batch stays out of the running
statistics without a host read; ``convert`` keeps the device."""

from __future__ import annotations

import pytest
import torch

import batchnorm.torch as bt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _steps(ours, theirs, layout, dtype, theirs_dtype):
    """Three steps (train, train, eval) from the same state; yields ours and theirs: outputs,
    gradients of input, weight and bias, buffers."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.normal_(generator=gen)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for training in (True, True, False):
        theirs.load_state_dict(ours.state_dict())
        ours.train(training)
        theirs.train(training)
        x = torch.randn(8, 4, 6, 5, device="cuda", generator=gen).to(dtype)
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        dy = torch.randn(x.shape, device="cuda", generator=gen).to(dtype)
        x_theirs = x.detach().to(theirs_dtype).requires_grad_(True)
        y_ours, y_theirs = ours(x), theirs(x_theirs)
        assert y_ours.dtype == dtype and y_ours.is_contiguous(memory_format=fmt)
        g_ours = torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), dy)
        g_theirs = torch.autograd.grad(
            y_theirs, (x_theirs, theirs.weight, theirs.bias), dy.to(theirs_dtype)
        )
        assert g_ours[0].is_contiguous(memory_format=fmt)
        yield (y_ours, *g_ours, *ours.buffers()), (y_theirs, *g_theirs, *theirs.buffers())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_triton_module_matches_torch_in_float64(layout, dtype):
    """The Triton stages against PyTorch's layer in float64 on the same values."""
    ours = bt.BatchNorm2d(4, device="cuda", backend="triton")
    theirs = torch.nn.BatchNorm2d(4, device="cuda", dtype=torch.float64)
    for mine, reference in _steps(ours, theirs, layout, dtype, torch.float64):
        assert ours.last_backend == "triton"
        for a, b in zip(mine, reference, strict=True):
            torch.testing.assert_close(a, b.to(a.dtype))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_auto_is_torch_nn(layout, dtype):
    """``backend="auto"`` on CUDA runs PyTorch's kernel in every layout and dtype
    (``native.NATIVE_BELOW``): it is torch.nn's layer in the same dtype, bit for bit (the same
    ATen call, plus the non-finite guard, which changes nothing on finite batches)."""
    ours = bt.BatchNorm2d(4, device="cuda")
    theirs = torch.nn.BatchNorm2d(4, device="cuda")
    for mine, same_dtype in _steps(ours, theirs, layout, dtype, dtype):
        assert ours.last_backend == "torch"
        for a, b in zip(mine, same_dtype, strict=True):
            assert torch.equal(a, b)


def test_cuda_convert_keeps_device():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
    bt.convert(model)
    assert type(model[1]) is bt.BatchNorm2d
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    assert model[1].weight.grad.device.type == "cuda"


def test_cuda_non_finite_batch_keeps_old_statistics_without_a_host_read():
    ours, theirs = bt.BatchNorm2d(3, device="cuda"), torch.nn.BatchNorm2d(3, device="cuda")
    good = torch.randn(4, 3, 2, 2, device="cuda")
    ours(good), theirs(good)
    bad = torch.randn(4, 3, 2, 2, device="cuda")
    bad[0, 2, 1, 1] = float("nan")
    bad.requires_grad_()
    before = {name: b.clone() for name, b in ours.named_buffers()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that waits for the GPU raises
    try:
        y = ours(bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ours.last_backend == "torch"
    y_theirs = theirs(bad)
    torch.testing.assert_close(y, y_theirs, equal_nan=True)
    # ATen's node saved the buffers the guard rewrote: its backward must still run.
    g_ours, g_theirs = (torch.autograd.grad(v, bad, torch.ones_like(v))[0] for v in (y, y_theirs))
    torch.testing.assert_close(g_ours, g_theirs, equal_nan=True)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(ours, name)[2], before[name][2])
        torch.testing.assert_close(getattr(ours, name)[:2], getattr(theirs, name)[:2])
    assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: bt.BatchNorm2d(4, device="cuda"),
        lambda: bt.BatchNorm2d(4, device="cuda", backend="triton"),
        lambda: bt.BatchNormReLU2d(4, device="cuda", backend="triton"),
        lambda: bt.BatchNormLeakyReLU2d(4, device="cuda", backend="triton", gamma_guard=0.0),
    ],
    ids=["auto", "triton", "relu-triton", "leaky-triton"],
)
def test_cuda_training_step_replays_from_a_cuda_graph(make):
    """A training step (forward, backward, running statistics) reads nothing on the host, so
    it can be captured in a CUDA graph (a host read raises during capture) and replayed: each
    replay on new data gives what an eager copy of the layer gives on the same data, step after
    step, running statistics and batch count included."""
    import copy

    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = make()
    static_x = torch.randn(8, 4, 6, 5, device="cuda", generator=gen, requires_grad=True)
    static_dy = torch.randn(8, 4, 6, 5, device="cuda", generator=gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles here
        for _ in range(3):
            layer(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(layer)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(static_dy)
    for _ in range(2):
        x = torch.randn(8, 4, 6, 5, device="cuda", generator=gen) * 2 + 1
        dy = torch.randn(8, 4, 6, 5, device="cuda", generator=gen)
        static_x.data.copy_(x)
        static_dy.copy_(dy)
        graph.replay()
        x_eager = x.clone().requires_grad_(True)
        y_eager = eager(x_eager)
        y_eager.backward(dy)
        torch.testing.assert_close(static_y, y_eager)
        torch.testing.assert_close(static_x.grad, x_eager.grad)
        for (name, a), b in zip(layer.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
