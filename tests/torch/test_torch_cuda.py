"""The same drop-in promises on a CUDA device (skipped without one): whatever ``"auto"`` picks
there (PyTorch's kernel, ``native.NATIVE_BELOW``) and the Triton stages must agree with
PyTorch's layer and keep the memory format; a non-finite batch stays out of the running
statistics without a host read; ``convert`` keeps the device."""

from __future__ import annotations

import pytest
import torch

import batchnorm.torch as bt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_module_matches_torch(layout, dtype, backend):
    """Against PyTorch's layer in float64 on the same values, each step from the same state."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, device="cuda", dtype=torch.float64)
    ours = bt.BatchNorm2d(4, device="cuda", backend=backend)
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
        y_ours, y_theirs = ours(x), theirs(x.double())
        assert y_ours.dtype == dtype and y_ours.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y_ours, y_theirs.to(dtype))
        g_ours = torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), dy)
        g_theirs = torch.autograd.grad(y_theirs, (x, theirs.weight, theirs.bias), dy)
        assert g_ours[0].is_contiguous(memory_format=fmt)
        for a, b in zip(g_ours, g_theirs, strict=True):
            torch.testing.assert_close(a, b.to(a.dtype))
        for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
            torch.testing.assert_close(a, b.to(a.dtype))
        if backend == "triton":
            assert ours.last_backend == "triton"
        elif layout == "contiguous" or dtype == torch.float32:
            assert ours.last_backend == "torch", bt.explain_backend(x, training=training)


def test_cuda_convert_keeps_device():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
    bt.convert(model)
    assert type(model[1]) is bt.BatchNorm2d
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    assert model[1].weight.grad.device.type == "cuda"


def test_cuda_non_finite_batch_keeps_old_statistics_without_a_host_read(monkeypatch):
    ours, theirs = bt.BatchNorm2d(3, device="cuda"), torch.nn.BatchNorm2d(3, device="cuda")
    good = torch.randn(4, 3, 2, 2, device="cuda")
    ours(good), theirs(good)
    bad = torch.randn(4, 3, 2, 2, device="cuda")
    bad[0, 2, 1, 1] = float("nan")
    bad.requires_grad_()
    before = {name: b.clone() for name, b in ours.named_buffers()}

    def no_host_read(*args, **kwargs):
        raise AssertionError("the guard read a value on the host")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_host_read)
        m.setattr(torch.Tensor, "__bool__", no_host_read)
        m.setattr(torch.Tensor, "__float__", no_host_read)
        y = ours(bad)
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
