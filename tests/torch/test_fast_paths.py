"""The shortcuts that keep a small call cheap compute exactly what the general path does: the
running-statistics update in a few torch ops, and the Numba stages run on one thread."""

from __future__ import annotations

import itertools

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
