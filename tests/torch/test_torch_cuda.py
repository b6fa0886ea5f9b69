"""The same drop-in promises on a CUDA device (skipped without one): whatever ``"auto"`` picks
there must agree with PyTorch's layer, keep the memory format, and ``convert`` keeps the
device."""

from __future__ import annotations

import pytest

import batchnorm.torch as bt
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_module_matches_torch(layout, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, device="cuda")
    ours = bt.BatchNorm2d(4, device="cuda")
    ours.load_state_dict(theirs.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(8, 4, 6, 5, device="cuda", generator=gen).to(dtype)
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        dy = torch.randn(x.shape, device="cuda", generator=gen).to(dtype)
        y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y_ours, y_theirs)
        g_ours = torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), dy)
        g_theirs = torch.autograd.grad(y_theirs, (x, theirs.weight, theirs.bias), dy)
        assert g_ours[0].is_contiguous(memory_format=fmt)
        if not (dtype == torch.float16 and layout == "channels_last"):
            torch.testing.assert_close(g_ours[0], g_theirs[0])
        for a, b in zip(g_ours[1:], g_theirs[1:], strict=True):
            torch.testing.assert_close(a, b)
        for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
            torch.testing.assert_close(a, b)
        assert ours.last_backend is not None


def test_cuda_convert_keeps_device():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).cuda()
    bt.convert(model)
    assert type(model[1]) is bt.BatchNorm2d
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    assert model[1].weight.grad.device.type == "cuda"
