"""Masked batch norm: equal to ordinary batch norm applied to the real positions only (float64
1e-12), whatever the padding holds or how long it is, on every backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_cases import require

import batchnorm.torch as bt

F64 = torch.float64


def _batch(n=4, c=3, length=9, seed=0, pad_value=float("nan")):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=F64) * 2 + 1
    lengths = torch.tensor([length, 5, 1, 7][:n])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = x.masked_fill(~mask[:, None, :], pad_value)  # what the padding holds must not matter
    return x.requires_grad_(), mask


def _layer(backend, **kwargs):
    layer = bt.BatchNorm1d(3, backend=backend, **kwargs).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(3, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(3, generator=g))
    return layer


def _real(t, mask):
    return t.transpose(1, 2)[mask]  # (n_real, C)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batch_norm_of_the_real_positions(backend, momentum):
    x, mask = _batch()
    require(backend, x)
    ours, theirs = _layer(backend, momentum=momentum), torch.nn.BatchNorm1d(3, momentum=momentum)
    theirs = theirs.double()
    theirs.load_state_dict(ours.state_dict())
    for step in range(2):
        y = ours(x, mask=mask)
        real = _real(x, mask).detach().requires_grad_()
        want = theirs(real)
        torch.testing.assert_close(_real(y, mask), want, rtol=0, atol=1e-12)
        assert torch.equal(_real(y, ~mask), torch.zeros_like(_real(y, ~mask)))
        dy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(step))
        got = torch.autograd.grad(y, (x, ours.weight, ours.bias), dy)
        expected = torch.autograd.grad(want, (real, theirs.weight, theirs.bias), _real(dy, mask))
        torch.testing.assert_close(_real(got[0], mask), expected[0], rtol=0, atol=1e-12)
        assert torch.equal(_real(got[0], ~mask), torch.zeros_like(_real(got[0], ~mask)))
        for a, b in zip(got[1:], expected[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0,
                                       atol=1e-12)  # fmt: skip


def test_padding_length_and_content_change_nothing(backend):
    x, mask = _batch()
    require(backend, x)
    longer = torch.cat([x.detach(), torch.full((4, 3, 6), 1e30, dtype=F64)], 2)
    longer_mask = torch.cat([mask, torch.zeros(4, 6, dtype=torch.bool)], 1)
    a, b = _layer(backend), _layer(backend)
    ya, yb = a(x, mask=mask), b(longer, mask=longer_mask)
    torch.testing.assert_close(_real(ya, mask), _real(yb, longer_mask), rtol=0, atol=0)
    assert torch.equal(a.running_var, b.running_var)


def test_gradcheck_and_channels_last_sequences(backend):
    x, mask = _batch(pad_value=0.0)
    require(backend, x)
    layer = _layer(backend)
    assert torch.autograd.gradcheck(lambda t: layer(t, mask=mask), (x,))
    # A sequence model's (N, L, C) activations: a transposed view, output in the same layout.
    nlc = x.detach().transpose(1, 2).contiguous()
    y = _layer(backend)(nlc.transpose(1, 2), mask=mask)
    torch.testing.assert_close(y, _layer(backend)(x.detach(), mask=mask), rtol=0, atol=1e-12)
    assert y.transpose(1, 2).is_contiguous()


def test_fully_masked_rows_and_all_but_one(backend):
    x, mask = _batch()
    require(backend, x)
    mask[1] = False  # a whole sequence of padding
    layer = _layer(backend)
    y = layer(x, mask=mask)
    want = F.batch_norm(_real(x, mask), None, None, layer.weight, layer.bias, training=True)
    torch.testing.assert_close(_real(y, mask), want, rtol=0, atol=1e-12)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    only_one = torch.zeros_like(mask)
    only_one[0, 0] = True  # one real value per channel: training refuses it, as plain BN
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(x, mask=only_one)
    two = only_one.clone()
    two[3, 6] = True
    y = layer(x, mask=two)
    assert torch.isfinite(y).all()


def test_eval_uses_running_statistics_at_real_positions(backend):
    x, mask = _batch()
    require(backend, x)
    layer = _layer(backend)
    layer(x, mask=mask)
    layer.eval()
    y = layer(x, mask=mask)
    want = F.batch_norm(_real(x, mask), layer.running_mean, layer.running_var, layer.weight,
                        layer.bias)  # fmt: skip
    torch.testing.assert_close(_real(y, mask), want, rtol=0, atol=1e-12)


def test_functional_and_sync_single_process(backend):
    x, mask = _batch()
    require(backend, x)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    y = bt.batch_norm(x, rm, rv, training=True, backend=backend, mask=mask)
    want = F.batch_norm(_real(x, mask), None, None, training=True)
    torch.testing.assert_close(_real(y, mask), want, rtol=0, atol=1e-12)
    sync = bt.SyncBatchNorm(3, backend=backend).double()  # no process group: the local path
    torch.testing.assert_close(sync(x, mask=mask), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(sync.running_var, rv, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (
            torch.ones(4, 8, dtype=torch.bool),
            ValueError,
            r"shape without the channel axis, \(4, 9\)",
        ),
        (torch.ones(4, 9), TypeError, "dtype torch.bool"),
        ([[True] * 9] * 4, TypeError, "torch.Tensor of booleans"),
    ],
)
def test_bad_mask_changes_nothing(mask, error, match):
    x, _ = _batch()
    layer = _layer("reference")
    with pytest.raises(error, match=match):
        layer(x, mask=mask)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=F64))


def test_float32_on_every_backend(backend):
    x, mask = _batch(pad_value=float("inf"))
    x = x.detach().float().requires_grad_()
    require(backend, x)
    layer = bt.BatchNorm1d(3, backend=backend)
    y = layer(x, mask=mask)
    assert layer.last_backend == backend
    real = _real(x, mask).detach().double()
    want = F.batch_norm(real, None, None, training=True)
    torch.testing.assert_close(_real(y, mask).double(), want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.equal(_real(x.grad, ~mask), torch.zeros_like(_real(x.grad, ~mask)))


def _compaction_only(monkeypatch, backend, x):
    """Make ``backend`` look as if it had no masked stages: the layers then gather."""
    from batchnorm.kernels import get_backend

    monkeypatch.setattr(get_backend(backend, x), "supports_mask", False, raising=False)


def _spy_masked_calls(monkeypatch, backend, x):
    """Record the stages called with ``mask=`` on ``backend``."""
    from batchnorm.kernels import get_backend

    stages, calls = get_backend(backend, x), []
    for name in ("batch_stats", "elemt", "backward_reduce", "backward_elemt"):
        original = getattr(stages, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            if kwargs.get("mask") is not None:
                calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(stages, name, spy, raising=False)
    return calls


def _train_two_steps(backend, x, mask, nlc=False, **kwargs):
    layer = _layer(backend, **kwargs).to(x.dtype)
    x = x.detach().requires_grad_()
    inp = x.transpose(1, 2).contiguous().transpose(1, 2) if nlc else x
    outs = []
    for step in range(2):
        y = layer(inp, mask=mask)
        dy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(step))
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        outs += [y, *grads]
    return outs + [layer.running_mean, layer.running_var]


@pytest.mark.parametrize("nlc", [False, True], ids=["ncl", "nlc"])
@pytest.mark.parametrize("switches", [{}, {"through_mean": False}, {"through_var": False}])
def test_native_masked_stages_equal_the_compaction_path(backend, monkeypatch, nlc, switches):
    """Forward, gradients, running statistics: the backend's masked stages (which must run)
    against the gather of the real positions through its plain ones."""
    x, mask = _batch()
    require(backend, x)
    calls = _spy_masked_calls(monkeypatch, backend, x)
    assert "masked: native" in bt.explain_backend(x, backend, mask=mask)
    native = _train_two_steps(backend, x, mask, nlc, **switches)
    assert {"batch_stats", "elemt", "backward_reduce", "backward_elemt"} <= set(calls)
    _compaction_only(monkeypatch, backend, x)
    calls.clear()
    assert "masked: compaction" in bt.explain_backend(x, backend, mask=mask)
    gathered = _train_two_steps(backend, x, mask, nlc, **switches)
    assert calls == []
    for a, b in zip(native, gathered, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_fully_padded_batch_behaves_as_an_empty_one(backend):
    """No real position in training: 0 output, running statistics untouched, the batch
    counted (as the gather path's empty batch always did)."""
    x, mask = _batch()
    require(backend, x)
    layer = _layer(backend)
    y = layer(x, mask=torch.zeros_like(mask))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=F64))
    assert int(layer.num_batches_tracked) == 1
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_double_backward_and_forward_mode_with_a_mask(backend):
    x, mask = _batch(pad_value=0.0)
    require(backend, x)
    layer = _layer(backend)
    # Second derivatives of the native path against finite differences of its gradient.
    assert torch.autograd.gradgradcheck(lambda t: layer(t, mask=mask), (x,))
    # Forward mode runs the gather path; its tangent equals the reverse-mode Jacobian's.
    tangent = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    layer = _layer(backend, track_running_stats=False)  # torch.func refuses buffer updates
    _, jvp = torch.func.jvp(lambda t: layer(t, mask=mask), (x.detach(),), (tangent,))
    y = layer(x, mask=mask)
    probe = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    (vjp,) = torch.autograd.grad(y, x, probe)
    torch.testing.assert_close((jvp * probe).sum(), (vjp * tangent).sum(), rtol=1e-10, atol=1e-10)


def test_native_masked_float32_equals_the_compaction_path(backend, monkeypatch):
    """float32 on every backend (Triton included: the float64 tests skip it)."""
    x, mask = _batch(pad_value=float("inf"))
    x = x.detach().float()
    require(backend, x)
    calls = _spy_masked_calls(monkeypatch, backend, x)
    native = _train_two_steps(backend, x, mask)
    assert "backward_elemt" in calls
    _compaction_only(monkeypatch, backend, x)
    gathered = _train_two_steps(backend, x, mask)
    for a, b in zip(native, gathered, strict=True):
        torch.testing.assert_close(a, b)  # float32's default tolerances
