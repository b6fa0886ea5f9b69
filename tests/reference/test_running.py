"""Running statistics: closed forms after k steps under every convention; non-finite batches."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm.reference as ref


def _run(xp, batches, momentum, convention, variance, start_mean, start_var):
    rm, rv, tracked = xp.asarray(start_mean), xp.asarray(start_var), 0
    for x in batches:
        _, saved = ref.batch_norm_train(xp.asarray(x))
        rm, rv, tracked = ref.update_running_stats(
            rm,
            rv,
            tracked,
            saved.mean,
            saved.var,
            saved.count,
            momentum=momentum,
            convention=convention,
            variance=variance,
        )
    return xp.to_numpy(rm), xp.to_numpy(rv), tracked


@pytest.mark.parametrize("convention", ["torch", "keras"])
@pytest.mark.parametrize("variance", ["unbiased", "biased"])
def test_closed_form_after_k_steps(xp, rng, convention, variance):
    k, m, momentum = 5, 6, 0.3
    batches = [rng.normal(size=(m, 2)) * (i + 1) + i for i in range(k)]
    start_mean, start_var = np.zeros(2), np.ones(2)
    rm, rv, tracked = _run(xp, batches, momentum, convention, variance, start_mean, start_var)
    # weight of the new batch: momentum (torch) or 1 - momentum (keras)
    w = momentum if convention == "torch" else 1 - momentum
    ddof = 1 if variance == "unbiased" else 0
    # closed form: r_k = (1-w)^k r_0 + sum_i w (1-w)^(k-1-i) b_i
    exp_mean = (1 - w) ** k * start_mean
    exp_var = (1 - w) ** k * start_var
    for i, b in enumerate(batches):
        exp_mean = exp_mean + w * (1 - w) ** (k - 1 - i) * b.mean(0)
        exp_var = exp_var + w * (1 - w) ** (k - 1 - i) * b.var(0, ddof=ddof)
    assert tracked == k
    np.testing.assert_allclose(rm, exp_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, exp_var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_cumulative_average(xp, rng, convention):
    batches = [rng.normal(size=(4, 3)) + i for i in range(6)]
    rm, rv, tracked = _run(xp, batches, None, convention, "unbiased", np.zeros(3), np.ones(3))
    assert tracked == 6
    np.testing.assert_allclose(rm, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)


def test_momentum_extremes(rng):
    x = rng.normal(size=(5, 2))
    _, s = ref.batch_norm_train(x)
    rm0, rv0 = np.full(2, 3.0), np.full(2, 4.0)
    frozen = ref.update_running_stats(rm0, rv0, 0, s.mean, s.var, s.count, momentum=0.0)
    assert np.array_equal(frozen.running_mean, rm0) and np.array_equal(frozen.running_var, rv0)
    replaced = ref.update_running_stats(rm0, rv0, 0, s.mean, s.var, s.count, momentum=1.0)
    np.testing.assert_allclose(replaced.running_mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(replaced.running_var, x.var(0, ddof=1), rtol=1e-14)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_non_finite_batch_leaves_those_channels_untouched(xp, rng):
    x = rng.normal(size=(6, 3))
    x[2, 1] = np.inf
    x[0, 2] = np.nan
    _, s = ref.batch_norm_train(xp.asarray(x))
    rm0, rv0 = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1, 2\]"):
        new = ref.update_running_stats(xp.asarray(rm0), xp.asarray(rv0), 7, s.mean, s.var, s.count)
    rm, rv = xp.to_numpy(new.running_mean), xp.to_numpy(new.running_var)
    assert rm[1:].tolist() == [2.0, 3.0] and rv[1:].tolist() == [5.0, 6.0]
    np.testing.assert_allclose(rm[0], 0.9 * 1.0 + 0.1 * x[:, 0].mean(), rtol=1e-14)
    assert new.num_batches_tracked == 8


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "0.1"}, TypeError, "momentum"),
        ({"convention": "tf"}, ValueError, "convention must be"),
        ({"variance": "sample"}, ValueError, "variance must be"),
    ],
)
def test_bad_running_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ref.update_running_stats(np.zeros(2), np.ones(2), 0, np.zeros(2), np.ones(2), 4, **kwargs)


def test_running_shape_mismatch():
    with pytest.raises(ValueError, match=r"running_var must have shape \(2,\)"):
        ref.update_running_stats(np.zeros(2), np.ones(3), 0, np.zeros(2), np.ones(2), 4)


def test_non_finite_guard_applies_without_warning(rng):
    x = rng.normal(size=(6, 2))
    x[0, 0] = np.nan
    with np.errstate(invalid="ignore"):
        _, s = ref.batch_norm_train(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may be raised with warn=False
        new = ref.update_running_stats(
            np.zeros(2), np.ones(2), 0, s.mean, s.var, s.count, warn=False
        )
    assert new.running_mean[0] == 0.0 and new.running_var[0] == 1.0
    assert np.isfinite(new.running_mean[1]) and new.running_mean[1] != 0.0


def test_chainer_at_one_value_per_channel_stores_the_batch_variance():
    """Chainer's unbiased factor is m / max(m - 1, 1): 1 at m = 1, where PyTorch's is undefined."""
    chainer = ref.CONVENTIONS["chainer"]
    out = ref.update_running_stats(
        np.zeros(2), np.ones(2), 0, np.array([1.0, 2.0]), np.array([4.0, 4.0]), 1,
        momentum=chainer["momentum"], convention="keras", variance="unbiased",
    )  # fmt: skip
    np.testing.assert_allclose(out.running_var, 0.9 * 1.0 + 0.1 * 4.0)
    with pytest.raises(ValueError, match="needs count >= 2, got 1"):
        ref.update_running_stats(np.zeros(2), np.ones(2), 0, np.zeros(2), np.ones(2), 1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"running_mean": np.zeros(2, dtype=np.int64)}, TypeError, "running_mean must have a"),
        ({"running_var": np.ones(2, dtype=np.int32)}, TypeError, "running_var must have a"),
        ({"count": 0, "variance": "biased"}, ValueError, "count must be at least 1"),
        ({"num_batches_tracked": -1, "momentum": None}, ValueError, "num_batches_tracked"),
    ],
)
def test_running_buffers_and_counts_are_checked(kwargs, error, match):
    args = dict(
        running_mean=np.zeros(2), running_var=np.ones(2), num_batches_tracked=0,
        batch_mean=np.array([1.7, 1.7]), batch_var=np.array([5.0, 5.0]), count=4,
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ref.update_running_stats(**args)


def test_an_update_that_overflows_is_not_written():
    # A finite float32 batch variance whose unbiased estimate overflows (3.3e38 * 2).
    with pytest.warns(RuntimeWarning, match=r"not finite for channel\(s\) \[0\]"):
        with np.errstate(over="ignore"):
            out = ref.update_running_stats(
                np.zeros(2, np.float32), np.ones(2, np.float32), 0,
                np.ones(2, np.float32), np.array([3.3e38, 1.0], np.float32), 2,
            )  # fmt: skip
    assert out.running_var[0] == 1.0 and np.isfinite(out.running_var).all()


def test_numpy_float32_momentum_is_a_number():
    a = ref.update_running_stats(
        np.zeros(2), np.ones(2), 0, np.zeros(2), np.ones(2), 4, momentum=np.float32(0.25)
    )
    b = ref.update_running_stats(
        np.zeros(2), np.ones(2), 0, np.zeros(2), np.ones(2), 4, momentum=0.25
    )
    np.testing.assert_allclose(a.running_var, b.running_var)
