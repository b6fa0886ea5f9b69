"""The closed-form Jacobian (seeds/001) against finite differences and its structure."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import bn_numpy, fd_close, numerical_grad

import batchnorm.reference as ref
from batchnorm._xp import to_channel_rows


@pytest.mark.parametrize("shape,axis", [((5, 2), 1), ((2, 3, 3), 1), ((2, 2, 3, 2), -1)])
def test_jacobian_matches_finite_differences(xp, rng, shape, axis):
    x = rng.normal(size=shape) * 2 + 1
    gamma = rng.normal(size=shape[axis])
    jac = xp.to_numpy(ref.jacobian(xp.asarray(x), xp.asarray(gamma), axis=axis, eps=1e-3))
    ax = axis % len(shape)
    rows_x = to_channel_rows(x, ax, np)
    channels, m = rows_x.shape
    assert jac.shape == (channels, m, m)
    for c in range(channels):
        for i in range(m):

            def out_i(v, c=c, i=i):
                y = bn_numpy(v, gamma, np.zeros_like(gamma), ax, 1e-3)
                return float(to_channel_rows(y, ax, np)[c, i])

            fd = to_channel_rows(numerical_grad(out_i, x), ax, np)
            assert fd_close(jac[c, i], fd[c])
            # and y_i of channel c does not depend on other channels
            others = np.delete(fd, c, axis=0)
            assert np.max(np.abs(others)) < 1e-8


def test_jacobian_structure(rng):
    x = rng.normal(size=(9, 3)) * 3 - 2
    gamma = rng.normal(size=3)
    jac = ref.jacobian(x, gamma, eps=1e-5)
    assert np.allclose(jac, np.transpose(jac, (0, 2, 1)), rtol=0, atol=1e-14)  # symmetric
    # each row sums to 0: the "triangle" cancels for a uniform shift of the batch
    scale = np.max(np.abs(jac))
    assert np.max(np.abs(jac.sum(axis=2))) < 1e-13 * scale


def test_x_hat_spans_null_space_when_eps_is_zero(rng):
    x = rng.normal(size=(7, 2)) * 2 + 5
    jac = ref.jacobian(x, eps=0.0)
    x_hat = (x - x.mean(0)) / x.std(0)
    for c in range(2):
        assert np.max(np.abs(jac[c] @ x_hat[:, c])) < 1e-13
    # with eps > 0 it does not: the test can fail
    jac_eps = ref.jacobian(x, eps=1.0)
    assert np.max(np.abs(jac_eps[0] @ x_hat[:, 0])) > 1e-3


def test_jacobian_transpose_times_dy_is_backward(xp, rng):
    x = rng.normal(size=(6, 2))
    dy = rng.normal(size=(6, 2))
    gamma = rng.normal(size=2)
    jac = xp.to_numpy(ref.jacobian(xp.asarray(x), xp.asarray(gamma)))
    _, saved = ref.batch_norm_train(xp.asarray(x), xp.asarray(gamma))
    dx = xp.to_numpy(ref.backward(xp.asarray(dy), saved).dx)
    for c in range(2):
        assert np.allclose(jac[c].T @ dy[:, c], dx[:, c], rtol=1e-12, atol=1e-14)
