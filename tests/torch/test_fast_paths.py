"""The shortcuts that keep a small call cheap compute exactly what the general path does: the
running-statistics update in a few torch ops, and the Numba stages run on one thread."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from batchnorm import reference as ref
from batchnorm.torch import functional


def _reference_update(rm, rv, mean, var, count, momentum, tracked):
    new = ref.update_running_stats(rm, rv, tracked, mean, var, count, momentum=momentum)
    return new.running_mean, new.running_var


@pytest.mark.parametrize(
    ("buffers", "momentum", "tracked", "count"),
    list(
        itertools.product(
            (torch.float32, torch.float64, torch.float16, torch.bfloat16),
            (0.1, 0.0, 1.0, 0.37, None),
            (0, 5),
            (2, 3, 1000),
        )
    ),
)
def test_running_stats_shortcut_equals_the_reference_bit_for_bit(buffers, momentum, tracked, count):
    gen = torch.Generator().manual_seed(count + tracked)
    rm = (torch.randn(7, generator=gen) * 3).to(buffers)
    rv = (torch.rand(7, generator=gen) * 2 + 0.1).to(buffers)
    mean = torch.randn(7, generator=gen) * 5 + 1e3
    var = torch.rand(7, generator=gen) * 4
    want_mean, want_var = _reference_update(rm, rv, mean, var, count, momentum, tracked)
    functional.write_running_stats(rm, rv, mean, var, count, momentum, tracked)
    assert torch.equal(rm, want_mean) and torch.equal(rv, want_var)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_running_stats_shortcut_hands_non_finite_batches_to_the_reference(bad):
    """NaN, infinity, and a finite variance whose unbiased estimate overflows (3e38 * 2)."""
    rm, rv = torch.zeros(3), torch.ones(3)
    mean, var = torch.tensor([1.0, bad, 2.0]), torch.tensor([1.0, 1.0, bad])
    mean[1] = float("nan") if bad == 3e38 else bad
    with pytest.warns(RuntimeWarning, match="not finite"):
        functional.write_running_stats(rm, rv, mean, var, 2, 0.5)
    assert torch.isfinite(rm).all() and torch.isfinite(rv).all()
    assert rm[0] == 0.5 and rv[0] == 0.5 + 0.5 * 2
    assert rm[1] == 0.0 and rv[2] == 1.0  # the bad channels kept their old values


@pytest.mark.parametrize(
    "shape", [(8, 16, 4, 4), (4, 8, 32, 32), (32, 64, 2, 2)], ids=["cols", "rows", "narrow"]
)
def test_numba_stages_on_one_thread_equal_the_parallel_run(monkeypatch, shape):
    """Up to ``SERIAL_MAX_BYTES`` the stages run on the calling thread: the same numbers
    (the kernels split work by shape, never by thread count), and the caller's thread count
    is back afterwards."""
    numba = pytest.importorskip("numba")
    from batchnorm.kernels.numba_cpu import NumbaBackend, compiled

    backend = NumbaBackend()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    dy = torch.randn(shape, generator=gen)
    gamma, beta = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    threads_seen = []
    real_set = numba.set_num_threads

    def run(serial_max):
        monkeypatch.setattr(compiled, "SERIAL_MAX_BYTES", serial_max)
        fwd = backend.forward_train(x, gamma, beta, 1e-5, 1, relu=True)
        threads_seen.append(numba.get_num_threads())
        bwd = backend.backward_train(dy, x, fwd.mean, fwd.invstd, gamma, 1, relu_mask=fwd.relu_mask)
        return [t for t in (*fwd, *bwd) if t is not None]

    before = numba.get_num_threads()
    monkeypatch.setattr(numba, "set_num_threads", lambda n: threads_seen.append(n) or real_set(n))
    parallel, serial = run(0), run(1 << 40)
    assert 1 in threads_seen  # the serial run did switch
    assert numba.get_num_threads() == before
    for a, b in zip(parallel, serial, strict=True):
        assert torch.equal(a, b)


def _on_a_device(monkeypatch):
    """Route CPU tensors through the off-CPU code (no host reads), as a GPU's would go."""
    from batchnorm.torch import native

    for module in (functional, native):
        monkeypatch.setattr(module, "host_read_is_cheap", lambda t: False)


@pytest.mark.parametrize(
    ("buffers", "momentum", "tracked", "count"),
    list(
        itertools.product(
            (torch.float32, torch.float64, torch.float16, torch.bfloat16),
            (0.1, 0.0, 1.0, None),
            (0, 5),
            (2, 1000),
        )
    ),
)
def test_running_stats_on_a_device_equal_the_reference_bit_for_bit(
    monkeypatch, buffers, momentum, tracked, count
):
    """Off the CPU the update decides per channel on the device, without a host read: the
    reference's values bit for bit, for finite channels, a NaN mean, an infinite variance, a
    finite variance whose unbiased estimate overflows, and a buffer already poisoned; and no
    warning (the warning needs the host read)."""
    _on_a_device(monkeypatch)
    gen = torch.Generator().manual_seed(count + tracked)
    rm = (torch.randn(7, generator=gen) * 3).to(buffers)
    rv = (torch.rand(7, generator=gen) * 2 + 0.1).to(buffers)
    mean = torch.randn(7, generator=gen) * 5 + 1e3
    var = torch.rand(7, generator=gen) * 4
    mean[1], var[2] = float("nan"), float("inf")
    var[3] = torch.finfo(buffers).max if buffers.itemsize == 2 else 3e38  # overflows in the update
    rm[4] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = ref.update_running_stats(rm, rv, tracked, mean, var, count, momentum=momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.write_running_stats(rm, rv, mean, var, count, momentum, tracked)
    torch.testing.assert_close(rm, want.running_mean, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rv, want.running_var, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(rm[[0, 1, 2, 3, 5, 6]]).all() and torch.isfinite(rv).all()


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that hand a tensor's value to the host."""

    READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.equal")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _layers():
    import batchnorm.torch as bt

    return {
        "BatchNorm1d": (lambda: bt.BatchNorm1d(6, backend="reference"), (5, 6)),
        "BatchNorm2d": (lambda: bt.BatchNorm2d(6, backend="reference"), (4, 6, 3, 3)),
        "BatchNorm3d": (lambda: bt.BatchNorm3d(6, backend="reference"), (4, 6, 3, 3, 2)),
        "BatchNormReLU2d": (lambda: bt.BatchNormReLU2d(6, backend="reference"), (4, 6, 3, 3)),
        "BatchNormAddReLU2d": (
            lambda: bt.BatchNormAddReLU2d(6, backend="reference"),
            (4, 6, 3, 3),
        ),
        # 5 samples in virtual batches of 2 and a last one of 1: two counts to merge.
        "GhostBatchNorm2d": (
            lambda: bt.GhostBatchNorm2d(6, virtual_batch_size=2, backend="reference"),
            (5, 6, 3, 3),
        ),
        # Without an r_max/d_max schedule (with one, the step count is read).
        "BatchRenorm2d": (lambda: bt.BatchRenorm2d(6, backend="reference"), (4, 6, 3, 3)),
        # Its gamma guard reads gamma on the host (fused_leaky.py); 0 turns it off.
        "BatchNormLeakyReLU2d": (
            lambda: bt.BatchNormLeakyReLU2d(6, backend="reference", gamma_guard=0.0),
            (4, 6, 3, 3),
        ),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_training_step_off_the_cpu_reads_nothing_on_the_host(name):
    """A host read per layer makes the host wait for the GPU at every layer of every step.
    On the meta device (tensors without values, so any read raises) a training step of each
    layer, forward and backward, runs through and updates its running statistics: the same
    code as on a GPU."""
    make, shape = _layers()[name]
    layer = make().to("meta")
    x = torch.empty(shape, device="meta", requires_grad=True)
    extra = (torch.empty(shape, device="meta"),) if "Add" in name else ()
    with _HostReads() as log:
        y = layer(x, *extra)
        y.sum().backward()
    assert log.reads == []
    assert x.grad is not None and x.grad.shape == x.shape
    assert layer.last_backend.startswith("reference")


def test_running_stats_with_a_count_on_the_device_read_nothing():
    """SyncBatchNorm's global count stays a 0-d tensor on a GPU: the update takes it as it is
    (on the meta device, where any host read raises), and on values it gives the reference's
    numbers; a count of 1 keeps the channels' values instead of dividing by zero."""
    meta = {"device": "meta"}
    rm, rv = torch.zeros(5, **meta), torch.ones(5, **meta)
    with _HostReads() as log:
        functional.write_running_stats(
            rm, rv, torch.zeros(5, **meta), torch.ones(5, **meta),
            torch.tensor(12, **meta), 0.1,
        )  # fmt: skip
    assert log.reads == []


@pytest.mark.parametrize("count", [12, 1])
def test_running_stats_with_a_count_tensor_equal_the_reference(monkeypatch, count):
    _on_a_device(monkeypatch)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    mean, var = torch.randn(5), torch.rand(5)
    want = (
        ref.update_running_stats(rm, rv, 0, mean, var, count, momentum=0.1)
        if count >= 2
        else ref.RunningStats(rm.clone(), rv.clone(), 1)
    )
    functional.write_running_stats(rm, rv, mean, var, torch.tensor(count), 0.1)
    torch.testing.assert_close(rm, want.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(
        rv, want.running_var, rtol=1e-7, atol=0
    )  # count/(count-1) in float32


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_evaluation_without_grad_runs_only_the_stage(backend):
    """An evaluation forward under no_grad dispatches the ops of the backend's
    ``forward_infer`` and nothing else: no copies of the running statistics, which only a
    training update or a backward would read (on a GPU each is a launch)."""
    import batchnorm.torch as bt
    from batchnorm.kernels import get_backend

    x = torch.randn(4, 6, 3, 3)
    layer = bt.BatchNorm2d(6, backend=backend).eval()
    stage = get_backend(backend, x)
    args = (x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps, 1)
    with torch.no_grad():
        layer(x)  # warm: first-call imports and compilation dispatch nothing extra later
        with _Ops() as direct:
            want = stage.forward_infer(*args)
        with _Ops() as through_layer:
            got = layer(x)
    assert through_layer.ops == direct.ops
    torch.testing.assert_close(got, want, rtol=0, atol=0)
