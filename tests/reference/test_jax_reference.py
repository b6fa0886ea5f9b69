"""The reference on jax.numpy arrays: NumPy's numbers, eagerly and under ``jax.jit``, and
``jax.grad`` of a loss through the reference's forward equals the reference's own backward.

(The ``xp`` fixture also runs most reference tests on JAX; these are the JAX-only promises.)
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from oracles import rel_err

import batchnorm.reference as ref

jax = pytest.importorskip("jax", reason="jax is not installed (pip install -e '.[frameworks]')")
jnp = pytest.importorskip("jax.numpy")

SHAPES_AXES = [
    ((6, 3), 1),
    ((3, 4, 5), 1),
    ((2, 3, 4, 3), -1),  # channels-last
    ((2, 3), 1),  # m = 2: dx is a near-cancellation
]

#: what test_forward's test_low_precision_dtypes allows against float64 on the same input
LOW_PRECISION_TOL = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


def _x64(enabled: bool):
    """64-bit JAX types on or off for a ``with`` block, in this thread only (the global
    ``jax.config.update("jax_enable_x64", ...)`` would change every other test's dtypes)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    from jax.experimental import disable_x64, enable_x64

    return enable_x64() if enabled else disable_x64()


def _data(rng, shape, axis):
    c = shape[axis]
    return {
        "x": rng.normal(size=shape) * 2.0 + 0.5,
        "gamma": rng.normal(size=c),
        "beta": rng.normal(size=c),
        "dy": rng.normal(size=shape),
        "rm": rng.normal(size=c),
        "rv": rng.uniform(0.5, 2.0, size=c),
    }


def _everything(arrays, *, axis, eps=1e-3):
    """Every public output of the reference, by name: a pure function of arrays (jit-able)."""
    x, gamma, beta, dy = arrays["x"], arrays["gamma"], arrays["beta"], arrays["dy"]
    rm, rv = arrays["rm"], arrays["rv"]
    out = {}
    y, saved = ref.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
    out.update(y=y, mean=saved.mean, var=saved.var, invstd=saved.invstd)
    for name, tm, tv in (("", True, True), ("_mean_const", False, True), ("_both", False, False)):
        grads = ref.backward(dy, saved, through_mean=tm, through_var=tv)
        out.update({f"dx{name}": grads.dx, f"dgamma{name}": grads.dgamma})
    out["dbeta"] = grads.dbeta
    out["infer"] = ref.batch_norm_infer(x, rm, rv, gamma, beta, axis=axis, eps=eps)
    out["dx_infer"] = ref.backward_infer(dy, x, rm, rv, gamma, axis=axis, eps=eps).dx
    staged = ref.staged_backward(dy, x, gamma, axis=axis, eps=eps)
    out.update({f"staged.{f.name}": getattr(staged, f.name) for f in dataclasses.fields(staged)})
    for convention in ("torch", "keras"):
        for variance in ("unbiased", "biased"):
            new = ref.update_running_stats(
                rm, rv, 0, saved.mean, saved.var, saved.count,
                momentum=0.3, convention=convention, variance=variance,
            )  # fmt: skip
            out[f"running_mean.{convention}.{variance}"] = new.running_mean
            out[f"running_var.{convention}.{variance}"] = new.running_var
    scale, shift = ref.fold(rm, rv, gamma, beta, eps=eps)
    out.update(fold_scale=scale, fold_shift=shift)
    if x.ndim == 2:  # the Jacobian is of an (m, C) batch
        out["jacobian"] = ref.jacobian(x, gamma, eps=eps)
    return out


def _to_jax(arrays, dtype):
    return {k: jnp.asarray(v, dtype=dtype) for k, v in arrays.items()}


def _error(name, got, want, arrays, axis, direct=None):
    """Max-norm error relative to the size of the terms the quantity is made of: dx at m = 2
    is a difference of terms of size |gamma * invstd * dy| that nearly cancel, and the staged
    derivation's vanishing term is rounding noise next to the direct term of dl/dmean."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    if name == "staged.dl_dmean_vanishing":
        scale = np.max(np.abs(direct)) + 1.0
    if name.startswith(("dx", "staged.dl_dx", "jacobian")):
        x = arrays["x"]
        axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        invstd = 1 / np.sqrt(x.var(axis=axes) + 1e-3)
        scale = max(scale, np.max(np.abs(arrays["gamma"] * invstd)) * np.max(np.abs(arrays["dy"])))
    return float(np.max(np.abs(got - want)) / max(scale, 1e-300))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_float64_agrees_with_numpy(rng, shape, axis, jit):
    arrays = _data(rng, shape, axis)
    want = _everything(arrays, axis=axis)
    fn = functools.partial(_everything, axis=axis)
    with _x64(True):
        got = (jax.jit(fn) if jit else fn)(_to_jax(arrays, jnp.float64))
        assert set(got) == set(want)
        for name, value in got.items():
            assert isinstance(value, jax.Array), name  # JAX in, JAX out
            assert value.dtype == jnp.float64, name
            assert value.shape == want[name].shape, name
            direct = want["staged.dl_dmean_direct"]
            err = _error(name, value, want[name], arrays, axis, direct)
            assert err <= 1e-12, f"{name}: {err:.1e}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_agrees_with_float64(rng, dtype):
    """Default JAX (no x64): float32 compute for narrow input, output in the input's dtype,
    within the tolerances the torch path is held to (test_forward.py)."""
    shape, axis = (16, 3, 8), 1
    arrays = _data(rng, shape, axis)
    with _x64(False):
        jdt = getattr(jnp, dtype)
        x = jnp.asarray(arrays["x"], dtype=jdt)
        gamma = jnp.asarray(arrays["gamma"], dtype=jnp.float32)
        beta = jnp.asarray(arrays["beta"], dtype=jnp.float32)
        dy = jnp.asarray(arrays["dy"], dtype=jdt)
        run = jax.jit(lambda x, g, b, dy: _train_and_backward(x, g, b, dy, axis))
        y, mean, dx = run(x, gamma, beta, dy)
        assert y.dtype == jdt and dx.dtype == jdt and mean.dtype == jnp.float32
        x_seen = np.asarray(x.astype(jnp.float32), np.float64)  # the rounded input
        dy_seen = np.asarray(dy.astype(jnp.float32), np.float64)
    gamma64, beta64 = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    y64, saved = ref.batch_norm_train(x_seen, gamma64, beta64, axis=axis)
    dx64 = ref.backward(dy_seen, saved).dx
    tol = LOW_PRECISION_TOL[dtype]
    assert rel_err(np.asarray(y.astype(jnp.float32)), y64) < tol
    assert rel_err(np.asarray(dx.astype(jnp.float32)), dx64) < tol


def _train_and_backward(x, gamma, beta, dy, axis):
    y, saved = ref.batch_norm_train(x, gamma, beta, axis=axis)
    return y, saved.mean, ref.backward(dy, saved).dx


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_jax_grad_equals_the_derived_backward(rng, shape, axis, jit):
    """JAX differentiates the forward's own operations (two-pass moments, where, astype);
    the reference's backward is the paper's derivation: they must agree."""
    arrays = _data(rng, shape, axis)
    with _x64(True):
        x, gamma, beta, dy = (jnp.asarray(arrays[k]) for k in ("x", "gamma", "beta", "dy"))

        def loss(x, gamma, beta):
            y, _ = ref.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
            return jnp.sum(y * dy)

        grad = jax.grad(loss, argnums=(0, 1, 2))
        dx, dgamma, dbeta = (jax.jit(grad) if jit else grad)(x, gamma, beta)
        _, saved = ref.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
        derived = ref.backward(dy, saved)
        for name, got, want in (
            ("dx", dx, derived.dx),
            ("dgamma", dgamma, derived.dgamma),
            ("dbeta", dbeta, derived.dbeta),
        ):
            err = _error(name, got, want, arrays, axis)
            assert err <= 1e-12, f"{name}: {err:.1e}"
        # The comparison can fail: with the mean held constant the gradient is another one.
        frozen = ref.backward(dy, saved, through_mean=False).dx
        assert _error("dx", dx, frozen, arrays, axis) > 1e-3


def test_x64_stays_scoped(rng):
    """The tests' x64 switch does not leak: outside it, JAX is back to its default."""
    with _x64(True):
        assert jnp.asarray(1.0).dtype == jnp.float64
    assert jnp.asarray(1.0).dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def test_non_finite_batch_under_jit_leaves_running_statistics(rng):
    """Under jit there is no host value to warn about; the update itself still keeps a
    non-finite channel's old running statistics."""
    x = rng.normal(size=(8, 3))
    x[2, 1] = np.inf
    with _x64(True):

        @jax.jit
        def step(x, rm, rv):
            _, saved = ref.batch_norm_train(x)
            return ref.update_running_stats(rm, rv, 0, saved.mean, saved.var, saved.count)[:2]

        rm, rv = step(jnp.asarray(x), jnp.zeros(3), jnp.ones(3))
    expected_mean = 0.1 * x.mean(axis=0)
    np.testing.assert_array_equal(np.isfinite(np.asarray(rm)), [True, True, True])
    assert float(rm[1]) == 0.0 and float(rv[1]) == 1.0
    assert rel_err(np.asarray(rm)[[0, 2]], expected_mean[[0, 2]]) < 1e-12


def test_masked_batch_norm_under_jit_and_grad(rng):
    """The count of real positions is traced under jit (not checked on the host); the numbers
    are NumPy's, and jax.grad through the masked forward is the masked backward."""
    x = rng.normal(size=(4, 3, 5))
    gamma, beta, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    mask = rng.random((4, 5)) > 0.3

    def run(x, gamma, beta, mask, dy):
        y, saved = ref.batch_norm_train(x, gamma, beta, mask=mask)
        grads = ref.backward(dy, saved)
        return y, grads.dx, grads.dgamma, grads.dbeta

    want = run(x, gamma, beta, mask, dy)
    with _x64(True):
        args = [jnp.asarray(a) for a in (x, gamma, beta, mask, dy)]
        got = jax.jit(run)(*args)

        def loss(x):
            return jnp.sum(ref.batch_norm_train(x, args[1], args[2], mask=args[3])[0] * args[4])

        dx = jax.grad(loss)(args[0])
    for name, g, w in zip(("y", "dx", "dgamma", "dbeta"), got, want, strict=True):
        assert rel_err(np.asarray(g), w) < 1e-12, name
    assert rel_err(np.asarray(dx), want[1]) < 1e-12
    assert np.all(np.asarray(got[0])[~np.broadcast_to(mask[:, None, :], x.shape)] == 0)


@pytest.mark.parametrize("pad", [np.nan, np.inf, 1e30])
def test_jax_grad_of_a_masked_forward_ignores_the_padding(rng, pad):
    """The padding of a masked batch may hold anything. The forward selected it away only
    after computing (x - mean) * invstd there, and reverse mode then multiplied that
    derivative by the select's zero cotangent: 0 * NaN, and every gradient was NaN (26 of 26
    real positions). With the padding replaced first, jax.grad equals the reference's
    backward, whatever the padding holds."""
    x = rng.normal(size=(3, 2, 5))
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    x.transpose(0, 2, 1)[~mask] = pad
    dy = rng.normal(size=x.shape)
    with _x64(True):
        xj, mj = jnp.asarray(x), jnp.asarray(mask)

        def loss(x, gamma):
            y, _ = ref.batch_norm_train(x, gamma, jnp.zeros(2), mask=mj)
            return jnp.sum(y * dy)

        dx, dgamma = jax.grad(loss, argnums=(0, 1))(xj, jnp.ones(2))
        _, saved = ref.batch_norm_train(x, np.ones(2), np.zeros(2), mask=mask)
        derived = ref.backward(dy, saved)
        real = mask[:, None, :].repeat(2, axis=1)
        assert np.isfinite(np.asarray(dx)).all()
        np.testing.assert_allclose(np.asarray(dx)[real], derived.dx[real], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(dgamma), derived.dgamma, rtol=1e-10)
