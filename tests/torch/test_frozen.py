"""Frozen batch norm (``frozen.py``): PyTorch's own layers in eval mode are the oracle.

A frozen layer must compute eval-mode batch norm (eps inside the square root) whatever
``model.train()`` says, never move a buffer, pass gradients to the input (and to the affine only
when asked), load and give state dicts that ``torch.nn.BatchNorm2d`` and torchvision-style
frozen layers understand, and ``freeze``/``unfreeze`` must swap whole models, refusing before
any change what they cannot freeze faithfully.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch_cases import require

import batchnorm.torch as bt

F64 = torch.float64


def _trained(layer: torch.nn.Module, channels: int, shape: tuple[int, ...]) -> torch.nn.Module:
    """``layer`` with non-trivial statistics and affine (a few training steps, then a random
    affine), so that no test passes on mean 0 / variance 1 / weight 1 / bias 0."""
    gen = torch.Generator().manual_seed(channels)
    layer.train()
    for _ in range(3):
        layer(torch.randn(shape, generator=gen, dtype=F64) * 3 + 2)
    if getattr(layer, "weight", None) is not None:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(channels, generator=gen, dtype=F64) + 0.5)
            layer.bias.copy_(torch.randn(channels, generator=gen, dtype=F64))
    return layer.eval()


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def _assert_bitwise(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


CASES = [
    # (frozen class, torch class, input shape, memory format)
    (bt.FrozenBatchNorm1d, torch.nn.BatchNorm1d, (6, 3), None),
    (bt.FrozenBatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5), None),
    (bt.FrozenBatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6), None),
    (bt.FrozenBatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6), torch.channels_last),
    (bt.FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 5), None),
    (bt.FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 3, 4, 5), torch.channels_last_3d),
    (bt.FrozenBatchNorm, torch.nn.BatchNorm2d, (4, 3, 5, 6), None),
]


@pytest.mark.parametrize("eps", [1e-5, 0.5, 0.0])
@pytest.mark.parametrize(("frozen_cls", "torch_cls", "shape", "memory_format"), CASES)
def test_output_equals_eval_mode_torch(frozen_cls, torch_cls, shape, memory_format, eps, backend):
    require(backend, torch.zeros(2, 3, dtype=F64))  # float64 throughout: not every backend
    # eps = 0.5 is large next to the running variances (~9): eps outside the sqrt would fail.
    bn = _trained(torch_cls(3, dtype=F64), 3, shape)
    bn.eps = eps  # after training: PyTorch refuses eps = 0 there, eval accepts it
    frozen = frozen_cls.from_batch_norm(bn)
    frozen.backend = backend
    frozen.train()  # must not matter
    x = torch.randn(shape, dtype=F64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    y = frozen(x)
    torch.testing.assert_close(y, bn(x), rtol=0, atol=1e-12)
    assert frozen.last_backend == backend


def test_affine_false_source_is_weight_one_bias_zero():
    bn = _trained(torch.nn.BatchNorm2d(3, affine=False, dtype=F64), 3, (4, 3, 2, 2))
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(bn)
    assert torch.equal(frozen.weight, torch.ones(3, dtype=F64))
    assert torch.equal(frozen.bias, torch.zeros(3, dtype=F64))
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=1e-12)


def test_from_batch_norm_copies_and_keeps_dtype():
    bn = _trained(bt.BatchNorm2d(3, momentum=0.3, dtype=F64, backend="reference"), 3, (4, 3, 2, 2))
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(bn)
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        ours, theirs = getattr(frozen, name), getattr(bn, name)
        assert torch.equal(ours, theirs), name
        assert ours.dtype == theirs.dtype and ours.device == theirs.device, name
        assert ours.data_ptr() != theirs.data_ptr(), f"{name} is shared, not copied"
    assert frozen.backend == "reference" and frozen.eps == bn.eps
    assert int(frozen.num_batches_tracked) == 3
    # The source goes on training without touching the frozen copy.
    before = _buffers(frozen)
    bn.train()(torch.randn(4, 3, 2, 2, dtype=F64))
    _assert_bitwise(before, _buffers(frozen))


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_train_mode_changes_nothing(trainable_affine):
    bn = _trained(torch.nn.BatchNorm2d(3, dtype=F64), 3, (4, 3, 5, 5))
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(bn, trainable_affine=trainable_affine)
    probe = torch.randn(4, 3, 5, 5, dtype=F64)
    expected = frozen.eval()(probe).detach()
    before = _buffers(frozen)
    # Several training-mode forwards and optimizer steps, on the input and (when trainable)
    # the affine: batches whose statistics are far from the running ones.
    x = torch.nn.Parameter(torch.randn(8, 3, 5, 5, dtype=F64) * 5 - 4)
    optimizer = torch.optim.SGD([x, *frozen.parameters()], lr=0.1)
    frozen.train()
    for _ in range(3):
        optimizer.zero_grad()
        (frozen(x) ** 2).mean().backward()
        optimizer.step()
    after = _buffers(frozen)
    if trainable_affine:  # the affine trained; it is not a buffer then
        assert not torch.equal(frozen.weight, bn.weight)
        _assert_bitwise(before, after)
    else:
        _assert_bitwise(before, after)  # weight and bias are among the buffers
        assert torch.equal(frozen(probe), expected)  # still in training mode


def test_gradcheck_input(backend):
    require(backend, torch.zeros(2, 3, dtype=F64))
    bn = _trained(torch.nn.BatchNorm1d(3, dtype=F64), 3, (6, 3, 4))
    frozen = bt.FrozenBatchNorm1d.from_batch_norm(bn)
    frozen.backend = backend
    frozen.train()
    x = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))


def test_gradcheck_trainable_affine():
    bn = _trained(torch.nn.BatchNorm2d(3, dtype=F64), 3, (4, 3, 2, 2))
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(bn, trainable_affine=True)
    x = torch.randn(3, 3, 2, 2, dtype=F64, requires_grad=True)

    def run(x, weight, bias):
        return torch.func.functional_call(frozen, {"weight": weight, "bias": bias}, (x,))

    weight = frozen.weight.detach().clone().requires_grad_()
    bias = frozen.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x, weight, bias))


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_gradients_equal_eval_mode_torch(trainable_affine):
    bn = _trained(torch.nn.BatchNorm2d(3, dtype=F64), 3, (4, 3, 5, 5))
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(bn, trainable_affine=trainable_affine).train()
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    dy = torch.randn(4, 3, 5, 5, dtype=F64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    frozen(x_ours).backward(dy)
    bn(x_theirs).backward(dy)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=0, atol=1e-12)
    names = [name for name, _ in frozen.named_parameters()]
    if trainable_affine:
        assert names == ["weight", "bias"]
        torch.testing.assert_close(frozen.weight.grad, bn.weight.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(frozen.bias.grad, bn.bias.grad, rtol=0, atol=1e-12)
    else:
        assert names == []
        assert frozen.weight.grad is None and frozen.bias.grad is None
        assert not frozen.weight.requires_grad and not frozen.bias.requires_grad
    assert frozen.running_mean.grad is None and not frozen.running_mean.requires_grad


@pytest.mark.parametrize("trainable_affine", [False, True])
@pytest.mark.parametrize("source_cls", [torch.nn.BatchNorm2d, bt.BatchNorm2d])
def test_state_dict_round_trip_with_batch_norm(source_cls, trainable_affine):
    bn = _trained(source_cls(3, dtype=F64), 3, (4, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    # BatchNorm -> frozen, strict: every key, num_batches_tracked included.
    frozen = bt.FrozenBatchNorm2d(3, trainable_affine=trainable_affine, dtype=F64)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert int(frozen.num_batches_tracked) == 3
    torch.testing.assert_close(frozen.train()(x), bn(x), rtol=0, atol=1e-12)
    # frozen -> a fresh BatchNorm, strict.
    fresh = torch.nn.BatchNorm2d(3, dtype=F64)
    fresh.load_state_dict(frozen.state_dict(), strict=True)
    _assert_bitwise(_buffers(bn), _buffers(fresh))
    assert torch.equal(fresh.weight, bn.weight) and torch.equal(fresh.bias, bn.bias)


def test_state_dict_without_num_batches_tracked_torchvision_style():
    bn = _trained(torch.nn.BatchNorm2d(3, dtype=F64), 3, (4, 3, 5, 5))
    # torchvision.ops.FrozenBatchNorm2d's state dict: these four keys and no others.
    torchvision_style = {
        k: bn.state_dict()[k] for k in ("weight", "bias", "running_mean", "running_var")
    }
    frozen = bt.FrozenBatchNorm2d(3, dtype=F64)
    frozen.load_state_dict(torchvision_style, strict=True)
    assert len(torchvision_style) == 4  # the caller's dict is left as it was
    assert int(frozen.num_batches_tracked) == 0
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=1e-12)
    # Only num_batches_tracked may be missing: the statistics themselves may not.
    del torchvision_style["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        bt.FrozenBatchNorm2d(3, dtype=F64).load_state_dict(torchvision_style, strict=True)


def test_model_state_dict_loads_after_freeze_and_back():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
    _trained(model, 3, (4, 2, 3, 3))
    saved = copy.deepcopy(model.state_dict())
    bt.freeze(model)
    model.load_state_dict(saved, strict=True)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    torch.testing.assert_close(model.train()(x), plain.eval()(x), rtol=0, atol=1e-12)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = bt.SyncBatchNorm(4)  # single process: no process group needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    shared = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1),
        bt.BatchNorm2d(4, momentum=0.3),
        _Block(),
        torch.nn.Conv2d(4, 4, 1),
        shared,
        torch.nn.Conv2d(4, 4, 1),
        shared,  # the same layer twice
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
        bt.BatchNorm1d(5),
    ).double()
    return _trained(model, 3, (8, 3, 4, 4))


def test_freeze_small_cnn_keeps_eval_outputs_through_train():
    model = _small_cnn()
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    expected = model(x).detach()
    old_sync = model[5].bn
    assert bt.freeze(model) is model
    kinds = [type(m) for m in model if isinstance(m, bt.FrozenBatchNorm)]
    assert kinds == [bt.FrozenBatchNorm2d] * 4 + [bt.FrozenBatchNorm1d]
    assert type(model[5].bn) is bt.FrozenBatchNorm  # SyncBatchNorm has no rank
    assert model[7] is model[9]  # still shared
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    before = _buffers(model)
    model.train()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(6, 3, 4, 4, dtype=F64) * 4 + 1).square().mean().backward()
        optimizer.step()
    _assert_bitwise(before, _buffers(model))
    # Copies: the old SyncBatchNorm's tensors are not the frozen layer's.
    assert model[5].bn.running_mean.data_ptr() != old_sync.running_mean.data_ptr()


def test_freeze_bare_layer_returns_new_layer():
    bn = _trained(bt.SyncBatchNorm(3, dtype=F64), 3, (4, 3, 2, 2, 2))
    frozen = bt.freeze(bn)
    assert type(frozen) is bt.FrozenBatchNorm
    x = torch.randn(2, 3, 2, 2, 2, dtype=F64)  # any rank >= 2
    torch.testing.assert_close(frozen(x), bn(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused_cls", [bt.BatchNormReLU2d, bt.BatchNormAddReLU2d])
def test_freeze_refuses_fused_layers_and_changes_nothing(fused_cls):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),  # comes first: must not have been swapped when freeze raises
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), fused_cls(4)),
    )
    layers = list(model.modules())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=rf"'2\.1'.*{fused_cls.__name__}.*ReLU"):
        bt.freeze(model)
    assert list(model.modules()) == layers
    assert type(model[1]) is torch.nn.BatchNorm2d
    _assert_bitwise(state, model.state_dict())


def test_freeze_refuses_layer_without_running_stats_and_changes_nothing():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3),
        torch.nn.Linear(3, 3),
        torch.nn.BatchNorm1d(3, track_running_stats=False),
    )
    with pytest.raises(ValueError, match="'2'.*track_running_stats=False"):
        bt.freeze(model)
    assert type(model[0]) is torch.nn.BatchNorm1d
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bt.FrozenBatchNorm1d.from_batch_norm(model[2])


def test_freeze_refuses_unknown_batch_norm_subclass_and_lazy_layers():
    class Odd(torch.nn.modules.batchnorm._BatchNorm):
        pass

    with pytest.raises(TypeError, match="Odd"):
        bt.freeze(torch.nn.Sequential(Odd(3)))
    with pytest.raises(ValueError, match="uninitialized"):
        bt.freeze(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))


def test_unfreeze_restores_trainable_layers():
    model = _small_cnn()
    bt.freeze(model)
    frozen_stats = model[4].running_mean
    model.train()
    assert bt.unfreeze(model) is model
    kinds = [type(m) for m in model if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [bt.BatchNorm2d] * 4 + [bt.BatchNorm1d]
    assert type(model[5].bn) is bt.SyncBatchNorm
    assert model[7] is model[9]
    assert model[4].running_mean is frozen_stats  # the same tensors, taken over
    assert model[4].momentum == 0.3  # the momentum of the layer it was frozen from
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(m.training for m in layers)
    assert all(m.weight.requires_grad for m in layers)
    parameters = {id(p) for p in model.parameters()}
    assert all(id(m.weight) in parameters and id(m.bias) in parameters for m in layers)
    before = {id(m): (m.running_mean.clone(), int(m.num_batches_tracked)) for m in layers}
    model(torch.randn(6, 3, 4, 4, dtype=F64) * 4 + 1).sum().backward()
    for m in layers:
        mean, count = before[id(m)]
        assert not torch.equal(m.running_mean, mean)  # moving again
        assert int(m.num_batches_tracked) == count + (2 if m is model[7] else 1)
        assert m.weight.grad is not None


def test_unfreeze_keeps_eval_mode_and_outputs():
    model = _small_cnn()
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    expected = model(x).detach()
    bt.unfreeze(bt.freeze(model, trainable_affine=True).eval())
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    bare = bt.unfreeze(bt.FrozenBatchNorm3d(2))
    assert type(bare) is bt.BatchNorm3d


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (bt.FrozenBatchNorm1d(3), (2, 3, 4, 4), "expected 2D or 3D input .got 4D input."),
        (bt.FrozenBatchNorm2d(3), (2, 3, 4), "expected 4D input .got 3D input."),
        (bt.FrozenBatchNorm3d(3), (2, 3, 4, 4), "expected 5D input .got 4D input."),
        (bt.FrozenBatchNorm(3), (3,), "expected at least 2D input .got 1D input."),
    ],
)
def test_wrong_rank_raises(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))


def test_bad_arguments_raise_naming_the_value():
    with pytest.raises(ValueError, match="-0.1"):
        bt.FrozenBatchNorm2d(3, eps=-0.1)
    with pytest.raises(ValueError, match="nan"):
        bt.FrozenBatchNorm2d(3, eps=float("nan"))
    with pytest.raises(TypeError, match="'1e-5'"):
        bt.FrozenBatchNorm2d(3, eps="1e-5")
    with pytest.raises(ValueError, match="num_features must be > 0, got 0"):
        bt.FrozenBatchNorm2d(0)
    with pytest.raises(TypeError, match="num_features must be an int, got True"):
        bt.FrozenBatchNorm2d(True)
    with pytest.raises(TypeError, match="trainable_affine must be a bool, got 'yes'"):
        bt.FrozenBatchNorm2d(3, trainable_affine="yes")
    with pytest.raises(ValueError, match="'nope'"):
        bt.FrozenBatchNorm2d(3, backend="nope")
    with pytest.raises(TypeError, match="trainable_affine must be a bool, got 1"):
        bt.freeze(torch.nn.BatchNorm2d(3), trainable_affine=1)
    with pytest.raises(TypeError, match="list"):
        bt.freeze([torch.nn.BatchNorm2d(3)])
    with pytest.raises(
        TypeError, match="FrozenBatchNorm2d.from_batch_norm takes a BatchNorm2d, got BatchNorm1d"
    ):
        bt.FrozenBatchNorm2d.from_batch_norm(torch.nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match="Linear"):
        bt.FrozenBatchNorm.from_batch_norm(torch.nn.Linear(3, 3))


def test_wrong_channel_count_raises_and_moves_nothing():
    frozen = bt.FrozenBatchNorm2d.from_batch_norm(
        _trained(torch.nn.BatchNorm2d(3, dtype=F64), 3, (4, 3, 2, 2))
    )
    before = _buffers(frozen)
    with pytest.raises(ValueError, match="3"):
        frozen(torch.randn(2, 4, 2, 2, dtype=F64))
    _assert_bitwise(before, _buffers(frozen))
