"""Running statistics across the lifecycle: checkpoint recomputation, gradient accumulation,
PreciseBN. Oracles: one forward over the concatenated batch, statistics computed by hand in
float64 over the activations each layer saw, and torch.nn's own layers where they agree."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch_cases import require

import batchnorm.torch as bt
from batchnorm.torch.lifecycle import accumulate_stats, recompute_stats


def _net(dtype=torch.float64, seed=0, bn=bt.BatchNorm2d, **kwargs):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        bn(4, **kwargs),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, 3),
        bn(5, **kwargs),
        torch.nn.Dropout(0.5),
    ).to(dtype)


def _batches(k=3, n=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
            for _ in range(k)]  # fmt: skip


def _seen_by_layers(model):
    """Hooks recording every input each batch-norm layer receives."""
    seen = {}

    def record(name):
        return lambda layer, inputs: seen.setdefault(name, []).append(inputs[0].detach())

    handles = [
        m.register_forward_pre_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    return seen, handles


def _pooled(inputs):
    """Mean and unbiased variance per channel of all the activations together, float64."""
    x = torch.cat([t.double().transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], 1)
    return x.mean(1), x.var(1, unbiased=True)


# ---------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_training_counts_each_batch_once(backend, use_reentrant):
    require(backend, torch.zeros(2, 3, dtype=torch.float64))
    plain, ckpt = _net(), _net()
    for module in (plain, ckpt):
        for layer in module.modules():
            if hasattr(layer, "backend"):
                layer.backend = backend
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_ckpt = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    for step, x in enumerate(_batches(4)):
        torch.manual_seed(step)  # the same dropout mask on both
        plain(x).square().mean().backward()
        torch.manual_seed(step)
        y = checkpoint(ckpt, x.requires_grad_(), use_reentrant=use_reentrant)
        y.square().mean().backward()
        # The recomputed forward normalised as the first: the same gradients.
        for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        for opt in (opt_plain, opt_ckpt):
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert int(ckpt[1].num_batches_tracked) == 4


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_checkpoint_of_small_calls_on_pytorchs_kernel(use_reentrant, fused):
    # backend="auto" runs PyTorch's kernel on small calls (native.py). The recomputation must
    # run it too: non-reentrant checkpointing raises CheckpointError when the recomputed
    # forward saves other tensors than the first, which our own stages did here.
    def net():
        torch.manual_seed(0)
        act = (
            bt.BatchNormReLU2d(4)
            if fused
            else torch.nn.Sequential(bt.BatchNorm2d(4), torch.nn.ReLU())
        )
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), act).double()

    plain, ckpt = net(), net()
    for step, x in enumerate(_batches(2)):
        plain(x).square().mean().backward()
        checkpoint(ckpt, x.requires_grad_(), use_reentrant=use_reentrant).square().mean().backward()
        bn = ckpt[1] if fused else ckpt[1][0]
        assert bn.last_backend == "torch", bn.last_backend
        for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
        # Counted once, by the first forward; the recomputation's statistics went nowhere.
        for name, buffer in plain.named_buffers():
            torch.testing.assert_close(dict(ckpt.named_buffers())[name], buffer, rtol=0, atol=0)
        assert int(bn.num_batches_tracked) == step + 1


def test_torch_nn_counts_a_checkpointed_batch_twice():
    """The bug the mechanism fixes, shown on PyTorch's own layer (PyTorch #96136): if this ever
    stops failing, PyTorch fixed it."""
    torch_bn = torch.nn.BatchNorm1d(3).double()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    checkpoint(torch_bn, x, use_reentrant=True).sum().backward()
    assert int(torch_bn.num_batches_tracked) == 2
    ours = bt.BatchNorm1d(3).double()
    checkpoint(ours, x, use_reentrant=True).sum().backward()
    assert int(ours.num_batches_tracked) == 1


# ---------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulation_equals_one_forward_over_the_concatenation(backend, momentum):
    """One layer: its input is the data itself, so the concatenated forward is the oracle."""
    require(backend, torch.zeros(2, 3, dtype=torch.float64))
    xs = [t[:, :, 0] for t in _batches(3)]  # (N, 3, 8)
    ours, whole = bt.BatchNorm1d(3, momentum=momentum, backend=backend).double(), None
    whole = bt.BatchNorm1d(3, momentum=momentum, backend="reference").double()
    for step in range(2):  # twice: the second update starts from non-default buffers
        with accumulate_stats(ours):
            outputs = [ours(x) for x in xs]
        whole(torch.cat(xs))
        # Each micro-batch was normalised with its own statistics.
        torch.testing.assert_close(outputs[0], torch.nn.functional.batch_norm(
            xs[0], None, None, training=True), rtol=1e-12, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(ours.running_mean, whole.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.running_var, whole.running_var, rtol=0, atol=1e-12)
        assert int(ours.num_batches_tracked) == int(whole.num_batches_tracked) == step + 1


def test_accumulation_in_a_deep_model_merges_what_each_layer_saw(backend):
    require(backend, torch.zeros(2, 3, dtype=torch.float64))
    model = _net()
    for layer in model.modules():
        if hasattr(layer, "backend"):
            layer.backend = backend
    before = {n: b.clone() for n, b in model.named_buffers()}
    seen, handles = _seen_by_layers(model)
    with accumulate_stats(model):
        for x in _batches(3):
            model(x)
    for h in handles:
        h.remove()
    for name in ("1", "4"):
        mean, var = _pooled(seen[name])
        want_mean = 0.9 * before[f"{name}.running_mean"] + 0.1 * mean
        want_var = 0.9 * before[f"{name}.running_var"] + 0.1 * var
        torch.testing.assert_close(model.get_submodule(name).running_mean, want_mean,
                                   rtol=0, atol=1e-12)  # fmt: skip
        torch.testing.assert_close(model.get_submodule(name).running_var, want_var,
                                   rtol=0, atol=1e-12)  # fmt: skip
        assert int(model.get_submodule(name).num_batches_tracked) == 1


def test_accumulation_with_fused_and_sync_layers():
    fused = bt.BatchNormReLU2d(4).double()
    sync = bt.SyncBatchNorm(4).double()  # no process group: the local path
    xs = [t[:, :, :4] for t in _batches(2)]
    xs = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 1)) for x in xs]  # 4 channels
    for layer in (fused, sync):
        with accumulate_stats(layer):
            for x in xs:
                layer(x)
        reference = torch.nn.BatchNorm2d(4).double()
        reference(torch.cat(xs))
        torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.running_var, reference.running_var, rtol=0, atol=1e-12)
        assert int(layer.num_batches_tracked) == 1


def test_accumulation_that_raises_changes_nothing():
    layer = bt.BatchNorm1d(3).double()
    with pytest.raises(RuntimeError, match="boom"):
        with accumulate_stats(layer):
            layer(torch.randn(4, 3, dtype=torch.float64))
            raise RuntimeError("boom")
    assert torch.equal(layer.running_mean, torch.zeros(3, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 0
    layer(torch.randn(4, 3, dtype=torch.float64))  # and the layer is back to normal
    assert int(layer.num_batches_tracked) == 1


def test_accumulation_keeps_a_non_finite_micro_batch_out():
    layer = bt.BatchNorm1d(3).double()
    bad = torch.randn(4, 3, dtype=torch.float64)
    bad[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
        with accumulate_stats(layer):
            layer(torch.randn(4, 3, dtype=torch.float64))
            layer(bad)
    assert layer.running_mean[1] == 0 and layer.running_var[1] == 1
    assert layer.running_mean[0] != 0


def test_accumulation_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="batchnorm.torch layers"):
        with accumulate_stats(torch.nn.Sequential(torch.nn.BatchNorm1d(3))):
            pass
    with pytest.raises(ValueError, match="no batch-norm layer"):
        with accumulate_stats(torch.nn.Linear(2, 2)):
            pass
    layer = bt.BatchNorm1d(3)
    with accumulate_stats(layer):
        with pytest.raises(ValueError, match="already inside"):
            with accumulate_stats(layer):
                pass
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with accumulate_stats("model"):
            pass


# ---------------------------------------------------------------------------- PreciseBN


@pytest.mark.parametrize("bn", [bt.BatchNorm2d, torch.nn.BatchNorm2d], ids=["ours", "torch"])
def test_precise_stats_are_the_pooled_statistics_of_what_each_layer_saw(bn):
    model = _net(bn=bn)
    model.train()  # the mode must come back as it was
    model[5].eval()
    batches = _batches(4)
    # The oracle: the activations each layer sees with batch statistics, dropout off.
    oracle = _net(bn=bn)
    oracle.eval()
    for name in ("1", "4"):
        oracle.get_submodule(name).train()
    seen, handles = _seen_by_layers(oracle)
    with torch.no_grad():
        for x in batches:
            oracle(x)
    for h in handles:
        h.remove()
    summary = recompute_stats(model, batches)
    for name in ("1", "4"):
        mean, var = _pooled(seen[name])
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.running_var, var, rtol=0, atol=1e-10)
        assert int(layer.num_batches_tracked) == 0
        assert summary[name].calls == 4
        assert summary[name].count == sum(t.numel() // t.shape[1] for t in seen[name])
    assert summary["1"].mean_shift > 0 and summary["1"].var_ratio > 1
    assert model.training and not model[5].training and model[1].training


def test_precise_average_estimator_is_algorithm_2():
    layer = bt.BatchNorm1d(3).double()
    batches = [torch.randn(n, 3, dtype=torch.float64) * 3 + 2 for n in (4, 6, 5)]
    recompute_stats(layer, batches, estimator="average")
    means = torch.stack([b.mean(0) for b in batches])
    variances = torch.stack([b.var(0, unbiased=True) for b in batches])
    torch.testing.assert_close(layer.running_mean, means.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, variances.mean(0), rtol=0, atol=1e-12)


def test_precise_reused_layer_pools_every_call():
    layer = bt.BatchNorm1d(3).double()
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), layer)
    batches = [torch.randn(6, 3, dtype=torch.float64) + 1 for _ in range(2)]
    seen, handles = _seen_by_layers(model)
    with torch.no_grad():
        model.train()
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    summary = recompute_stats(model, batches)
    mean, var = _pooled(seen["0"])
    assert len(seen["0"]) == 4 and summary["0"].calls == 4
    torch.testing.assert_close(layer.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.running_var, var, rtol=0, atol=1e-12)


def test_precise_limits_and_batch_kinds():
    layer = bt.BatchNorm1d(3).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.zeros(4)) for _ in range(5)]
    assert recompute_stats(layer, data, num_batches=2)["BatchNorm1d"].calls == 2
    assert recompute_stats(layer, data, num_samples=9)["BatchNorm1d"].calls == 3  # 4+4+4 >= 9
    assert recompute_stats(layer, iter(data[:1]), num_batches=10)["BatchNorm1d"].calls == 1
    assert recompute_stats(layer, [{"input": data[0][0]}])["BatchNorm1d"].count == 4


def test_precise_half_precision_activations():
    layer = bt.BatchNorm1d(3)
    batches = [torch.randn(64, 3) * 2 + 5 for _ in range(3)]
    recompute_stats(layer, [b.to(torch.bfloat16) for b in batches])
    mean, var = _pooled([b.to(torch.bfloat16) for b in batches])
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_precise_non_finite_channel_keeps_its_old_values():
    layer = bt.BatchNorm1d(3).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[0\]"):
        recompute_stats(layer, [x])
    assert layer.running_mean[0] == 0 and layer.running_var[0] == 1
    assert layer.running_mean[1] != 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batches": []}, ValueError, "yielded no batch"),
        ({"num_samples": 0}, ValueError, "num_samples must be positive"),
        ({"num_batches": -1}, ValueError, "num_batches must be positive"),
        ({"num_batches": 1.5}, TypeError, "num_batches must be a positive int"),
        ({"estimator": "ema"}, ValueError, "estimator must be"),
        ({"batches": torch.zeros(4, 3)}, TypeError, "iterable of batches"),
        ({"batches": ["text"]}, TypeError, "each batch must be"),
    ],
)
def test_precise_bad_input_changes_nothing(kwargs, error, match):
    model = _net()
    model(_batches(1)[0])  # buffers away from their defaults
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    args = {"batches": _batches(2), **kwargs}
    with pytest.raises(error, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recompute_stats(model, args.pop("batches"), **args)
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
    assert all(m.training for m in model.modules())


def test_precise_needs_a_batch_norm_layer():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recompute_stats(torch.nn.Linear(3, 3), [torch.randn(2, 3)])


def test_accumulation_of_half_precision_activations_merges_in_float64():
    layer = bt.BatchNorm1d(3)  # float32 buffers, bfloat16 activations (autocast-style)
    xs = [(torch.randn(16, 3) * 2 + 5).to(torch.bfloat16) for _ in range(3)]
    with accumulate_stats(layer):
        for x in xs:
            layer(x)
    mean, var = _pooled(xs)  # of the bfloat16 values themselves, in float64
    torch.testing.assert_close(layer.running_mean.double(), 0.1 * mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), 0.9 + 0.1 * var, rtol=1e-6, atol=1e-6)


def test_precise_pools_only_the_real_positions_of_a_masked_layer(backend):
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bt.BatchNorm1d(3, backend=backend)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    model = Masked().double()
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    require(backend, x)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :5] = True
    x = x.masked_fill(~mask[:, None, :], 100.0)  # padding far off: it must not count
    recompute_stats(model, [{"x": x, "mask": mask}], progress=False)
    real = x.transpose(1, 2)[mask]
    torch.testing.assert_close(model.bn.running_mean, real.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, real.var(0), rtol=0, atol=1e-12)


def test_precise_takes_no_more_batches_than_it_uses_and_leaves_the_iterator_open():
    taken = []

    def loader():
        for i in range(10):
            taken.append(i)
            yield torch.randn(4, 3, dtype=torch.float64)

    it = loader()
    recompute_stats(bt.BatchNorm1d(3).double(), it, num_batches=2, progress=False)
    assert taken == [0, 1]
    next(it)  # still open
    assert taken == [0, 1, 2]
    taken.clear()
    recompute_stats(bt.BatchNorm1d(3).double(), loader(), num_samples=5, progress=False)
    assert taken == [0, 1]  # 4 + 4 >= 5


def test_precise_inside_accumulation_is_refused_and_changes_nothing():
    layer = bt.BatchNorm1d(3).double()
    with accumulate_stats(layer):
        layer(torch.randn(4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="inside accumulate_stats"):
            recompute_stats(layer, [torch.randn(4, 3, dtype=torch.float64)], progress=False)
        layer(torch.randn(4, 3, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 1  # still one accumulated update


def test_batch_renorm_refuses_checkpoint_recomputation():
    layer = bt.BatchRenorm1d(3).double()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="cannot be recomputed by activation checkpointing"):
        y.pow(3).sum().backward()
