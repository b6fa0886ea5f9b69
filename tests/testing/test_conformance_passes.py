"""Correct implementations pass the conformance suite: hand-written NumPy code in the input
dtype (rows and native layouts), PyTorch's own BatchNorm* and F.batch_norm, this library's
backends, modules and functional on every backend."""

from __future__ import annotations

import functools

import pytest
from conform_impls import course_adapter, fixture

from batchnorm import testing as bt
from batchnorm.kernels import REGISTRY

try:
    import torch
except ImportError:  # the NumPy half of the suite must work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

#: Every registered backend; Triton on CPU runs under its (slow) interpreter.
BACKENDS = [
    pytest.param(n, marks=pytest.mark.slow) if n == "triton" else n for n in sorted(REGISTRY)
]


def test_course_style_numpy_implementation_passes():
    report = bt.check(course_adapter(fixture("course")))
    assert report.ok, report.format()
    # NumPy cannot express bfloat16: those cases are skipped, and the report says why.
    skipped = [c for c in report.checks if c.verdict == "skip"]
    assert skipped and all(c.case.endswith("bf16") or c.case.startswith("masked") for c in skipped)
    assert all("NumPy has no bfloat16" in c.diagnosis for c in skipped if c.case.endswith("bf16"))
    assert any("skipped 3 case(s), NumPy has no bfloat16" in n for n in report.notes)
    assert report.running_convention == ("torch", "unbiased")
    assert any("inferred" in n for n in report.notes)


def test_native_layout_gives_every_case_as_an_n_c_array():
    # Channels-last cases arrive as a non-contiguous (N, C, ...) view.
    report = bt.check(course_adapter(fixture("spatial"), layout="native"))
    assert report.ok, report.format()
    assert report.find("last-rank4", "dx").verdict == "pass"


@needs_torch
def test_torch_batchnorm_modules_pass():
    nn = torch.nn
    report = bt.check(bt.ModuleStyle([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]))
    assert report.ok, report.format()
    # Only the masked cases are skipped (no mask parameter: test_conformance_masked.py).
    assert all(c.case.startswith("masked") for c in report.checks if c.verdict == "skip")
    assert report.running_convention == ("torch", "unbiased")
    ran = {c.quantity for c in report.checks if c.verdict == "pass"}
    assert ran == set(bt.QUANTITIES)


@needs_torch
def test_one_rank_specific_class_skips_the_other_ranks_cases():
    """``conform torch.nn:BatchNorm2d --style module`` (the README's "like nn.BatchNorm2d")
    once ended in 18 errors, one per case of another rank; those cases are now skipped with
    the reason, and a class without ``_check_input_dim`` still gets every rank."""
    rank = {c.name: len(c.shape) for c in bt.CASES}
    report = bt.check(bt.ModuleStyle(torch.nn.BatchNorm2d))
    assert report.ok, report.format()
    assert {rank[c.case] for c in report.checks if c.verdict == "pass"} == {4}
    skipped = {
        rank[c.case] for c in report.checks if c.verdict == "skip" and "rank-" in c.diagnosis
    }
    assert skipped == {2, 3, 5}
    assert any("BatchNorm2d._check_input_dim refuses that rank" in n for n in report.notes)

    class AnyRank(torch.nn.BatchNorm2d):
        def _check_input_dim(self, input):
            if input.dim() < 2:
                raise ValueError("rank >= 2")

    passed = {rank[c.case] for c in bt.check(bt.ModuleStyle(AnyRank)).checks
              if c.verdict == "pass"}  # fmt: skip
    assert passed == {2, 3, 4, 5}


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
