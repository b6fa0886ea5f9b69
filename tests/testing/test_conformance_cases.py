"""The conformance suite's case table, tolerances, data and error measure, and ``check``'s
refusal of arguments that would hide a mistake."""

from __future__ import annotations

import numpy as np
import pytest
from conform_impls import course_adapter, fixture

from batchnorm import testing as bt
from batchnorm.testing.cases import round_to_dtype
from batchnorm.testing.mistakes import implied_stats, rel_error

try:
    import torch
except ImportError:  # the NumPy half of the suite must work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def test_case_table_covers_the_awkward_cases():
    cases = bt.CASES
    assert {len(c.shape) for c in cases} == {2, 3, 4, 5}
    assert any(c.m == 2 for c in cases)
    assert any(c.shape[0] == 1 and c.m > 1 for c in cases)
    assert any(c.large_offset for c in cases)
    assert any(c.scale**2 < c.eps / 100 for c in cases), "a variance far below eps"
    assert max(c.eps for c in cases) >= 0.1 and min(c.eps for c in cases) <= 1e-8
    assert {c.channel_axis == len(c.shape) - 1 for c in cases if len(c.shape) > 2} == {True, False}
    assert {c.affine for c in cases} == {True, False}
    assert {c.dtype for c in cases} == set(bt.DTYPES)
    assert len({c.name for c in cases}) == len(cases)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (1, 3)}, "m must be >= 2"),
        ({"shape": (4, 3), "steps": 0}, "steps must be >= 1"),
        ({"shape": (4, 3), "dtype": "int8"}, "dtype must be one of"),
        ({"shape": (4, 3), "axis": 0}, "batch axis"),
    ],
)
def test_a_case_that_cannot_train_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bt.Case("bad", **kwargs)


def test_tolerances_follow_the_precision_of_each_dtype():
    by_name = {c.name: c for c in bt.CASES}
    tol = {
        d: bt.tolerance(by_name[n], "dx")
        for d, n in (
            ("float64", "rank4-f64"),
            ("float32", "rank4"),
            ("float16", "rank4-f16"),
            ("bfloat16", "rank4-bf16"),
        )
    }
    assert tol["float64"] < 1e-12 < tol["float32"] < 1e-4 < tol["float16"] < tol["bfloat16"] < 0.05
    # Centring a batch 1e4 standard deviations from 0 is ill-conditioned: looser there...
    assert bt.tolerance(by_name["large-offset"], "dx") > 100 * tol["float32"]
    # ...but a mean is a mean: its running average is held to the plain float32 bound.
    assert bt.tolerance(by_name["large-offset"], "running_mean") < 1e-5


def test_case_data_is_deterministic_and_exact_in_its_dtype():
    for case in bt.CASES:
        a, b = bt.make_data(case), bt.make_data(case)
        for x, y in zip((*a.xs, *a.dys, a.x_eval), (*b.xs, *b.dys, b.x_eval), strict=True):
            np.testing.assert_array_equal(x, y)
            assert x.shape == case.shape
            np.testing.assert_array_equal(round_to_dtype(x, case.dtype), x)


@needs_torch
def test_bfloat16_rounding_matches_torch(rng):
    values = rng.standard_normal(10_000) * 10.0 ** rng.integers(-6, 6, 10_000)
    ours = round_to_dtype(values, "bfloat16")
    theirs = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_implied_stats_recover_the_moments_of_a_correct_forward(rng):
    from batchnorm import reference as ref

    x = rng.standard_normal((32, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 100.0]
    gamma, beta = np.array([0.5, -2.0, 1.5]), np.array([0.1, 0.2, -0.3])
    y, saved = ref.batch_norm_train(x, gamma, beta, axis=1, eps=1e-5)
    implied = implied_stats(x, y, gamma, beta, 1)
    np.testing.assert_allclose(implied.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(implied.var(1e-5), x.var(axis=0), rtol=1e-10)
    assert implied_stats(x, np.full_like(y, np.nan), gamma, beta, 1) is None


def test_rel_error_is_infinite_for_nan_and_for_a_wrong_shape():
    assert rel_error(np.array([1.0, np.nan]), np.array([1.0, 2.0])) == np.inf
    assert rel_error(np.ones((2, 3)), np.ones((3, 2))) == np.inf
    assert rel_error(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == pytest.approx(0.25)
    assert rel_error(np.array([1.0, 2.5]), np.array([1.0, 2.0]), scale=5.0) == pytest.approx(0.1)


def test_check_rejects_a_momentum_that_hides_the_convention():
    adapter = course_adapter(fixture("course"))
    with pytest.raises(ValueError, match="0.5"):
        bt.check(adapter, momentum=0.5)
    with pytest.raises(ValueError, match="momentum_convention"):
        bt.check(adapter, momentum_convention="pytorch")
