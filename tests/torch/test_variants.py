"""Ghost batch norm and Batch Renormalization against their papers' definitions, written here
with torch.nn.functional.batch_norm and float64 autograd as the oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_cases import require

from batchnorm.reference.variants import ghost_groups, renorm_limits
from batchnorm.torch import accumulate_stats
from batchnorm.torch.variants import (
    PAPER_SCHEDULE,
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)

F64 = torch.float64


def _x(shape, seed=0, scale=2.0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale + shift).requires_grad_()


def _affine(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=g))
    return layer


# ------------------------------------------------------------------------------------ ghost


@pytest.mark.parametrize(
    ("n", "vbs", "chunks"),
    [(12, 4, [4, 4, 4]), (10, 4, [4, 4, 2]), (9, 4, [4, 5]), (3, 4, [3])],
    ids=["even", "remainder", "remainder-of-one-joins", "smaller-than-vbs"],
)
def test_ghost_equals_batch_norm_chunk_by_chunk(backend, n, vbs, chunks):
    # (N, C) input: a remainder of one sample has one value per channel and must join.
    x = _x((n, 3))
    require(backend, x)
    layer = _affine(GhostBatchNorm1d(3, vbs, backend=backend).double())
    y = layer(x)
    want = torch.cat(
        [
            F.batch_norm(c, None, None, layer.weight, layer.bias, training=True)
            for c in x.split(chunks)
        ]  # fmt: skip
    )
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    expected = torch.autograd.grad(want, (x, layer.weight, layer.bias), dy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Running statistics: one update with the whole batch's statistics.
    whole = torch.nn.BatchNorm1d(3).double()
    whole(x.detach())
    torch.testing.assert_close(layer.running_mean, whole.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, whole.running_var, rtol=0, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1


def test_ghost_2d_channels_last_and_gradcheck(backend):
    x = _x((7, 2, 3, 2)).detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    require(backend, x)
    layer = _affine(GhostBatchNorm2d(2, 3, backend=backend).double())
    y = layer(x)
    want = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, training=True)
                      for c in x.split([3, 3, 1])])  # fmt: skip
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_ghost_eval_uses_running_statistics():
    layer = _affine(GhostBatchNorm1d(3, 2).double())
    layer(_x((8, 3)))
    layer.eval()
    x = _x((5, 3), seed=1)
    want = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)


def test_ghost_groups_and_bad_virtual_batch_size():
    assert ghost_groups(10, 4, 1) == [4, 4, 2]
    assert ghost_groups(9, 4, 1) == [4, 5]
    assert ghost_groups(9, 4, 6) == [4, 4, 1]  # one sample of 6 values is a batch
    with pytest.raises(ValueError, match="virtual_batch_size must be at least 2, got 1"):
        GhostBatchNorm1d(3, 1)
    with pytest.raises(TypeError, match="virtual_batch_size must be an int"):
        GhostBatchNorm1d(3, 2.5)
    layer = GhostBatchNorm1d(3, 2)
    with pytest.raises(ValueError, match=r"weight \(gamma\)|shape"):
        layer(torch.randn(4, 4))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(3))


# ----------------------------------------------------------------------------------- renorm


def test_renorm_without_room_to_correct_is_batch_norm(backend):
    x = _x((8, 3, 5))
    require(backend, x)
    layer = _affine(BatchRenorm1d(3, r_max=1.0, d_max=0.0, backend=backend).double())
    with torch.no_grad():
        layer.running_mean.fill_(3.0)  # far from the batch: only the clipping keeps r = 1, d = 0
        layer.running_var.fill_(9.0)
    y = layer(x)
    want = F.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    expected = torch.autograd.grad(want, (x, layer.weight, layer.bias), dy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _renorm_oracle(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """The paper's Algorithm 1 in torch ops, r and d detached (stop_gradient)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + eps).sqrt()
    sigma = (running_var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mean.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return weight.view(shape) * x_hat + bias.view(shape), r, d


def test_renorm_with_clipping_active_matches_the_paper(backend):
    x = _x((6, 3, 4), scale=3.0, shift=2.0)
    require(backend, x)
    layer = _affine(BatchRenorm1d(3, r_max=1.5, d_max=0.5, momentum=0.1, backend=backend).double())
    running_mean = torch.tensor([0.0, 2.5, 10.0], dtype=F64)
    running_var = torch.tensor([1.0, 9.0, 100.0], dtype=F64)
    with torch.no_grad():
        layer.running_mean.copy_(running_mean)
        layer.running_var.copy_(running_var)
    want, r, d = _renorm_oracle(x, layer.weight, layer.bias, running_mean, running_var,
                                layer.eps, 1.5, 0.5)  # fmt: skip
    assert (r == 1.5).any() or (r == 1 / 1.5).any()  # clipping is active somewhere
    assert (d.abs() == 0.5).any()
    y = layer(x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    expected = torch.autograd.grad(want, (x, layer.weight, layer.bias), dy)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # Moving averages of mu and sigma (eps inside), stored as sigma**2 - eps.
    dims = [0, 2]
    mean, var = x.detach().mean(dims), x.detach().var(dims, unbiased=False)
    sigma = (running_var + layer.eps).sqrt() + 0.1 * (
        (var + layer.eps).sqrt() - (running_var + layer.eps).sqrt()
    )
    torch.testing.assert_close(layer.running_mean, running_mean + 0.1 * (mean - running_mean),
                               rtol=0, atol=1e-12)  # fmt: skip
    torch.testing.assert_close(layer.running_var, sigma**2 - layer.eps, rtol=0, atol=1e-12)


def test_renorm_gradient_by_finite_differences_with_r_and_d_fixed():
    x = _x((5, 2, 3), scale=3.0)
    layer = _affine(BatchRenorm1d(2, r_max=1.2, d_max=0.3, backend="reference").double())
    with torch.no_grad():
        layer.running_var.fill_(4.0)
        layer.running_mean.fill_(1.0)
    _, r, d = _renorm_oracle(x, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                             layer.eps, 1.2, 0.3)  # fmt: skip
    dims, shape = [0, 2], [1, -1, 1]

    def fixed(t):  # the function whose derivative the paper's backward is: r, d constants
        mean = t.mean(dims).view(shape)
        sigma_b = (t.var(dims, unbiased=False) + layer.eps).sqrt().view(shape)
        return layer.weight.view(shape) * ((t - mean) / sigma_b * r.view(shape) + d.view(shape))

    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    dy = torch.randn(x.shape, dtype=F64)
    dx = torch.autograd.grad(layer(x), x, dy)[0]
    layer.load_state_dict(snapshot)
    eps = 1e-6
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = eps
        e = e.view_as(x)
        fd = ((fixed(x + e) - fixed(x - e)) * dy).sum() / (2 * eps)
        assert abs(fd.item() - dx.view(-1)[i].item()) < 1e-7


def test_renorm_schedule_and_state_dict_keep_the_step():
    assert renorm_limits(10, **PAPER_SCHEDULE) == (1.0, 0.0)
    r, d = renorm_limits(5000 + 17500, **PAPER_SCHEDULE)
    assert r == pytest.approx(1 + 2 * 17500 / 35000) and d == pytest.approx(5 * 17500 / 20000)
    assert renorm_limits(50000, **PAPER_SCHEDULE) == (3.0, 5.0)
    layer = BatchRenorm1d(3, **{**PAPER_SCHEDULE, "warmup": 2, "r_max_at": 4, "d_max_at": 3})
    for _ in range(3):
        layer(torch.randn(8, 3))
    fresh = BatchRenorm1d(3, **{**PAPER_SCHEDULE, "warmup": 2, "r_max_at": 4, "d_max_at": 3})
    fresh.load_state_dict(layer.state_dict())
    assert int(fresh.num_batches_tracked) == 3 and fresh.limits() == layer.limits() == (2.0, 5.0)


def test_renorm_half_precision_and_accumulation():
    layer = BatchRenorm1d(3, r_max=2.0, d_max=1.0)
    x = (torch.randn(16, 3) * 4 + 3).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    layer = BatchRenorm1d(3).double()
    whole = BatchRenorm1d(3).double()
    xs = [torch.randn(4, 3, dtype=F64) + 1 for _ in range(3)]
    with accumulate_stats(layer):
        for part in xs:
            layer(part)
    whole(torch.cat(xs))  # the same moving averages from the whole batch's statistics
    torch.testing.assert_close(layer.running_var, whole.running_var, rtol=0, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r_max": 0.5}, ValueError, "r_max must be >= 1"),
        ({"d_max": -1.0}, ValueError, "d_max must be >= 0"),
        ({"r_max": "3"}, TypeError, "r_max must be a real number"),
        ({"momentum": None}, ValueError, "float momentum"),
        ({"warmup": -1}, ValueError, "warmup must be a non-negative int"),
        ({"track_running_stats": False}, ValueError, "needs them"),
    ],
)
def test_renorm_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchRenorm2d(3, **kwargs)


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("r_max", 0.5, ValueError, "r_max must be >= 1"),
        ("d_max", -1.0, ValueError, "d_max must be >= 0"),
        ("warmup", -2, ValueError, "warmup must be a non-negative int"),
        ("momentum", None, ValueError, "need a float momentum, not None"),
    ],
)
def test_renorm_settings_changed_after_construction_are_checked_at_the_call(
    name, value, error, match
):
    """The constructor refuses r_max = 0.5; set afterwards, it once scaled every output by 0.5
    without a word. Checked at each training call, as momentum and eps are, before any
    state changes."""
    layer = BatchRenorm2d(3)
    setattr(layer, name, value)
    with pytest.raises(error, match=match):
        layer(torch.randn(4, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(3))


def test_renorm_bad_input_changes_nothing():
    layer = BatchRenorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        layer(torch.randn(2, 3, 4, 5))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [True, False])
def test_ghost_empty_batch_as_torch_nn(training):
    """An empty batch raised "virtual batches of [0] sample(s)"; torch.nn's layers (and ours,
    and Batch Renorm) return an empty output and count the batch in training."""
    ghost, peer = GhostBatchNorm2d(3, 2).train(training), torch.nn.BatchNorm2d(3).train(training)
    x = torch.randn(0, 3, 4, 4)
    y = ghost(x)
    assert y.shape == peer(x).shape == (0, 3, 4, 4)
    assert int(ghost.num_batches_tracked) == int(peer.num_batches_tracked)


def test_ghost_virtual_batch_size_set_after_construction_is_checked():
    ghost = GhostBatchNorm2d(3, 2)
    ghost.virtual_batch_size = 0
    with pytest.raises(ValueError, match="virtual"):
        ghost(torch.randn(4, 3, 2, 2))
    assert int(ghost.num_batches_tracked) == 0
