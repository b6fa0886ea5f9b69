"""Forward passes: training vs a textbook oracle, inference vs fold, dtypes, hard numerics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from oracles import bn_numpy, rel_err

import batchnorm.reference as ref


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((8, 3), 1),
        ((4, 3, 5), 1),
        ((2, 3, 4, 5), 1),
        ((2, 3, 2, 3, 2), 1),
        ((2, 4, 5, 3), -1),
        ((2, 2, 3, 2, 4), -1),
        ((3, 4, 5), 2),
    ],
)
@pytest.mark.parametrize("affine", [True, False])
def test_train_forward_matches_textbook(xp, rng, shape, axis, affine):
    x = rng.normal(size=shape) * 4 + 3
    c = shape[axis]
    gamma = rng.normal(size=c) if affine else np.ones(c)
    beta = rng.normal(size=c) if affine else np.zeros(c)
    y, saved = ref.batch_norm_train(
        xp.asarray(x),
        xp.asarray(gamma) if affine else None,
        xp.asarray(beta) if affine else None,
        axis=axis,
        eps=1e-5,
    )
    ax = axis % len(shape)
    assert rel_err(xp.to_numpy(y), bn_numpy(x, gamma, beta, ax, 1e-5)) < 1e-12
    axes = tuple(i for i in range(len(shape)) if i != ax)
    assert rel_err(xp.to_numpy(saved.mean), x.mean(axis=axes)) < 1e-12
    assert rel_err(xp.to_numpy(saved.var), x.var(axis=axes)) < 1e-12  # biased
    assert rel_err(xp.to_numpy(saved.invstd), 1 / np.sqrt(x.var(axis=axes) + 1e-5)) < 1e-12
    assert saved.count == x.size // c
    assert saved.axis == ax and saved.eps == 1e-5


def test_inference_agrees_with_fold(xp, rng):
    x = rng.normal(size=(5, 4, 3, 3))
    rm, rv = rng.normal(size=4), rng.uniform(0.1, 3, size=4)
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    y = xp.to_numpy(
        ref.batch_norm_infer(
            xp.asarray(x),
            xp.asarray(rm),
            xp.asarray(rv),
            xp.asarray(gamma),
            xp.asarray(beta),
            eps=1e-3,
        )
    )
    scale, shift = ref.fold(
        xp.asarray(rm), xp.asarray(rv), xp.asarray(gamma), xp.asarray(beta), eps=1e-3
    )
    folded = x * xp.to_numpy(scale)[None, :, None, None] + xp.to_numpy(shift)[None, :, None, None]
    assert rel_err(y, folded) < 1e-12
    expected = bn_numpy(x, gamma, beta, 1, 1e-3, frozen_mean=rm, frozen_var=rv)
    assert rel_err(y, expected) < 1e-12


def test_fold_without_affine(rng):
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    scale, shift = ref.fold(rm, rv, eps=1e-5)
    assert rel_err(scale, 1 / np.sqrt(rv + 1e-5)) < 1e-14
    assert rel_err(shift, -rm / np.sqrt(rv + 1e-5)) < 1e-14


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_dtypes(rng, dtype):
    torch = pytest.importorskip("torch")
    x64 = rng.normal(size=(16, 3, 8)) * 2 + 1
    x = torch.tensor(x64).to(getattr(torch, dtype))
    gamma = torch.tensor(rng.normal(size=3), dtype=torch.float32)
    beta = torch.tensor(rng.normal(size=3), dtype=torch.float32)
    y, saved = ref.batch_norm_train(x, gamma, beta)
    assert y.dtype == x.dtype  # returned in the input dtype
    assert saved.mean.dtype == torch.float32 and saved.invstd.dtype == torch.float32
    # compare with float64 on the same (rounded) input: only the output rounding remains
    y64, _ = ref.batch_norm_train(x.double(), gamma.double(), beta.double())
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    assert rel_err(y.double().numpy(), y64.numpy()) < tol


def test_float64_is_computed_in_float64(rng):
    x = rng.normal(size=(10, 2)) + 1e8  # needs more than float32's 24 bits
    _, saved = ref.batch_norm_train(x)
    assert saved.mean.dtype == np.float64
    assert rel_err(saved.var, x.var(axis=0)) < 1e-12  # measured 6e-16 over 20 seeds


def test_float32_numpy_stays_float32(rng):
    x = rng.normal(size=(10, 2)).astype(np.float32)
    y, saved = ref.batch_norm_train(x)
    assert y.dtype == np.float32 and saved.mean.dtype == np.float32


def _naive_var(x):
    """The one-pass formula the reference must never use: E[x^2] - E[x]^2."""
    return (x * x).mean(axis=0) - x.mean(axis=0) ** 2


def test_large_offset_variance_is_accurate_in_float32(xp, rng):
    x64 = 1e4 + rng.normal(size=(4096, 4))
    x32 = x64.astype(np.float32)
    true_var = x32.astype(np.float64).var(axis=0)
    _, saved = ref.batch_norm_train(xp.asarray(x32, "float32"))
    got = xp.to_numpy(saved.var).astype(np.float64)
    assert np.max(np.abs(got - true_var) / true_var) <= 1e-4  # measured 6e-6 (NumPy)
    # the test can fail: the one-pass formula in float32 is far off on the same data
    naive = _naive_var(x32).astype(np.float64)
    assert np.max(np.abs(naive - true_var) / true_var) > 1e-3


@pytest.mark.parametrize(("rows", "offset"), [(65536, 1e4), (8192, 1e5)])
def test_many_rows_at_a_large_offset_in_float32(xp, rng, rows, offset):
    """NumPy sums an (m, C) array row by row: plain float32 sums of 65536 values near 1e4 leave
    the mean off by more than the spread (the variance came out 8x too large). The shifted
    first pass and the corrected second keep it at float32 rounding."""
    x32 = (offset + rng.normal(size=(rows, 2))).astype(np.float32)
    true = x32.astype(np.float64)
    stats = ref.batch_stats(xp.asarray(x32, "float32"), 1)
    var, mean = (xp.to_numpy(v).astype(np.float64) for v in (stats.var, stats.mean))
    assert np.max(np.abs(var / true.var(axis=0) - 1)) <= 1e-4  # measured up to 4e-5 (NumPy)
    # The mean to within a float32 ulp at the offset (it is stored in float32).
    assert np.max(np.abs(mean - true.mean(axis=0))) <= np.spacing(np.float32(offset))


@pytest.mark.parametrize(
    "shape", [(3, 4, 1500), (32, 8, 32, 32), (6000, 4)], ids=["rows", "rows-4d", "nc"]
)
def test_corrected_two_pass_in_float32(xp, shape):
    """The second pass's correction is what keeps float32 statistics within 1e-5 of float64:
    the mean of zero-mean data (its smallest, so hardest, output: the shifted first pass alone
    leaves about eps * |K| in it, up to 2e-3 relative here), and the variance at an offset of
    3e5, where dropping the residual^2 term costs 2e-4."""
    axes = tuple(i for i in range(len(shape)) if i != 1)
    for offset in (0.0, 3e5):
        for seed in range(5):
            x = np.random.default_rng(seed).standard_normal(shape) + offset
            if seed == 4:  # the shift K (a channel's first value) is an outlier
                x[0] = offset + 30.0
            x32 = x.astype(np.float32)
            true = x32.astype(np.float64)
            stats = ref.batch_stats(xp.asarray(x32, "float32"), 1)
            mean, var = (xp.to_numpy(v).astype(np.float64) for v in (stats.mean, stats.var))
            assert rel_err(mean, true.mean(axis=axes)) <= 1e-5, (offset, seed)
            assert np.max(np.abs(var / true.var(axis=axes) - 1)) <= 1e-5, (offset, seed)


def test_a_channel_holding_inf_has_an_infinite_mean(xp):
    x = np.arange(120, dtype=np.float64).reshape(40, 3)
    x[0, 0], x[5, 1] = np.inf, -np.inf  # one leads its channel, one does not
    with np.errstate(invalid="ignore"):
        stats = ref.batch_stats(xp.asarray(x), 1)
    mean = xp.to_numpy(stats.mean)
    assert mean[0] == np.inf and mean[1] == -np.inf and mean[2] == x[:, 2].mean()


def test_finite_data_near_the_float_max_keeps_a_finite_mean(xp):
    # x - K overflows here (-3e38 - 3e38) where the plain mean does not: the plain one is kept.
    x = np.array([[3e38, 1.0], [-3e38, 2.0]], np.float32)
    with np.errstate(all="ignore"):
        stats = ref.batch_stats(xp.asarray(x, "float32"), 1)
    mean = xp.to_numpy(stats.mean)
    assert mean[0] == 0.0 and mean[1] == 1.5


def test_constant_data_near_the_float_max_warns_of_nothing():
    # The plain-mean fallback is computed for every channel; as a sum of x / count it cannot
    # overflow where the data is finite, so nothing warns.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype, big in ((np.float32, 3e38), (np.float64, 1.7e308)):
            stats = ref.batch_stats(np.full((6, 2), big, dtype), 1)
            assert (stats.mean == dtype(big)).all() and (stats.var == 0).all()


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_batch_stats_reads_nothing_on_the_host():
    """No value is read back during the statistics (it would synchronise a GPU and break a
    torch.compile graph): they can be formed on meta tensors, which hold no values."""
    torch = pytest.importorskip("torch")
    stats = ref.batch_stats(torch.empty(4, 3, 5, device="meta"), 1)
    assert stats.mean.shape == (3,) and stats.mean.device.type == "meta"
    assert stats.var.shape == (3,)
    # And torch.compile traces it whole: no graph break anywhere in it.
    import torch._dynamo

    explained = torch._dynamo.explain(lambda x: ref.batch_stats(x, 1))(torch.randn(8, 3, 4))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_merge_stats_is_exact(xp, rng):
    x = rng.normal(size=(23, 3)) * 5 + 7
    parts = [x[:0], x[:5], x[5:6], x[6:]]  # uneven, one empty, one single
    counts, means, m2s = [], [], []
    for p in parts:
        counts.append(p.shape[0])
        mean = p.mean(axis=0) if len(p) else np.full(3, np.nan)
        means.append(mean)
        m2s.append(((p - mean) ** 2).sum(axis=0) if len(p) else np.zeros(3))
    merged = ref.merge_stats(
        xp.asarray(np.array(counts, dtype=np.float64)),
        xp.asarray(np.array(means)),
        xp.asarray(np.array(m2s)),
    )
    assert float(merged.count) == 23
    assert rel_err(xp.to_numpy(merged.mean), x.mean(axis=0)) < 1e-13
    assert rel_err(xp.to_numpy(merged.var), x.var(axis=0)) < 1e-13
