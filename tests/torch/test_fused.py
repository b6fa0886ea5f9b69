"""The fused BN+ReLU and BN+add+ReLU layers on every backend: agreement with PyTorch's unfused
ops (forward, backward, running statistics), float64 gradcheck, the saved ReLU mask, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_cases import require

from batchnorm.kernels import BackendUnavailable
from batchnorm.torch.fused import (
    BatchNormAddReLU2d,
    BatchNormReLU2d,
    batch_norm_add_relu,
    batch_norm_relu,
)

SHAPE = (4, 3, 5, 6)
#: float32 arithmetic, then rounding to the output dtype (half an ulp is 2^-11 relative for
#: float16, 2^-8 for bfloat16).
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}
STATS_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _close(a, b, **tol):
    torch.testing.assert_close(a.detach().double(), b.detach().double(), **tol)


def _pair(cls, backend, **kwargs):
    """Ours, and PyTorch's BatchNorm2d in float64 with the same parameters."""
    ours = cls(3, backend=backend, **kwargs)
    theirs = torch.nn.BatchNorm2d(3, **kwargs).double()
    if ours.affine:
        g = torch.Generator().manual_seed(20)
        weight, bias = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g) * 0.5
        with torch.no_grad():
            ours.weight.copy_(weight)
            ours.bias.copy_(bias)
            theirs.weight.copy_(weight.double())
            theirs.bias.copy_(bias.double())
    return ours, theirs


def _inputs(dtype, memory_format, seed, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    residual = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return [t.contiguous(memory_format=memory_format) for t in (x, residual, dy)]


def _step(ours, theirs, backend, add, dtype, memory_format, seed):
    """One forward + backward of both modules; compares outputs, gradients and buffers."""
    x, residual, dy = _inputs(dtype, memory_format, seed)
    require(backend, x)
    x.requires_grad_()
    residual.requires_grad_()
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, residual))
    y = ours(x, residual) if add else ours(x)
    z = theirs(x64)
    y_ref = torch.relu(z + r64 if add else z)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert ours.last_backend == f"{backend} (fused)"
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format)
    tol = TOL[dtype]
    _close(y, y_ref, **tol)
    _close(x.grad, x64.grad, **tol)
    if add:
        _close(residual.grad, r64.grad, **tol)
    else:
        assert residual.grad is None
    if ours.affine:
        _close(ours.weight.grad, theirs.weight.grad, **STATS_TOL)
        _close(ours.bias.grad, theirs.bias.grad, **STATS_TOL)
        ours.zero_grad()
        theirs.zero_grad()
    if ours.track_running_stats:
        _close(ours.running_mean, theirs.running_mean, **STATS_TOL)
        _close(ours.running_var, theirs.running_var, **STATS_TOL)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
@pytest.mark.parametrize("cls", [BatchNormReLU2d, BatchNormAddReLU2d])
def test_fused_module_matches_torch(backend, cls, memory_format):
    add = cls is BatchNormAddReLU2d
    ours, theirs = _pair(cls, backend)
    for seed in (30, 31):  # two training steps: the running statistics accumulate
        _step(ours, theirs, backend, add, torch.float32, memory_format, seed)
    ours.eval()
    theirs.eval()
    _step(ours, theirs, backend, add, torch.float32, memory_format, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_module_other_dtypes(backend, dtype):
    """Autocast-style 16-bit activations with float32 parameters, and float64 throughout."""
    ours, theirs = _pair(BatchNormAddReLU2d, backend)
    if dtype == torch.float64:
        ours.double()
    _step(ours, theirs, backend, True, dtype, torch.contiguous_format, 33)


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": None}, {"affine": False}, {"track_running_stats": False}],
    ids=["cumulative", "no_affine", "no_running_stats"],
)
def test_fused_module_options(backend, kwargs):
    ours, theirs = _pair(BatchNormReLU2d, backend, **kwargs)
    for seed in (34, 35):
        _step(ours, theirs, backend, False, torch.float32, torch.contiguous_format, seed)
    ours.eval()
    theirs.eval()
    _step(ours, theirs, backend, False, torch.float32, torch.contiguous_format, 36)


@pytest.mark.parametrize("shape", [(3, 2, 4, 5), (2, 3, 130, 1), (5, 2, 1, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gradcheck_float64(backend, shape, training):
    """The fused layers' backward (through the ReLU mask) against finite differences, with
    rows wider than a byte of the mask and shorter, in training and in eval."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    require(backend, x)
    residual = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64)
    running = (torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1]).double() + 0.5)

    def add_relu(x, r, w, b):
        return batch_norm_add_relu(x, r, *running, w, b, training=training, backend=backend)

    def relu(x, w, b):
        return batch_norm_relu(x, *running, w, b, training=training, backend=backend)

    args = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    # Keep the finite differences away from the ReLU's kink.
    assert torch.autograd.gradcheck(add_relu, args)
    assert torch.autograd.gradcheck(relu, [args[0], args[2], args[3]])


def test_fused_named_backend_that_cannot_run_raises_and_changes_nothing(backend):
    if backend != "triton":
        pytest.skip("only triton lacks a dtype (float64)")
    strict = BatchNormReLU2d(3, backend="triton").double()
    with pytest.raises(BackendUnavailable, match="float64"):
        strict(torch.randn(SHAPE, dtype=torch.float64))
    assert int(strict.num_batches_tracked) == 0
    assert torch.equal(strict.running_mean, torch.zeros(3, dtype=torch.float64))


def test_fused_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend"):
        BatchNormReLU2d(3, backend="cudnn")


def test_fused_bad_arguments_change_nothing(backend):
    module = BatchNormAddReLU2d(3, backend=backend)
    x, residual, _ = _inputs(torch.float32, torch.contiguous_format, 39)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 3, 5, 5\)"):
        module(x, residual[..., :5])
    with pytest.raises(TypeError, match="residual has dtype torch.float16"):
        module(x, residual.half())
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        module(x, 1.0)
    with pytest.raises(ValueError, match="expected 4D input"):
        module(x[0], residual[0])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(x[:1, :, :1, :1], residual[:1, :, :1, :1])
    with pytest.raises(ValueError, match=r"weight \(gamma\) must have shape \(3,\)"):
        batch_norm_relu(x, None, None, torch.ones(4), training=True, backend=backend)
    assert int(module.num_batches_tracked) == 0
    assert torch.equal(module.running_mean, torch.zeros(3))
    assert torch.equal(module.running_var, torch.ones(3))


def test_fused_functional_updates_buffers_in_place(backend):
    x, residual, _ = _inputs(torch.float32, torch.contiguous_format, 40)
    require(backend, x)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    rm_ref, rv_ref = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = batch_norm_add_relu(
        x, residual, running_mean, running_var, training=True, momentum=0.3, backend=backend
    )
    x64, r64 = x.double(), residual.double()
    y_ref = torch.relu(F.batch_norm(x64, rm_ref, rv_ref, training=True, momentum=0.3) + r64)
    _close(y, y_ref, **TOL[torch.float32])
    _close(running_mean, rm_ref, **STATS_TOL)
    _close(running_var, rv_ref, **STATS_TOL)
    y = batch_norm_relu(x, running_mean, running_var, backend=backend)  # eval
    _close(y, torch.relu(F.batch_norm(x64, rm_ref, rv_ref)), **TOL[torch.float32])


def _saved_bytes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


@pytest.mark.parametrize("shape", [(8, 16, 8, 8), (8, 16, 3, 3)], ids=["rows", "cols"])
def test_fused_saves_a_bit_mask_not_the_activation(backend, shape):
    """What autograd keeps between forward and backward: x, per-channel vectors and the mask
    (1 bit per element on the kernel backends; the reference keeps a boolean array). PyTorch's
    unfused sequence also keeps the ReLU's output."""
    module = BatchNormReLU2d(16, backend=backend)
    x = torch.randn(shape, requires_grad=True)
    require(backend, x)
    ours = _saved_bytes(lambda: module(x))
    assert module.last_backend == f"{backend} (fused)"
    x_bytes = x.numel() * x.element_size()
    mask_bytes = x.numel() if backend == "reference" else x.numel() // 8 + x.shape[0] * 16
    assert ours <= x_bytes + mask_bytes + 64 * 16
    torch_bn = torch.nn.BatchNorm2d(16)
    assert _saved_bytes(lambda: torch.relu(torch_bn(x))) >= 2 * x_bytes


def test_fused_module_is_batch_norm_but_not_batch_norm_2d(backend):
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(SHAPE))
    fused = BatchNormReLU2d.from_batch_norm(bn, backend=backend)
    assert fused.weight is bn.weight and fused.running_mean is bn.running_mean
    assert isinstance(fused, torch.nn.modules.batchnorm._BatchNorm)
    # conv-bn folding code matches BatchNorm2d: it must not fold away the ReLU.
    assert not isinstance(fused, torch.nn.BatchNorm2d)
    fresh = BatchNormReLU2d(3, backend=backend)
    fresh.load_state_dict(bn.state_dict())
    fresh.eval()
    bn.eval()
    x = torch.randn(SHAPE)
    require(backend, x)
    _close(fresh(x), torch.relu(bn(x)), **TOL[torch.float32])


def test_fused_empty_batch_answers_as_torch(backend):
    x = torch.randn(0, 3, 4, 4)
    y = BatchNormReLU2d(3, backend=backend)(x)
    assert y.shape == x.shape


def test_auto_runs_the_numba_fused_kernels_on_a_large_cpu_tensor(monkeypatch):
    """What a CPU user gets by default above PyTorch's-kernel size (``native.NATIVE_BELOW``,
    lowered here to keep the tensor small): the Numba kernels, fused, with a 1-bit mask."""
    pytest.importorskip("numba")
    from batchnorm.torch import native

    monkeypatch.setattr(native, "NATIVE_BELOW", {"cpu": (16**4, 16**4)})
    module = BatchNormAddReLU2d(16)
    x = torch.randn(16, 16, 16, 16, requires_grad=True)
    residual = torch.randn_like(x)
    saved = _saved_bytes(lambda: module(x, residual))
    assert module.last_backend == "numba (fused)"
    assert saved <= x.numel() * 4 + x.numel() // 8 + 16 * 16 + 64 * 16


def test_fused_relu_passes_nan_and_its_gradient_as_torch(backend):
    """torch.relu(nan) is nan and passes its gradient; the fused layers must agree."""
    x, residual, _ = _inputs(torch.float32, torch.contiguous_format, 42)
    require(backend, x)
    x[:, 1, 0, 0] = float("nan")  # channel 1's statistics, and so its outputs, are NaN
    x.requires_grad_()
    residual.requires_grad_()
    y = batch_norm_add_relu(x, residual, None, None, training=True, backend=backend)
    y.sum().backward()
    x64, r64 = (t.detach().double().requires_grad_() for t in (x, residual))
    y_ref = torch.relu(F.batch_norm(x64, None, None, training=True) + r64)
    y_ref.sum().backward()
    assert torch.equal(y.isnan(), y_ref.isnan())
    torch.testing.assert_close(residual.grad.double(), r64.grad, rtol=0, atol=0)
