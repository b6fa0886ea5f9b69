"""State dicts both ways, ``convert``/``revert`` on a model, and 50 SGD steps of a small CNN
with our layers against the same CNN with PyTorch's."""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm.torch as bt
from batchnorm.kernels import available_backends

PAIRS = [
    (bt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 4)),
    (bt.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 3)),
    (bt.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 3)),
]


def _trained(module: torch.nn.Module, shape, steps: int = 3) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(generator=gen)
    for _ in range(steps):
        module(torch.randn(shape, generator=gen) * 3 + 1)
    return module


@pytest.mark.parametrize(("ours_cls", "theirs_cls", "shape"), PAIRS)
def test_state_dict_both_ways(backend, ours_cls, theirs_cls, shape):
    x = torch.randn(shape)
    theirs = _trained(theirs_cls(3), shape).eval()
    ours = ours_cls(3, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    assert int(ours.num_batches_tracked) == 3
    torch.testing.assert_close(ours(x), theirs(x))

    ours = _trained(ours_cls(3, backend=backend), shape).eval()
    theirs = theirs_cls(3)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    torch.testing.assert_close(ours(x), theirs(x))


def test_old_checkpoint_without_num_batches_tracked():
    """Checkpoints from before num_batches_tracked existed (state-dict version 1) load strictly,
    as they do into PyTorch's layer, which keeps the module's own counter."""
    source = _trained(torch.nn.BatchNorm2d(3), (4, 3, 2, 2))
    state = source.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours, theirs = bt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (ours, theirs):
        module.num_batches_tracked.fill_(5)
        module.load_state_dict(state)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)
    assert torch.equal(ours.running_mean, source.running_mean)
    assert torch.equal(ours.running_var, source.running_var)


class SmallCNN(torch.nn.Module):
    """Conv-BN2d-ReLU twice, BN1d in the head, one BN3d on a lifted feature map."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4, momentum=momentum),
            torch.nn.ReLU(),
            torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(6),
            torch.nn.ReLU(),
        )
        self.lift = torch.nn.BatchNorm3d(1, affine=False)
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(6 * 4 * 4, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = self.lift(h.unsqueeze(1)).squeeze(1)
        return self.head(h)


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        yield x, torch.randint(0, 3, (8,), generator=gen)


def test_convert_and_revert_preserve_everything(backend):
    reason = available_backends(torch.zeros(2, 3, dtype=torch.float64))[backend]
    if reason is not None:  # e.g. triton (under TRITON_INTERPRET=1) has no float64
        pytest.skip(reason)
    torch.manual_seed(0)
    model = SmallCNN().double()
    for x, _ in _batches(2):
        model(x.double())
    model.eval()
    reference = copy.deepcopy(model)
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}

    converted = bt.convert(model, backend=backend)
    assert converted is model
    kinds = [type(m) for m in converted.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert kinds == [bt.BatchNorm3d]
    assert (
        sum(
            type(m) in (bt.BatchNorm1d, bt.BatchNorm2d, bt.BatchNorm3d) for m in converted.modules()
        )
        == 4
    )
    assert not converted.training and all(not m.training for m in converted.modules())
    # The very same tensor objects (so optimizers and dtype/device are untouched).
    for name, t in converted.state_dict(keep_vars=True).items():
        assert t is tensors[name], name
    assert all(m.backend == backend for m in converted.modules() if hasattr(m, "backend"))
    x = next(_batches(1, seed=5))[0].double()
    torch.testing.assert_close(converted(x), reference(x))

    reverted = bt.revert(converted)
    assert {type(m) for m in reverted.modules()} == {type(m) for m in reference.modules()}
    assert torch.equal(reverted(x), reference(x))
    reverted.train()
    reference.train()
    assert torch.equal(reverted(x), reference(x))


def test_convert_a_bare_layer_and_training_mode():
    layer = torch.nn.BatchNorm1d(5, momentum=None, affine=False, track_running_stats=False)
    ours = bt.convert(layer)
    assert type(ours) is bt.BatchNorm1d and ours.training
    assert ours.momentum is None and not ours.affine and not ours.track_running_stats
    assert ours.weight is None and ours.running_mean is None
    assert type(bt.revert(ours)) is torch.nn.BatchNorm1d


class _Custom(torch.nn.BatchNorm2d):
    pass


def test_convert_leaves_subclasses_alone():
    model = torch.nn.Sequential(_Custom(3), torch.nn.SyncBatchNorm(3))
    bt.convert(model)
    assert [type(m) for m in model] == [_Custom, torch.nn.SyncBatchNorm]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_torch(backend, momentum):
    """50 SGD steps on a fixed batch stream: the same losses (1e-5 relative, float32)."""
    torch.manual_seed(0)
    theirs = SmallCNN(momentum=momentum)
    ours = bt.convert(copy.deepcopy(theirs), backend=backend)
    losses = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for x, target in _batches(50):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    ours_losses, theirs_losses = torch.tensor(losses["ours"]), torch.tensor(losses["theirs"])
    assert theirs_losses[-10:].mean() < theirs_losses[:10].mean()  # it did learn something
    torch.testing.assert_close(ours_losses, theirs_losses, rtol=1e-5, atol=0)
    ours.eval()
    theirs.eval()
    x = next(_batches(1, seed=9))[0]
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize(("ours_cls", "theirs_cls", "shape"), PAIRS)
def test_bias_false_keyword_as_torch(ours_cls, theirs_cls, shape):
    ours, theirs = ours_cls(3, bias=False), theirs_cls(3, bias=False)
    assert ours.bias is None and ours.weight is not None
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(shape) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    converted = bt.convert(torch.nn.Sequential(theirs_cls(3, bias=False)))
    assert isinstance(converted[0], ours_cls) and converted[0].bias is None
    assert bt.BatchNormReLU2d(3, bias=False).bias is None


def test_convert_keeps_a_shared_layer_shared():
    bn = torch.nn.BatchNorm2d(3)
    model = torch.nn.Module()
    model.a, model.b = bn, bn
    model.seq = torch.nn.Sequential(bn)
    bt.convert(model)
    assert isinstance(model.a, bt.BatchNorm2d) and model.a is model.b is model.seq[0]
    bt.revert(model)
    assert type(model.a) is torch.nn.BatchNorm2d and model.a is model.b is model.seq[0]


def test_cumulative_average_without_a_batch_count_leaves_the_buffers_as_torch():
    ours, theirs = bt.BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    ours.num_batches_tracked = theirs.num_batches_tracked = None
    x = torch.randn(8, 3) + 5
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_mean, torch.zeros(3))


def test_eps_zero_is_accepted_in_eval_as_torch():
    x = torch.randn(2, 3, 4, 4)
    ours, theirs = bt.BatchNorm2d(3, eps=0.0).eval(), torch.nn.BatchNorm2d(3, eps=0.0).eval()
    torch.testing.assert_close(ours(x), theirs(x))
    out = bt.batch_norm(x, torch.zeros(3), torch.full((3,), 4.0), training=False, eps=0.0)
    torch.testing.assert_close(out, x / 2)


def test_fx_tracing_keeps_our_layers_as_leaves():
    nn = torch.nn
    model = bt.convert(
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    )
    model[3] = bt.BatchNormReLU2d.from_batch_norm(model[3])
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)  # plain fx traces into our forward's validation
    gm = bt.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2", "3"]
    x = torch.randn(4, 3, 5, 5)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(gm(x), reference(x))
    # The graph calls the same module objects: buffers update and train/eval switch as before.
    torch.testing.assert_close(gm.get_submodule("1").running_mean, reference[1].running_mean)
    gm.eval()
    reference.eval()
    torch.testing.assert_close(gm(x), reference(x))
