"""Each classic mistake, written as a mutant of a correct course-style implementation
(``fixtures/course.py``), is rejected *and named*; the conventions of the running statistics
are inferred and reported; one-pass is named only where it fits."""

from __future__ import annotations

import pytest
from conform_impls import course_adapter, failures_by_quantity, mutant, source, write

from batchnorm import testing as bt

# Each mutant replaces exact lines of fixtures/course.py (PyTorch's momentum meaning and an
# unbiased running variance: the declared conventions below are relative to those).
DX = "dx = (dx_hat - dx_hat.mean(axis=0) - x_hat * (dx_hat * x_hat).mean(axis=0)) / std"
RUNNING = (
    "running_mean = (1 - momentum) * running_mean + momentum * mean\n"
    "        running_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)"
)

# name -> (line replaced, replacement, declared conventions, {quantity: expected mistake})
MUTANTS = {
    "no gradient through the mean": (
        DX,
        "dx = (dx_hat - x_hat * (dx_hat * x_hat).mean(axis=0)) / std",
        {},
        {"dx": "mean_constant"},
    ),
    "no gradient through the variance": (
        DX,
        "dx = (dx_hat - dx_hat.mean(axis=0)) / std",
        {},
        {"dx": "var_constant"},
    ),
    "no gradient through either moment": (DX, "dx = dx_hat / std", {}, {"dx": "both_constant"}),
    "eps ignored (hard-coded 1e-5)": (
        'eps = bn_param.get("eps", 1e-5)',
        "eps = 1e-5",
        {},
        {
            "forward(train)": "eps_fixed",
            "forward(eval)": "eval_eps_fixed",
            "dx": "eps_fixed",
            "dgamma": "eps_fixed",
        },
    ),
    "eps outside the sqrt": (
        "std = np.sqrt(var + eps)",
        "std = np.sqrt(var) + eps",
        {},
        {
            "forward(train)": "eps_outside_sqrt",
            "dx": "eps_outside_sqrt",
            "dgamma": "eps_outside_sqrt",
        },
    ),
    "eps left out": (
        "std = np.sqrt(var + eps)",
        "std = np.sqrt(var)",
        {},
        {"forward(train)": "eps_missing", "dx": "eps_missing", "dgamma": "eps_missing"},
    ),
    "eval leaves eps out": (
        "out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta",
        "out = gamma * (x - running_mean) / np.sqrt(running_var) + beta",
        {},
        {"forward(eval)": "eval_eps_missing"},
    ),
    "biased running variance, unbiased declared": (
        "momentum * var * m / (m - 1)",
        "momentum * var",
        {"momentum_convention": "torch", "running_var": "unbiased"},
        {"running_var": "biased_running_var"},
    ),
    "unbiased running variance, biased declared": (
        "x_hat = (x - mean) / std",
        "x_hat = (x - mean) / std",
        {"momentum_convention": "torch", "running_var": "biased"},
        {"running_var": "unbiased_running_var"},
    ),
    "momentum weighs the old value, PyTorch meaning declared": (
        RUNNING,
        "running_mean = momentum * running_mean + (1 - momentum) * mean\n"
        "        running_var = momentum * running_var + (1 - momentum) * var * m / (m - 1)",
        {"momentum_convention": "torch", "running_var": "unbiased"},
        {"running_mean": "momentum_old", "running_var": "momentum_old"},
    ),
    "momentum weighs the new batch, Keras meaning declared": (
        "x_hat = (x - mean) / std",
        "x_hat = (x - mean) / std",
        {"momentum_convention": "keras", "running_var": "unbiased"},
        {"running_mean": "momentum_new", "running_var": "momentum_new"},
    ),
    "one-pass variance": (
        "var = x.var(axis=0)",
        "var = (x**2).mean(axis=0) - mean**2",
        {},
        {"forward(train)": "one_pass"},
    ),
    "dgamma and dbeta swapped": (
        "return dx, dgamma, dbeta",
        "return dx, dbeta, dgamma",
        {},
        {"dgamma": "swapped", "dbeta": "swapped"},
    ),
    "normalises with the unbiased variance": (
        "var = x.var(axis=0)",
        "var = x.var(axis=0, ddof=1)",
        {"momentum_convention": "torch", "running_var": "unbiased"},
        {
            "forward(train)": "unbiased_normalize",
            "dx": "unbiased_normalize",
            "dgamma": "unbiased_normalize",
        },
    ),
    "eval adds eps outside the sqrt": (
        "out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta",
        "out = gamma * (x - running_mean) / (np.sqrt(running_var) + eps) + beta",
        {},
        {"forward(eval)": "eval_eps_outside_sqrt"},
    ),
    "eval uses the batch statistics": (
        "out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta",
        "out = gamma * (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + eps) + beta",
        {},
        {"forward(eval)": "eval_batch_stats"},
    ),
    "running statistics never stored": (
        '    bn_param["running_mean"] = running_mean\n    bn_param["running_var"] = running_var\n',
        "",
        {},
        {"running_mean": "not_updated", "running_var": "not_updated"},
    ),
    "eval updates the running statistics": (
        "        cache = None\n",
        "        cache = None\n        running_mean = 0.5 * running_mean + 0.5 * x.mean(axis=0)\n",
        {},
        {"eval keeps running": "eval_changed_running"},
    ),
}

#: Failures that follow from an earlier wrong quantity of the same case; the diagnosis must
#: say so rather than name an unrelated mistake.
CONSEQUENCE = ("forward_stats",)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the one-pass mutant's sqrt(var < 0)
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_classic_mistake_is_rejected_and_named(tmp_path, name):
    old, new, declared, expected = MUTANTS[name]
    report = bt.check(course_adapter(mutant(tmp_path, "course", old, new)), **declared)
    assert not report.ok
    failed = failures_by_quantity(report)
    assert set(expected) <= set(failed), report.format()
    for quantity, rows in failed.items():
        for row in rows:
            assert row.verdict == "FAIL", row
            if quantity in expected:
                # Every failure of the mistaken quantity names it; rows that only follow
                # from a wrong forward may say so instead (one-pass: NaN gradients).
                assert expected[quantity] in row.mistakes or (
                    name == "one-pass variance" and "already wrong" in row.diagnosis
                ), row
            else:
                assert set(row.mistakes) <= set(CONSEQUENCE) and (
                    row.mistakes or "already wrong" in row.diagnosis or "invalid" in row.diagnosis
                ), row


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_pass_variance_fails_only_where_the_offset_is_large(tmp_path):
    old, new, _, _ = MUTANTS["one-pass variance"]
    report = bt.check(course_adapter(mutant(tmp_path, "course", old, new)))
    large = {c.name for c in bt.CASES if c.large_offset}
    assert {c.case for c in report.failures} == large
    for case in large:
        assert report.find(case, "forward(train)").mistakes == ("one_pass",)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_pass_is_still_named_beside_a_second_named_mistake(tmp_path):
    # eps outside the sqrt fails the ordinary cases too, but it is named there: the
    # large-offset failures are still the one-pass variance.
    text = source("course").replace(*MUTANTS["one-pass variance"][:2])
    text = text.replace("std = np.sqrt(var + eps)", "std = np.sqrt(var) + eps")
    assert text.count("np.sqrt(var) + eps") == 1
    report = bt.check(course_adapter(write(tmp_path, "m.py", text)))
    assert report.find("m2", "forward(train)").mistakes == ("eps_outside_sqrt",)
    for case in (c.name for c in bt.CASES if c.large_offset):
        row = report.find(case, "forward(train)")
        assert row.verdict == "FAIL" and row.mistakes == ("one_pass",), row


def test_conventions_are_inferred_and_reported(tmp_path):
    # cs231n's own convention: momentum weighs the old value; biased running variance.
    path = mutant(
        tmp_path,
        "course",
        MUTANTS["momentum weighs the old value, PyTorch meaning declared"][0],
        "running_mean = momentum * running_mean + (1 - momentum) * mean\n"
        "        running_var = momentum * running_var + (1 - momentum) * var",
        filename="cs231n.py",
    )
    report = bt.check(course_adapter(path), momentum=0.9)
    assert report.ok, report.format()
    assert report.running_convention == ("keras", "biased")
    assert any("weighs the old value" in n and "inferred" in n for n in report.notes)
    # Declared, the same code fails, and the diagnosis names both differences.
    report = bt.check(
        course_adapter(path),
        momentum=0.9,
        momentum_convention="torch",
        running_var="unbiased",
    )
    row = report.find("rank2", "running_var")
    assert row.verdict == "FAIL" and set(row.mistakes) == {"momentum_old", "biased_running_var"}
    # Half declared: the undeclared half is inferred, and only the declared half is blamed.
    report = bt.check(
        course_adapter(path),
        momentum=0.9,
        momentum_convention="torch",
    )
    assert report.running_convention == ("torch", "biased")
    assert report.find("rank2", "running_var").mistakes == ("momentum_old",)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "old, new",
    [
        # NaN everywhere: nothing about its variance can be read off it.
        ("out = gamma * x_hat + beta", "out = (gamma * x_hat + beta) * np.nan"),
        # Moments per row instead of per channel: not a per-channel affine map of x.
        ("mean = x.mean(axis=0)\n        var = x.var(axis=0)",
         "mean = x.mean(axis=1, keepdims=True)\n        var = x.var(axis=1, keepdims=True)"),
        # A variance off by a constant factor or term: within one-pass's error budget at a
        # large offset, but the ordinary cases fail too.
        ("var = x.var(axis=0)", "var = x.var(axis=0) * 1.5"),
        ("var = x.var(axis=0)", "var = x.var(axis=0) * 0.5"),
        ("var = x.var(axis=0)", "var = x.var(axis=0) + 0.5"),
    ],
    ids=["nan-everywhere", "per-row-moments", "var-times-1.5", "var-times-0.5", "var-plus-0.5"],
)  # fmt: skip
def test_a_wrong_forward_that_only_looks_odd_at_large_offsets_is_not_called_one_pass(
    tmp_path, old, new
):
    report = bt.check(course_adapter(mutant(tmp_path, "course", old, new)))
    rows = failures_by_quantity(report)["forward(train)"]
    large = {c.name for c in bt.CASES if c.large_offset}
    assert any(r.case in large for r in rows), report.format()
    assert all("one_pass" not in r.mistakes for r in rows), report.format()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_float64_forward_mistake_is_not_blamed_on_float32(tmp_path):
    # A small systematic error (eps/2var ~ 5e-6 here) is within what float32 would leave, but
    # the gradient rows must point at the wrong forward, not guess float32 arithmetic.
    path = mutant(tmp_path, "course", "std = np.sqrt(var + eps)", "std = np.sqrt(var + 2 * eps)")
    report = bt.check(course_adapter(path))
    failed = failures_by_quantity(report)
    f64 = [r for rows in failed.values() for r in rows if r.case.endswith("f64")]
    assert f64, report.format()
    for row in f64:
        if row.quantity in ("dx", "dgamma"):
            assert "float32_compute" not in row.mistakes, row
            assert row.mistakes == ("forward_stats",) or "already wrong" in row.diagnosis, row


def test_unnamed_failures_are_one_line_of_the_diagnoses_block(tmp_path):
    path = mutant(
        tmp_path,
        "course",
        "dgamma = (dout * x_hat).sum(axis=0)",
        "dgamma = (dout * x_hat).sum(axis=0) * 1.5",
    )
    report = bt.check(course_adapter(path))
    lines = [line for line in report.diagnoses().splitlines() if "no known mistake fits" in line]
    assert len(lines) == 1 and "worst at" not in lines[0], report.diagnoses()
    assert len({r.case for r in report.failures}) > 1
