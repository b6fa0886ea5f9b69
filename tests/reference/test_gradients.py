"""Backward vs float64 finite differences, staged == compact, moments-as-constants switches."""

from __future__ import annotations

import numpy as np
import pytest
from oracles import bn_numpy, fd_close, numerical_grad, rel_err

import batchnorm.reference as ref

SHAPES_AXES = [
    ((5, 3), 1),
    ((4, 3, 5), 1),
    ((3, 2, 3, 4), 1),
    ((2, 2, 2, 3, 2), 1),
    ((3, 4, 5, 2), -1),
    ((2, 3, 2), -1),
    ((2, 1), 1),  # m = 2: the smallest training batch
    ((1, 2, 4), 1),  # N = 1 with spatial > 1
]


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_backward_matches_finite_differences(xp, rng, shape, axis):
    channels = shape[axis]
    x = rng.normal(size=shape) * 2.0 + 0.5
    gamma = rng.normal(size=channels)
    beta = rng.normal(size=channels)
    dy = rng.normal(size=shape)
    eps = 1e-3
    _, saved = ref.batch_norm_train(
        xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), axis=axis, eps=eps
    )
    grads = ref.backward(xp.asarray(dy), saved)
    ax = axis % len(shape)

    def loss_x(v):
        return float(np.sum(bn_numpy(v, gamma, beta, ax, eps) * dy))

    def loss_g(v):
        return float(np.sum(bn_numpy(x, v, beta, ax, eps) * dy))

    def loss_b(v):
        return float(np.sum(bn_numpy(x, gamma, v, ax, eps) * dy))

    assert fd_close(xp.to_numpy(grads.dx), numerical_grad(loss_x, x))
    assert fd_close(xp.to_numpy(grads.dgamma), numerical_grad(loss_g, gamma))
    assert fd_close(xp.to_numpy(grads.dbeta), numerical_grad(loss_b, beta))


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_staged_equals_compact(xp, rng, shape, axis):
    x = rng.normal(size=shape) * 3 - 1
    gamma = rng.normal(size=shape[axis])
    dy = rng.normal(size=shape)
    _, saved = ref.batch_norm_train(xp.asarray(x), xp.asarray(gamma), None, axis=axis)
    grads = ref.backward(xp.asarray(dy), saved)
    staged = ref.staged_backward(xp.asarray(dy), xp.asarray(x), xp.asarray(gamma), axis=axis)
    # dx is a difference of terms of size |gamma * invstd * dy|; at m = 2 they nearly cancel,
    # so "relative" is measured against the size of the terms, not of their tiny difference.
    dxhat = xp.to_numpy(staged.dl_dxhat)
    invstd = xp.to_numpy(staged.invstd)
    shape = [1] * dxhat.ndim
    shape[axis] = -1
    term_scale = np.max(np.abs(dxhat * invstd.reshape(shape)))
    err = np.max(np.abs(xp.to_numpy(staged.dl_dx) - xp.to_numpy(grads.dx)))
    assert err <= 1e-12 * term_scale
    assert rel_err(xp.to_numpy(staged.dl_dgamma), xp.to_numpy(grads.dgamma)) < 1e-12
    assert rel_err(xp.to_numpy(staged.dl_dbeta), xp.to_numpy(grads.dbeta)) < 1e-12
    # The second term of dl/dmu multiplies sum(x - mu) = 0: it vanishes to rounding, relative
    # to the direct term it sits next to.
    vanishing = np.abs(xp.to_numpy(staged.dl_dmean_vanishing))
    direct = np.abs(xp.to_numpy(staged.dl_dmean_direct)) + 1.0
    assert np.all(vanishing <= 1e-12 * direct)


def test_staged_vanishing_term_is_not_trivially_zero(rng):
    """The term is computed, not hard-coded: at a mean shifted off mu it would not vanish."""
    x = rng.normal(size=(6, 2))
    dy = rng.normal(size=(6, 2))
    staged = ref.staged_backward(dy, x)
    # dl/dvar is non-zero, so the term is small only because sum(x - mu) is.
    assert np.all(np.abs(staged.dl_dvar) > 1e-6)


@pytest.mark.parametrize("through_mean,through_var", [(False, True), (True, False), (False, False)])
def test_moments_as_constants(xp, rng, through_mean, through_var):
    shape, axis, eps = (6, 3, 2), 1, 1e-3
    x = rng.normal(size=shape) * 1.5 + 2
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    dy = rng.normal(size=shape)
    _, saved = ref.batch_norm_train(
        xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), axis=axis, eps=eps
    )
    dx = xp.to_numpy(
        ref.backward(xp.asarray(dy), saved, through_mean=through_mean, through_var=through_var).dx
    )
    mean0 = x.mean(axis=(0, 2))
    var0 = x.var(axis=(0, 2))
    frozen_mean = None if through_mean else mean0
    frozen_var = None if through_var else var0

    def loss_frozen(v):
        return float(np.sum(bn_numpy(v, gamma, beta, axis, eps, frozen_mean, frozen_var) * dy))

    def loss_true(v):
        return float(np.sum(bn_numpy(v, gamma, beta, axis, eps) * dy))

    # Equal to the gradient of the graph in which that moment is a constant ...
    assert fd_close(dx, numerical_grad(loss_frozen, x))
    # ... and therefore NOT the true gradient.
    assert rel_err(dx, numerical_grad(loss_true, x)) > 1e-2


def test_moments_as_constants_vs_torch_detach(rng):
    """A second, independent oracle: torch autograd with the moment detached."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(rng.normal(size=(8, 3)), requires_grad=True)
    dy = torch.tensor(rng.normal(size=(8, 3)))
    eps = 1e-5
    for through_mean, through_var in [(False, True), (True, False), (False, False)]:
        mean = x.mean(0) if through_mean else x.mean(0).detach()
        var = ((x - mean) ** 2).mean(0)
        var = var if through_var else var.detach()
        y = (x - mean) / torch.sqrt(var + eps)
        (expected,) = torch.autograd.grad(y, x, dy)
        _, saved = ref.batch_norm_train(x.detach(), eps=eps)
        got = ref.backward(dy, saved, through_mean=through_mean, through_var=through_var).dx
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_backward_infer_matches_finite_differences(rng):
    x = rng.normal(size=(4, 3, 2))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    gamma, beta, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=(4, 3, 2))
    grads = ref.backward_infer(dy, x, rm, rv, gamma, eps=1e-5)

    def loss(v):
        return float(np.sum(ref.batch_norm_infer(v, rm, rv, gamma, beta, eps=1e-5) * dy))

    def loss_g(g):
        return float(np.sum(ref.batch_norm_infer(x, rm, rv, g, beta, eps=1e-5) * dy))

    assert fd_close(grads.dx, numerical_grad(loss, x))
    assert fd_close(grads.dgamma, numerical_grad(loss_g, gamma))
    assert rel_err(grads.dbeta, dy.sum(axis=(0, 2))) < 1e-12


def test_scale_invariance(xp, rng):
    """Paper section 3.3: BN(a x) = BN(x) and d BN(a x)/d(a x) = (1/a) d BN(x)/dx (eps = 0)."""
    x = rng.normal(size=(7, 4))
    dy = rng.normal(size=(7, 4))
    a = 37.5
    eps = 1e-12
    y1, s1 = ref.batch_norm_train(xp.asarray(x), eps=eps)
    y2, s2 = ref.batch_norm_train(xp.asarray(a * x), eps=eps)
    assert rel_err(xp.to_numpy(y2), xp.to_numpy(y1)) < 1e-9
    dx1 = xp.to_numpy(ref.backward(xp.asarray(dy), s1).dx)
    dx2 = xp.to_numpy(ref.backward(xp.asarray(dy), s2).dx)
    assert rel_err(dx2, dx1 / a) < 1e-9


def test_santurkar_theorem_4_1_equality(rng):
    """Santurkar et al. (2018), Thm 4.1 with eps = 0 and one channel:

    ||grad_x L||^2 = gamma^2 / var * (||g||^2 - (1/m) <1, g>^2 - (1/m) <g, x_hat>^2)
    where g = dL/dy. It holds with equality (the paper's bound drops the last two terms).
    """
    m = 16
    x = rng.normal(size=(m, 1)) * 3 + 2
    g = rng.normal(size=(m, 1))
    gamma = np.array([1.7])
    jac = ref.jacobian(x, gamma, eps=0.0)[0]
    grad_x = jac.T @ g[:, 0]
    var = x.var()
    x_hat = (x[:, 0] - x.mean()) / np.sqrt(var)
    gv = g[:, 0]
    rhs = gamma[0] ** 2 / var * (gv @ gv - gv.sum() ** 2 / m - (gv @ x_hat) ** 2 / m)
    assert abs(grad_x @ grad_x - rhs) <= 1e-12 * rhs
    # and the bound is strict unless g is orthogonal to 1 and x_hat:
    assert grad_x @ grad_x < gamma[0] ** 2 / var * (gv @ gv)
