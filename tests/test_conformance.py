"""The conformance suite (``batchnorm.testing``, ``batchnorm conform``).

It must pass correct implementations (PyTorch's own BatchNorm*, F.batch_norm, this library's
backends and modules, hand-written NumPy code in the input dtype), reject each classic mistake
written as a mutant *and name it*, and turn every failure of a user's file into a clear report
with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from batchnorm import testing as bt
from batchnorm.kernels import REGISTRY
from batchnorm.testing.cases import round_to_dtype
from batchnorm.testing.mistakes import implied_stats, rel_error

try:
    import torch
except ImportError:  # the NumPy half of the suite must work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# A correct course-assignment (cs231n-style) implementation, PyTorch's momentum meaning and an
# unbiased running variance. Each mutant below replaces one exact line of it.
COURSE = """
import numpy as np


def forward(x, gamma, beta, bn_param):
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.1)
    running_mean = bn_param["running_mean"]
    running_var = bn_param["running_var"]
    if mode == "train":
        m = x.shape[0]
        mean = x.mean(axis=0)
        var = x.var(axis=0)
        std = np.sqrt(var + eps)
        x_hat = (x - mean) / std
        out = gamma * x_hat + beta
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
        cache = (x_hat, gamma, std)
    else:
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
        cache = None
    bn_param["running_mean"] = running_mean
    bn_param["running_var"] = running_var
    return out, cache


def backward(dout, cache):
    x_hat, gamma, std = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    dx = (dx_hat - dx_hat.mean(axis=0) - x_hat * (dx_hat * x_hat).mean(axis=0)) / std
    return dx, dgamma, dbeta
"""

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

#: Every registered backend; Triton on CPU runs under its (slow) interpreter.
BACKENDS = [
    pytest.param(n, marks=pytest.mark.slow) if n == "triton" else n for n in sorted(REGISTRY)
]

#: Failures that follow from an earlier wrong quantity of the same case; the diagnosis must
#: say so rather than name an unrelated mistake.
CONSEQUENCE = ("forward_stats",)


def write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def course_adapter(path: str, **kwargs) -> bt.CourseStyle:
    forward, backward = bt.load_target(f"{path}:forward,backward")
    return bt.CourseStyle(forward, backward, **kwargs)


def failures_by_quantity(report: bt.Report) -> dict[str, list[bt.Check]]:
    out: dict[str, list[bt.Check]] = {}
    for c in report.failures:
        out.setdefault(c.quantity, []).append(c)
    return out


# --------------------------------------------------------------------------- the case table


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


def test_check_rejects_a_momentum_that_hides_the_convention(tmp_path):
    adapter = course_adapter(write(tmp_path, "impl.py", COURSE))
    with pytest.raises(ValueError, match="0.5"):
        bt.check(adapter, momentum=0.5)
    with pytest.raises(ValueError, match="momentum_convention"):
        bt.check(adapter, momentum_convention="pytorch")


# --------------------------------------------------------------------------- correct ones pass


def test_course_style_numpy_implementation_passes(tmp_path):
    report = bt.check(course_adapter(write(tmp_path, "impl.py", COURSE)))
    assert report.ok, report.format()
    # NumPy cannot express bfloat16: those cases are skipped, and the report says why.
    skipped = [c for c in report.checks if c.verdict == "skip"]
    assert skipped and all(c.case.endswith("bf16") or c.case.startswith("masked") for c in skipped)
    assert all("NumPy has no bfloat16" in c.diagnosis for c in skipped if c.case.endswith("bf16"))
    assert any("skipped 3 case(s), NumPy has no bfloat16" in n for n in report.notes)
    assert report.running_convention == ("torch", "unbiased")
    assert any("inferred" in n for n in report.notes)


SPATIAL = """
import numpy as np


def forward(x, gamma, beta, bn_param):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    eps, momentum = bn_param["eps"], bn_param["momentum"]
    if bn_param["mode"] == "train":
        m = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        std = np.sqrt(var + eps).reshape(shape)
        x_hat = (x - mean.reshape(shape)) / std
        rm, rv = bn_param["running_mean"], bn_param["running_var"]
        bn_param["running_mean"] = (1 - momentum) * rm + momentum * mean
        bn_param["running_var"] = (1 - momentum) * rv + momentum * var * m / (m - 1)
        cache = (x_hat, gamma.reshape(shape), std, axes)
    else:
        std = np.sqrt(bn_param["running_var"] + eps).reshape(shape)
        x_hat = (x - bn_param["running_mean"].reshape(shape)) / std
        cache = None
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), cache


def backward(dout, cache):
    x_hat, gamma, std, axes = cache
    dx_hat = dout * gamma
    dx = (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
          - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True)) / std
    return dx, (dout * x_hat).sum(axis=axes), dout.sum(axis=axes)
"""


def test_native_layout_gives_every_case_as_an_n_c_array(tmp_path):
    # Channels-last cases arrive as a non-contiguous (N, C, ...) view.
    report = bt.check(course_adapter(write(tmp_path, "spatial.py", SPATIAL), layout="native"))
    assert report.ok, report.format()
    assert report.find("last-rank4", "dx").verdict == "pass"


@needs_torch
def test_torch_batchnorm_modules_pass():
    nn = torch.nn
    report = bt.check(bt.ModuleStyle([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]))
    assert report.ok, report.format()
    # Only the masked cases are skipped (no mask parameter: tests/testing/).
    assert all(c.case.startswith("masked") for c in report.checks if c.verdict == "skip")
    assert report.running_convention == ("torch", "unbiased")
    ran = {c.quantity for c in report.checks if c.verdict == "pass"}
    assert ran == set(bt.QUANTITIES)


@needs_torch
def test_torch_functional_passes_with_declared_conventions():
    report = bt.check(
        bt.FunctionalStyle(torch.nn.functional.batch_norm),
        momentum_convention="torch",
        running_var="unbiased",
    )
    assert report.ok, report.format()


@needs_torch
@pytest.mark.parametrize("name", BACKENDS)
def test_every_available_backend_passes(name):
    adapter = bt.BackendStyle(name)
    reasons = {adapter.unsupported(c) for c in bt.CASES}
    if all(reason is not None for reason in reasons):
        pytest.skip(f"backend {name!r} unavailable here: {reasons.pop()}")
    report = bt.check(adapter)
    assert report.ok, report.format()


def _library_torch():
    import batchnorm.torch as bnt  # with torch installed this must import: a failure is a bug

    return bnt


@needs_torch
def test_library_torch_modules_pass():
    bnt = _library_torch()
    report = bt.check(bt.ModuleStyle([bnt.BatchNorm1d, bnt.BatchNorm2d, bnt.BatchNorm3d]))
    assert report.ok, report.format()
    assert report.running_convention == ("torch", "unbiased")


@needs_torch
@pytest.mark.parametrize("name", BACKENDS)
def test_library_torch_functional_passes_on_every_backend(name):
    bnt = _library_torch()
    probe = torch.zeros(4, 3)
    from batchnorm.kernels import available_backends

    reason = available_backends(probe).get(name)
    if reason is not None:
        pytest.skip(reason)
    fn = functools.partial(bnt.batch_norm, backend=name)
    functools.update_wrapper(fn, bnt.batch_norm)
    # A backend may turn down some inputs (a dtype, a layout): check the cases it accepts.
    cases = [
        c
        for c in bt.CASES
        if available_backends(torch.zeros(c.shape, dtype=getattr(torch, c.dtype)))[name] is None
    ]
    report = bt.check(bt.FunctionalStyle(fn), cases)
    assert report.ok, report.format()


# --------------------------------------------------------------------------- mutants


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the one-pass mutant's sqrt(var < 0)
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_classic_mistake_is_rejected_and_named(tmp_path, name):
    old, new, declared, expected = MUTANTS[name]
    assert old in COURSE, "the mutant must change the correct implementation"
    report = bt.check(
        course_adapter(write(tmp_path, "mutant.py", COURSE.replace(old, new))), **declared
    )
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
    report = bt.check(course_adapter(write(tmp_path, "m.py", COURSE.replace(old, new))))
    large = {c.name for c in bt.CASES if c.large_offset}
    assert {c.case for c in report.failures} == large
    for case in large:
        assert report.find(case, "forward(train)").mistakes == ("one_pass",)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_pass_is_still_named_beside_a_second_named_mistake(tmp_path):
    # eps outside the sqrt fails the ordinary cases too, but it is named there: the
    # large-offset failures are still the one-pass variance.
    source = COURSE.replace(*MUTANTS["one-pass variance"][:2]).replace(
        "std = np.sqrt(var + eps)", "std = np.sqrt(var) + eps"
    )
    assert source.count("np.sqrt(var) + eps") == 1
    report = bt.check(course_adapter(write(tmp_path, "m.py", source)))
    assert report.find("m2", "forward(train)").mistakes == ("eps_outside_sqrt",)
    for case in (c.name for c in bt.CASES if c.large_offset):
        row = report.find(case, "forward(train)")
        assert row.verdict == "FAIL" and row.mistakes == ("one_pass",), row


def test_conventions_are_inferred_and_reported(tmp_path):
    # cs231n's own convention: momentum weighs the old value; biased running variance.
    cs231n = COURSE.replace(
        MUTANTS["momentum weighs the old value, PyTorch meaning declared"][0],
        "running_mean = momentum * running_mean + (1 - momentum) * mean\n"
        "        running_var = momentum * running_var + (1 - momentum) * var",
    )
    report = bt.check(course_adapter(write(tmp_path, "cs231n.py", cs231n)), momentum=0.9)
    assert report.ok, report.format()
    assert report.running_convention == ("keras", "biased")
    assert any("weighs the old value" in n and "inferred" in n for n in report.notes)
    # Declared, the same code fails, and the diagnosis names both differences.
    report = bt.check(
        course_adapter(write(tmp_path, "cs231n.py", cs231n)),
        momentum=0.9,
        momentum_convention="torch",
        running_var="unbiased",
    )
    row = report.find("rank2", "running_var")
    assert row.verdict == "FAIL" and set(row.mistakes) == {"momentum_old", "biased_running_var"}
    # Half declared: the undeclared half is inferred, and only the declared half is blamed.
    report = bt.check(
        course_adapter(write(tmp_path, "cs231n.py", cs231n)),
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
    assert old in COURSE
    report = bt.check(course_adapter(write(tmp_path, "mutant.py", COURSE.replace(old, new))))
    rows = failures_by_quantity(report)["forward(train)"]
    large = {c.name for c in bt.CASES if c.large_offset}
    assert any(r.case in large for r in rows), report.format()
    assert all("one_pass" not in r.mistakes for r in rows), report.format()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_float64_forward_mistake_is_not_blamed_on_float32(tmp_path):
    # A small systematic error (eps/2var ~ 5e-6 here) is within what float32 would leave, but
    # the gradient rows must point at the wrong forward, not guess float32 arithmetic.
    source = COURSE.replace("std = np.sqrt(var + eps)", "std = np.sqrt(var + 2 * eps)")
    report = bt.check(course_adapter(write(tmp_path, "mutant.py", source)))
    failed = failures_by_quantity(report)
    f64 = [r for rows in failed.values() for r in rows if r.case.endswith("f64")]
    assert f64, report.format()
    for row in f64:
        if row.quantity in ("dx", "dgamma"):
            assert "float32_compute" not in row.mistakes, row
            assert row.mistakes == ("forward_stats",) or "already wrong" in row.diagnosis, row


def test_unnamed_failures_are_one_line_of_the_diagnoses_block(tmp_path):
    source = COURSE.replace(
        "dgamma = (dout * x_hat).sum(axis=0)", "dgamma = (dout * x_hat).sum(axis=0) * 1.5"
    )
    report = bt.check(course_adapter(write(tmp_path, "mutant.py", source)))
    lines = [line for line in report.diagnoses().splitlines() if "no known mistake fits" in line]
    assert len(lines) == 1 and "worst at" not in lines[0], report.diagnoses()
    assert len({r.case for r in report.failures}) > 1


TORCH_MODULE = """
import torch


class MyBatchNorm(torch.nn.Module):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        # float32 arithmetic for narrow dtypes, float64 for float64
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training:
            mean = xf.mean(dim=dims)
            var = xf.var(dim=dims, unbiased=False)
            m = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * m / (m - 1))
        else:
            mean, var = self.running_mean.to(xf.dtype), self.running_var.to(xf.dtype)
        y = (xf - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.weight is not None:
            w, b = self.weight.to(xf.dtype), self.bias.to(xf.dtype)
            y = y * w.reshape(shape) + b.reshape(shape)
        return y.to(x.dtype)
"""

TORCH_MUTANTS = {
    "correct": (None, None, {}),
    "mean detached": (
        "mean = xf.mean(dim=dims)",
        "mean = xf.mean(dim=dims).detach()",
        {"dx": "mean_constant"},
    ),
    "variance detached": (
        "var = xf.var(dim=dims, unbiased=False)",
        "var = xf.var(dim=dims, unbiased=False).detach()",
        {"dx": "var_constant"},
    ),
    "float32 arithmetic for float64 input": (
        "xf = x.to(torch.promote_types(x.dtype, torch.float32))",
        "xf = x.float()",
        {"forward(train)": "float32_compute"},
    ),
    "torch.var's unbiased default": (
        "var = xf.var(dim=dims, unbiased=False)",
        "var = xf.var(dim=dims)",
        {"forward(train)": "unbiased_normalize"},
    ),
}


@needs_torch
@pytest.mark.parametrize("name", sorted(TORCH_MUTANTS))
def test_hand_written_torch_module_mistakes_are_named(tmp_path, name):
    old, new, expected = TORCH_MUTANTS[name]
    source = TORCH_MODULE if old is None else TORCH_MODULE.replace(old, new)
    assert old is None or old in TORCH_MODULE
    (cls,) = bt.load_target(f"{write(tmp_path, 'mine.py', source)}:MyBatchNorm")
    report = bt.check(bt.ModuleStyle(cls), momentum_convention="torch", running_var="unbiased")
    if not expected:
        assert report.ok, report.format()
        return
    failed = failures_by_quantity(report)
    assert set(expected) <= set(failed), report.format()
    for quantity, key in expected.items():
        rows = failed[quantity]
        if key == "float32_compute":
            # At offset 1e8 float32 leaves garbage, which names nothing in particular.
            rows = [r for r in rows if r.case != "large-offset-f64"]
        assert rows and all(key in row.mistakes for row in rows), failed[quantity]


# --------------------------------------------------------------------------- seed 001 style

# The blog post's code from seeds/001, verbatim apart from indentation: its backward reads
# sigma2 before assigning it, and divides by np.sqrt(var) (undefined; and without eps).
SEED_001 = """
import numpy as np

def bn_forward(X,gamma,beta,eps):
    mu = X.mean(axis=0)
    sigma2 = X.var(axis=0)
    norm = (X-mu)/np.sqrt(sigma2+eps)
    cache = (X, gamma, beta, eps)
    out = gamma*norm+beta
    return out, cache

def bn_backward(dout,cache):
    X, gamma, beta, eps = cache
    mu = X.mean(axis=0)
    norm = (X-mu)/np.sqrt(sigma2+eps)
    sigma2 = X.var(axis=0)
    dgamma = np.sum(dout*norm,axis=0)
    dbeta = np.sum(dout,axis=0)
    dX = gamma/np.sqrt(var)*(dout - np.mean(dout,axis=0) - np.mean(dout*norm,axis=0)*norm)
    return dX, dbeta, dgamma
"""
SEED_ORDER = (
    "    norm = (X-mu)/np.sqrt(sigma2+eps)\n    sigma2 = X.var(axis=0)\n",
    "    sigma2 = X.var(axis=0)\n    norm = (X-mu)/np.sqrt(sigma2+eps)\n",
)


def plain_adapter(path: str) -> bt.PlainStyle:
    return bt.PlainStyle(*bt.load_target(f"{path}:bn_forward,bn_backward"))


def test_seed_001_as_published_raises_in_backward(tmp_path):
    report = bt.check(plain_adapter(write(tmp_path, "seed.py", SEED_001)))
    assert not report.ok
    errors = [c for c in report.checks if c.verdict == "ERROR"]
    ran = [c for c in bt.CASES if not c.dtype == "bfloat16" and not c.mask]
    assert {c.case for c in errors} == {c.name for c in ran}  # carried on through every case
    lines = SEED_001.splitlines()
    line = max(i for i, text in enumerate(lines, 1) if "norm = (X-mu)/np.sqrt(sigma2+eps)" in text)
    assert all(
        c.quantity == "backward"
        and "'sigma2'" in c.diagnosis
        and f"(seed.py, line {line}, in bn_backward)" in c.diagnosis
        for c in errors
    )
    # The forward is right, and still checked in every case.
    assert all(report.find(c.name, "forward(train)").verdict == "pass" for c in ran)


def test_seed_001_with_names_fixed_leaves_eps_out_of_dx(tmp_path):
    source = SEED_001.replace(*SEED_ORDER).replace("np.sqrt(var)", "np.sqrt(sigma2)")
    report = bt.check(plain_adapter(write(tmp_path, "seed.py", source)))
    failed = failures_by_quantity(report)
    assert set(failed) == {"dx"}
    assert all(r.mistakes == ("eps_missing_backward",) for r in failed["dx"])
    assert report.find("tiny-var", "dx").verdict == "FAIL"  # var << eps: off by 30x


def test_seed_001_fixed_passes_and_its_order_is_checked(tmp_path):
    fixed = SEED_001.replace(*SEED_ORDER).replace("np.sqrt(var)", "np.sqrt(sigma2+eps)")
    assert bt.check(plain_adapter(write(tmp_path, "seed.py", fixed))).ok
    swapped = fixed.replace("return dX, dbeta, dgamma", "return dX, dgamma, dbeta")
    report = bt.check(plain_adapter(write(tmp_path, "swapped.py", swapped)))
    rows = report.failures
    assert rows and all(r.mistakes == ("swapped",) for r in rows)
    assert "(dX, dbeta, dgamma)" in rows[0].diagnosis


# --------------------------------------------------------------------------- the command


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = bt.cli_main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def test_cli_passes_a_correct_file_and_prints_the_table(tmp_path, capsys):
    path = write(tmp_path, "impl.py", COURSE)
    code, out, _ = run_cli(capsys, f"{path}:forward,backward", "--style", "course")
    assert code == 0
    assert "case" in out and "max error" in out and "verdict" in out and "diagnosis" in out
    assert "PASS: all" in out
    code, out, _ = run_cli(
        capsys, f"{path}:forward,backward", "--style", "course", "-v", "--cases", "rank2,m2"
    )
    assert code == 0
    assert out.count("\nrank2 ") == len(bt.QUANTITIES) and "\nrank3 " not in out


def test_cli_fails_a_mutant_with_its_diagnosis(tmp_path, capsys):
    old, new, _, _ = MUTANTS["biased running variance, unbiased declared"]
    path = write(tmp_path, "impl.py", COURSE.replace(old, new))
    code, out, _ = run_cli(
        capsys,
        f"{path}:forward,backward",
        "--style",
        "course",
        "--momentum-convention",
        "torch",
        "--running-var",
        "unbiased",
    )
    assert code == 1
    assert "running variance is the biased estimate" in out and "FAIL:" in out


@pytest.mark.parametrize(
    "source, names, message",
    [
        (
            "def forward(x, gamma, beta, bn_param:\n    pass\n",
            "forward,backward",
            "impl.py, line 1: syntax error",
        ),
        (COURSE, "forward,backwrd", "has no name 'backwrd'; it defines: backward, forward, np"),
        (
            "import numpy as np\n1 / 0\n",
            "forward,backward",
            "importing impl.py raised ZeroDivisionError: division by zero (impl.py, line 2",
        ),
        (COURSE, "forward", "style 'course' needs two names"),
    ],
    ids=["syntax-error", "missing-name", "raises-on-import", "one-name"],
)
def test_cli_reports_a_file_that_cannot_load(tmp_path, capsys, source, names, message):
    path = write(tmp_path, "impl.py", source)
    code, out, err = run_cli(capsys, f"{path}:{names}", "--style", "course")
    assert code == 2
    assert message in err


def test_cli_reports_a_missing_file_and_bad_arguments(tmp_path, capsys):
    code, _, err = run_cli(capsys, f"{tmp_path}/nope.py:f,g", "--style", "course")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, f"{tmp_path}/nope.py:f,g", "--style", "cobol")
    assert code == 2 and "invalid choice" in err
    code, _, err = run_cli(capsys, "just-a-name", "--style", "course")
    assert code == 2 and "expected PATH.py:NAME" in err
    code, _, err = run_cli(capsys, "--cases", "no-such-case*", "--backend", "reference")
    assert code == 2 and "no case matches" in err


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "    dx_hat = dout * gamma\n",
            "    dx_hat = dout * gamma\n    raise RuntimeError('oops')\n",
            "backward raised RuntimeError: oops (impl.py, line {raise_line}, in backward)",
        ),
        (
            "return dx, dgamma, dbeta",
            "return dx, dgamma",
            "backward returned 2 values, expected 3 (dx, dgamma, dbeta)",
        ),
        (
            "return dx, dgamma, dbeta",
            "return dx.T, dgamma, dbeta",
            "backward: dx has shape (4, 16), expected (16, 4)",
        ),
        ("return out, cache", "return out", "returned a single ndarray, expected 2 values"),
        (
            "return dx, dgamma, dbeta",
            "return dx, 'dgamma', dbeta",
            "backward: dgamma is a str, not a numeric array",
        ),
        ("return dx, dgamma, dbeta", "return dx, None, dbeta", "backward: dgamma is None"),
        (
            "return dx, dgamma, dbeta",
            "return dx.astype(int), dgamma, dbeta",
            "backward: dx has dtype int64, not real floating",
        ),
        (
            "return dx, dgamma, dbeta",
            "return dx + 0j, dgamma, dbeta",
            "backward: dx has dtype complex128, not real floating",
        ),
        (
            "return dx, dgamma, dbeta",
            "return dx, [dgamma, dgamma[:1]], dbeta",
            "backward: dgamma is a list, not a numeric array",
        ),
    ],
    ids=[
        "raises",
        "too-few-values",
        "wrong-shape",
        "not-a-tuple",
        "not-an-array",
        "none",
        "integer",
        "complex",
        "ragged",
    ],  # fmt: skip
)
def test_cli_reports_each_case_an_implementation_breaks_and_carries_on(
    tmp_path, capsys, old, new, message
):
    assert old in COURSE
    source = COURSE.replace(old, new)
    path = write(tmp_path, "impl.py", source)
    code, out, _ = run_cli(capsys, f"{path}:forward,backward", "--style", "course", "-v")
    assert code == 1
    raise_line = [i for i, line in enumerate(source.splitlines(), 1) if "raise" in line]
    assert message.format(raise_line=raise_line[0] if raise_line else None) in out
    ran = [c.name for c in bt.CASES if c.dtype != "bfloat16"]
    for name in ran:  # every case was attempted and reported
        assert f"\n{name} " in out


@needs_torch
def test_cli_reports_a_module_that_returns_a_tuple(tmp_path, capsys):
    source = TORCH_MODULE.replace("return y.to(x.dtype)", "return y.to(x.dtype), None")
    path = write(tmp_path, "mine.py", source)
    code, out, _ = run_cli(capsys, f"{path}:MyBatchNorm", "--style", "module", "--cases", "rank2")
    assert code == 1
    assert "forward returned a tuple, expected a tensor (output)" in out


def test_cli_checks_a_library_backend_and_lists_the_cases(capsys):
    code, out, _ = run_cli(capsys, "--backend", "reference", "--cases", "rank*")
    assert code == 0 and "PASS" in out
    code, out, _ = run_cli(capsys, "--list-cases")
    assert code == 0 and all(c.name in out for c in bt.CASES)


def test_cli_says_internal_errors_in_one_line(monkeypatch, tmp_path, capsys):
    from batchnorm.testing import cli

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug in the suite")

    monkeypatch.setattr(cli, "check", broken)
    path = write(tmp_path, "impl.py", COURSE)
    code, _, err = run_cli(capsys, f"{path}:forward,backward", "--style", "course")
    assert code == 3
    assert "internal error in the conformance suite" in err and "simulated bug" in err


def test_batchnorm_conform_command_dispatches(tmp_path):
    old, new, _, _ = MUTANTS["no gradient through the mean"]
    path = write(tmp_path, "impl.py", COURSE.replace(old, new))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchnorm",
            "conform",
            f"{path}:forward,backward",
            "--style",
            "course",
            "--cases",
            "rank2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "dx matches the gradient with the batch mean treated as a constant" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_refuses_a_device_torch_cannot_use_before_any_case_runs(tmp_path, capsys):
    for argv in (
        ("torch.nn.functional:batch_norm", "--style", "functional", "--device", "bogus"),
        ("torch.nn:BatchNorm2d", "--style", "module", "--device", "bogus"),
        ("--backend", "reference", "--device", "bogus"),
    ):
        code, out, err = run_cli(capsys, *argv, "--cases", "rank2")
        assert code == 2 and "device 'bogus' is not usable here" in err, (argv, err)
        assert "rank2" not in out


def test_cli_backend_auto_checks_what_auto_picks_and_unknown_names_are_refused(capsys):
    code, out, _ = run_cli(capsys, "--backend", "auto", "--cases", "rank*")
    assert code == 0 and "whichever backend auto picks" in out
    code, _, err = run_cli(capsys, "--backend", "nope")
    assert code == 2 and "unknown backend 'nope'" in err and "auto" in err


@pytest.mark.parametrize("momentum", ["0", "1", "0.5"])
def test_cli_refuses_momenta_at_which_a_missing_update_would_pass(capsys, momentum):
    code, _, err = run_cli(capsys, "--backend", "reference", "--momentum", momentum)
    assert code == 2 and "momentum must be a number other than 0, 0.5 and 1" in err


@needs_torch
def test_torch_styles_are_held_to_pytorchs_conventions_by_default(tmp_path, capsys):
    # Like F.batch_norm, except that momentum is applied to the old value: the default
    # (auto) holds the functional style to PyTorch's meaning instead of inferring Keras's.
    source = """
import torch.nn.functional as F

def batch_norm(x, rm, rv, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return F.batch_norm(x, rm, rv, weight, bias, training, 1 - momentum, eps)
"""
    path = write(tmp_path, "swapped.py", source)
    code, out, _ = run_cli(capsys, f"{path}:batch_norm", "--style", "functional")
    assert code == 1 and "as style functional implies" in out
    assert "momentum applied to the old value" in out
    # Asked to infer, the suite finds the Keras meaning consistent and passes it, saying so.
    code, out, _ = run_cli(
        capsys, f"{path}:batch_norm", "--style", "functional", "--momentum-convention", "infer"
    )
    assert code == 0 and "momentum weighs the old value" in out and "momentum inferred" in out
    assert "variance as style functional implies" in out


def test_cli_import_error_does_not_point_into_the_standard_library(capsys):
    code, _, err = run_cli(capsys, "no_such_module_here:f", "--style", "functional")
    assert code == 2 and "No module named 'no_such_module_here'" in err
    assert "__init__.py" not in err and "line" not in err
