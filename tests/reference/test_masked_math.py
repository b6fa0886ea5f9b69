"""The reference's masked batch norm: batch norm of the real positions, its backward against
float64 central finite differences, and the torch layers' masked path."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn


def _case(rng, shape=(4, 3, 7), p=0.6, pad=np.nan):
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.random((shape[0], *shape[2:])) < p
    mask[0, 0] = mask[1, 1] = True  # at least two real values
    return np.where(np.expand_dims(mask, 1), x, pad), mask


def _real(a, mask):
    return np.moveaxis(a, 1, -1)[mask]


def test_equals_batch_norm_of_the_real_positions(xp, rng):
    x, mask = _case(rng)
    gamma, beta = rng.random(3) + 0.5, rng.normal(size=3)
    y, saved = bn.batch_norm_train(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta),
                                   mask=xp.asarray(mask, "bool"))  # fmt: skip
    y = xp.to_numpy(y)
    want, want_saved = bn.batch_norm_train(_real(x, mask), gamma, beta, axis=1)
    np.testing.assert_allclose(_real(y, mask), want, rtol=0, atol=1e-12)
    assert np.all(_real(y, ~mask) == 0)
    assert saved.count == mask.sum()
    np.testing.assert_allclose(xp.to_numpy(saved.var), want_saved.var, rtol=0, atol=1e-12)
    dy = rng.normal(size=x.shape)
    for through_mean, through_var in [(True, True), (False, True), (True, False)]:
        g = bn.backward(xp.asarray(dy), saved, through_mean=through_mean, through_var=through_var)
        w = bn.backward(_real(dy, mask), want_saved, through_mean=through_mean,
                        through_var=through_var)  # fmt: skip
        np.testing.assert_allclose(_real(xp.to_numpy(g.dx), mask), w.dx, rtol=0, atol=1e-12)
        assert np.all(_real(xp.to_numpy(g.dx), ~mask) == 0)
        np.testing.assert_allclose(xp.to_numpy(g.dgamma), w.dgamma, rtol=0, atol=1e-12)
        np.testing.assert_allclose(xp.to_numpy(g.dbeta), w.dbeta, rtol=0, atol=1e-12)


def test_backward_against_finite_differences(rng):
    x, mask = _case(rng, shape=(3, 2, 5), pad=0.0)
    gamma, beta = rng.random(2) + 0.5, rng.normal(size=2)
    dy = rng.normal(size=x.shape)
    _, saved = bn.batch_norm_train(x, gamma, beta, mask=mask)
    dx = bn.backward(dy, saved).dx
    h = 1e-6
    for index in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[index] = h
        plus = bn.batch_norm_train(x + e, gamma, beta, mask=mask)[0]
        minus = bn.batch_norm_train(x - e, gamma, beta, mask=mask)[0]
        fd = np.sum((plus - minus) * dy) / (2 * h)
        assert abs(fd - dx[index]) < 1e-7, (index, fd, dx[index])


def test_padding_changes_nothing(rng):
    x, mask = _case(rng, pad=np.inf)
    other = np.where(np.expand_dims(mask, 1), x, -1e300)
    longer = np.concatenate([x, np.full((4, 3, 5), np.nan)], 2)
    longer_mask = np.concatenate([mask, np.zeros((4, 5), bool)], 1)
    y = bn.batch_norm_train(x, mask=mask)[0]
    np.testing.assert_array_equal(y, bn.batch_norm_train(other, mask=mask)[0])
    # A longer row changes the summation's order (pairwise sums), so only rounding may differ.
    y_longer = bn.batch_norm_train(longer, mask=longer_mask)[0][..., :7]
    np.testing.assert_allclose(y, y_longer, rtol=0, atol=1e-14)


def test_agrees_with_the_torch_layers_gather_path(rng):
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bt

    x, mask = _case(rng)
    y_ref = bn.batch_norm_train(x, mask=mask)[0]
    y = bt.batch_norm(torch.as_tensor(x), None, None, training=True, backend="reference",
                      mask=torch.as_tensor(mask))  # fmt: skip
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=0, atol=1e-12)


def test_bad_masks_and_backends(rng):
    x, mask = _case(rng)
    with pytest.raises(ValueError, match=r"without the channel axis, \(4, 7\)"):
        bn.batch_norm_train(x, mask=mask[:, :5])
    with pytest.raises(TypeError, match="boolean"):
        bn.batch_norm_train(x, mask=mask.astype(float))
    one = np.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 real value"):
        bn.batch_norm_train(x, mask=one)

    class Plain(type(bn.reference.REFERENCE)):  # the reference's stages, less the option
        name = "plain"
        supports_mask = False

    with pytest.raises(ValueError, match="'plain' has no masked stages"):
        bn.batch_norm_train(x, mask=mask, backend=Plain())
