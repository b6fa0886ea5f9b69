"""The Triton kernels' fused variants (batch norm + ReLU, + residual add + ReLU, the 1-bit ReLU
mask) against PyTorch in float64, on small shapes; moved out of ``test_triton.py``, whose
inputs, tolerances and interpreter set-up they share (importing it sets ``TRITON_INTERPRET=1``
before triton's first import, or skips this module with it).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_triton import (
    DTYPES,
    EPS,
    SMALL_TILES,
    STATS_TOL,
    TOL,
    _close,
    _f64,
    _input,
    _like,
    _memory_rows,
    _params,
    tg,
)

from batchnorm import reference as ref

# ----------------------------------------------------------------------------- fused variants


def _fused_reference(x, weight, bias, residual, dy, *, training, running=None):
    """relu(batch_norm(x) [+ residual]) and its gradients, by PyTorch in float64 (autograd)."""
    x64, w64, b64, r64, dy64 = (
        None if t is None else t.requires_grad_() for t in _f64(x, weight, bias, residual, dy)
    )
    rm64, rv64 = _f64(*running) if running is not None else (None, None)
    z = F.batch_norm(x64, rm64, rv64, w64, b64, training=training, eps=EPS)
    pre = z if r64 is None else z + r64
    y = torch.relu(pre)
    inputs = [t for t in (x64, w64, b64, r64) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy64)
    return y.detach(), pre.detach(), grads


def _unpack_mask(mask: torch.Tensor, outer: int, channels: int, inner: int) -> torch.Tensor:
    """The documented bit layout, decoded with torch ops: (outer, C, inner) booleans."""
    bit = torch.arange(8, device=mask.device)
    if inner >= 8:  # packed along inner: bytes (outer, C, ceil(inner / 8)), bit i % 8
        bits = (mask.reshape(outer, channels, -1, 1).long() >> bit) & 1
        return bits.reshape(outer, channels, -1)[..., :inner].bool()
    bytes_ = mask.reshape(-1, 1, channels, inner).long()  # bytes (ceil(outer/8), C, inner)
    bits = (bytes_ >> bit.reshape(1, 8, 1, 1)) & 1
    return bits.reshape(-1, channels, inner)[:outer].bool()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "ncl_inner5", "nc"])
@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
def test_fused_train_matches_torch(layout, dtype, add):
    x, axis = _input(layout, dtype, shift=0.3)
    dy = _like(x, seed=12)
    residual = _like(x, seed=13) if add else None
    weight, bias = _params(x.shape[axis])
    with tg.tuning(**SMALL_TILES):
        y, mean, var, invstd, mask = tg.forward_train(
            x, weight, bias, EPS, axis, residual=residual, relu=True
        )
        dx, dweight, dbias, dresidual = tg.backward_train(
            dy, x, mean, invstd, weight, axis, mask=mask, residual_grad=add
        )
    y_ref, pre_ref, grads = _fused_reference(x, weight, bias, residual, dy, training=True)
    _close(y, y_ref, **TOL[dtype])
    _close(dx, grads[0], **TOL[dtype])
    _close(dweight, grads[1], **STATS_TOL)
    _close(dbias, grads[2], **STATS_TOL)
    if add:
        _close(dresidual, grads[3], **TOL[dtype])
    else:
        assert dresidual is None
    # The mask: one bit per element (plus padding to whole bytes), set where the ReLU passed.
    outer, channels, inner = _memory_rows(x, axis).shape
    assert mask.dtype == torch.uint8
    assert mask.numel() <= math.ceil(outer / 8) * channels * inner + outer * channels
    passed = _unpack_mask(mask, outer, channels, inner).cpu()
    assert torch.equal(passed, _memory_rows(pre_ref > 0, axis))


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_eval_matches_torch(layout, add):
    """Eval mode: the moments are the running statistics, constants for the gradient."""
    x, axis = _input(layout, torch.float32, shift=0.3)
    dy = _like(x, seed=14)
    residual = _like(x, seed=15) if add else None
    weight, bias = _params(x.shape[axis])
    running_mean, running_var = _params(x.shape[axis], seed=16)
    running_var = running_var.abs() + 0.5
    invstd = ref.inverse_std(running_var, EPS)
    with tg.tuning(**SMALL_TILES):
        y, mask = tg.elemt(
            x, running_mean, invstd, weight, bias, axis, residual=residual, relu=True
        )
        dx, dweight, dbias, dresidual = tg.backward_train(
            dy, x, running_mean, invstd, weight, axis, mask=mask,
            through_mean=False, through_var=False, residual_grad=add,
        )  # fmt: skip
    y_ref, _, grads = _fused_reference(
        x, weight, bias, residual, dy, training=False, running=(running_mean, running_var)
    )
    _close(y, y_ref, **TOL[torch.float32])
    _close(dx, grads[0], **TOL[torch.float32])
    _close(dweight, grads[1], **STATS_TOL)
    _close(dbias, grads[2], **STATS_TOL)
    if add:
        _close(dresidual, grads[3], **TOL[torch.float32])


def test_relu_propagates_nan_like_torch():
    x, axis = _input("nchw", torch.float32)
    residual = torch.zeros_like(x)
    residual[0, 0, 0, 0] = float("nan")
    y, mean, _, invstd, mask = tg.forward_train(
        x, None, None, EPS, axis, residual=residual, relu=True
    )
    assert torch.isnan(y[0, 0, 0, 0]) and not torch.isnan(y[0, 0, 0, 1:]).any()
    zeros = torch.zeros_like(mean)
    dresidual = tg.backward_elemt(
        torch.ones_like(x), x, mean, invstd, None, zeros, zeros, 1, axis,
        mask=mask, residual_grad=True,
    )[1]  # fmt: skip
    assert dresidual[0, 0, 0, 0] == 1  # torch.relu's backward passes the gradient at NaN
