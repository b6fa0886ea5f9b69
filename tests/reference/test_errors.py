"""Every bad input raises a clear ValueError/TypeError naming the offending value."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import bn_numpy

import batchnorm.reference as ref


def test_fewer_than_two_values_per_channel(xp):
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        ref.batch_norm_train(xp.asarray(np.ones((1, 3))))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.batch_norm_train(xp.asarray(np.ones((1, 3, 1, 1))))
    # zero-size batch
    with pytest.raises(ValueError, match=r"0 value\(s\) per channel"):
        ref.batch_norm_train(xp.asarray(np.ones((0, 3))))
    # inference accepts a single value per channel, and normalises it with the running stats
    x, mean, var = np.array([[1.0, 2.0, 3.0]]), np.array([0.5, 1.0, 1.5]), np.array([1, 4, 0.25])
    y = ref.batch_norm_infer(xp.asarray(x), xp.asarray(mean), xp.asarray(var))
    want = bn_numpy(x, np.ones(3), np.zeros(3), 1, 1e-5, frozen_mean=mean, frozen_var=var)
    np.testing.assert_allclose(xp.to_numpy(y), want, rtol=1e-12)


@pytest.mark.parametrize("name", ["gamma", "beta"])
def test_affine_length_mismatch(xp, name):
    x = xp.asarray(np.random.default_rng(0).normal(size=(4, 3, 2)))
    kwargs = {name: xp.asarray(np.ones(4))}
    with pytest.raises(ValueError, match=r"must have shape \(3,\).*got shape \(4,\)"):
        ref.batch_norm_train(x, **kwargs)


def test_vectors_of_another_library_or_not_arrays():
    """NumPy input with a torch gamma failed inside the computation ("'Tensor' object has no
    attribute 'astype'"), a list gamma with "'list' object has no attribute 'shape'"."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(8, 4))
    with pytest.raises(TypeError, match=r"weight \(gamma\) is a torch.Tensor but the input is"):
        ref.batch_norm_train(x, torch.ones(4), torch.zeros(4))
    with pytest.raises(TypeError, match="running_var is a numpy.ndarray but the input is a torch"):
        ref.batch_norm_infer(torch.ones(8, 4), torch.zeros(4), np.ones(4))
    with pytest.raises(TypeError, match=r"bias \(beta\) must be an array of 4 values, got list"):
        ref.batch_norm_train(x, None, [0.0] * 4)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_length_mismatch(xp, which):
    x = xp.asarray(np.ones((4, 3)))
    stats = {"running_mean": xp.asarray(np.zeros(3)), "running_var": xp.asarray(np.ones(3))}
    stats[which] = xp.asarray(np.ones(2))
    with pytest.raises(ValueError, match=rf"{which} must have shape \(3,\)"):
        ref.batch_norm_infer(x, **stats)


@pytest.mark.parametrize("axis", [3, -4, 0, -3])
def test_axis_out_of_range(xp, axis):
    x = xp.asarray(np.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="axis"):
        ref.batch_norm_train(x, axis=axis)


def test_axis_must_be_int(xp):
    with pytest.raises(TypeError, match="axis must be an int"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3))), axis=1.0)


def test_rank_one_input(xp):
    with pytest.raises(ValueError, match="rank >= 2"):
        ref.batch_norm_train(xp.asarray(np.ones(4)))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_eps(xp, eps):
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3))), eps=eps)


def test_eps_must_be_a_number(xp):
    with pytest.raises(TypeError, match="eps must be a real number"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3))), eps="small")


def test_non_floating_dtype(xp):
    with pytest.raises(TypeError, match="floating-point dtype"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3)), "int64"))


def test_non_floating_gamma(xp):
    with pytest.raises(TypeError, match=r"weight \(gamma\) must have a floating-point dtype"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3))), xp.asarray(np.ones(3), "int64"))


def test_dy_shape_mismatch(xp):
    x = np.random.default_rng(0).normal(size=(4, 3))
    _, saved = ref.batch_norm_train(xp.asarray(x))
    with pytest.raises(ValueError, match=r"grad_output \(dy\) has shape \(4, 2\)"):
        ref.backward(xp.asarray(np.ones((4, 2))), saved)
    with pytest.raises(ValueError, match="grad_output"):
        ref.staged_backward(xp.asarray(np.ones((3, 3))), xp.asarray(x))


def test_bad_fold_input():
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        ref.fold(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="eps"):
        ref.fold(np.zeros(3), np.ones(3), eps=-1e-5)
    with pytest.raises(ValueError, match=r"running_mean must be a vector \(C,\), got shape \(\)"):
        ref.fold(np.float64(0.0), np.ones(3))
    with pytest.raises(TypeError, match="running_var must have a floating-point dtype"):
        ref.fold(np.zeros(3), np.ones(3, dtype=np.int64))
    # eps = 0 is an inference batch_norm_infer accepts, so fold reproduces it too
    scale, shift = ref.fold(np.zeros(3), np.full(3, 4.0), eps=0)
    np.testing.assert_array_equal(scale, np.full(3, 0.5))


def test_eps_as_a_numeric_string_is_refused_not_used(xp):
    # float("1e-5") passes a float() check; the arithmetic after it would then fail or differ.
    with pytest.raises(TypeError, match="eps must be a real number, got '1e-5'"):
        ref.batch_norm_train(xp.asarray(np.ones((4, 3))), eps="1e-5")


def test_jacobian_and_staged_backward_check_gamma_as_the_forward(xp):
    x = xp.asarray(np.random.default_rng(0).normal(size=(4, 3, 2)))
    for gamma in (np.ones(1), np.ones(2), np.ones((3, 1))):
        g = xp.asarray(gamma)
        with pytest.raises(ValueError, match=r"weight \(gamma\) must have shape \(3,\)"):
            ref.jacobian(x, g)
        with pytest.raises(ValueError, match=r"weight \(gamma\) must have shape \(3,\)"):
            ref.staged_backward(x, x, g)
    with pytest.raises(ValueError, match="at least 1 value per channel"):
        ref.jacobian(xp.asarray(np.zeros((0, 3))))


def test_inference_without_running_statistics_says_so(xp):
    x = xp.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match="running_mean=None, running_var=None"):
        ref.batch_norm_infer(x, None, None)
    with pytest.raises(ValueError, match="running_var=None"):
        ref.backward_infer(x, x, xp.asarray(np.zeros(3)), None)


def test_numpy_integer_axis_is_an_int():
    x = np.random.default_rng(1).normal(size=(4, 3, 2))
    y, _ = ref.batch_norm_train(x, axis=np.int64(-1))
    np.testing.assert_array_equal(y, ref.batch_norm_train(x, axis=-1)[0])


def test_stage_functions_take_a_negative_channel_axis_and_refuse_the_batch_axis():
    """``batch_stats(x, -1)`` raised a bare IndexError, ``backward_reduce(..., axis=-1)``
    summed over every channel into scalars (120.0 for [40, 40, 40]), and axis 0 reduced over
    the batch axis without a word. They now take the channel axis as batch_norm_train does."""
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(4, 5, 3)), np.ones((4, 5, 3))
    stats = ref.batch_stats(x, -1)
    want = ref.batch_stats(x, 2)
    np.testing.assert_array_equal(stats.mean, want.mean)
    np.testing.assert_array_equal(stats.var, want.var)
    assert stats.mean.shape == (3,) and stats.count == 20
    invstd = 1.0 / np.sqrt(want.var + 1e-5)
    got = ref.backward_reduce(dy, x, want.mean, invstd, -1)
    for a, b in zip(got, ref.backward_reduce(dy, x, want.mean, invstd, 2), strict=True):
        assert a.shape == (3,)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="axis 0 is the batch axis"):
        ref.batch_stats(x, 0)
    with pytest.raises(ValueError, match="out of range"):
        ref.backward_reduce(dy, x, want.mean, invstd, 3)


def test_mask_or_grad_output_of_another_library():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(4, 3, 5))
    mask = np.ones((4, 5), bool)
    with pytest.raises(TypeError, match="mask is a torch.Tensor but the input is a numpy"):
        ref.batch_norm_train(x, mask=torch.from_numpy(mask))
    _, saved = ref.batch_norm_train(x, mask=mask)
    with pytest.raises(TypeError, match=r"grad_output \(dy\) is a torch.Tensor but the input"):
        ref.backward(torch.ones(4, 3, 5, dtype=torch.float64), saved)
