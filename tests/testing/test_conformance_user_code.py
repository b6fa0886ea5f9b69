"""User code as it comes: a hand-written ``torch.nn.Module`` and its classic mistakes
(``fixtures/torch_module.py``), and the blog post of ``seeds/001`` (``fixtures/seed_001.py``),
which raises in its backward and, with its names fixed, leaves eps out of dx."""

from __future__ import annotations

import pytest
from conform_impls import failures_by_quantity, fixture, mutant, source, write

from batchnorm import testing as bt

try:
    import torch
except ImportError:  # the NumPy half of the suite must work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

# The mutants of fixtures/torch_module.py: name -> (line replaced, replacement, {quantity:
# expected mistake}); "correct" is the file itself.
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
    path = fixture("torch_module") if old is None else mutant(tmp_path, "torch_module", old, new)
    (cls,) = bt.load_target(f"{path}:MyBatchNorm")
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


# Reordered so that sigma2 is computed before norm reads it.
SEED_ORDER = (
    "    norm = (X-mu)/np.sqrt(sigma2+eps)\n    sigma2 = X.var(axis=0)\n",
    "    sigma2 = X.var(axis=0)\n    norm = (X-mu)/np.sqrt(sigma2+eps)\n",
)


def plain_adapter(path: str) -> bt.PlainStyle:
    return bt.PlainStyle(*bt.load_target(f"{path}:bn_forward,bn_backward"))


def test_seed_001_as_published_raises_in_backward():
    report = bt.check(plain_adapter(fixture("seed_001")))
    assert not report.ok
    errors = [c for c in report.checks if c.verdict == "ERROR"]
    ran = [c for c in bt.CASES if not c.dtype == "bfloat16" and not c.mask]
    assert {c.case for c in errors} == {c.name for c in ran}  # carried on through every case
    lines = source("seed_001").splitlines()
    line = max(i for i, text in enumerate(lines, 1) if "norm = (X-mu)/np.sqrt(sigma2+eps)" in text)
    assert all(
        c.quantity == "backward"
        and "'sigma2'" in c.diagnosis
        and f"(seed_001.py, line {line}, in bn_backward)" in c.diagnosis
        for c in errors
    )
    # The forward is right, and still checked in every case.
    assert all(report.find(c.name, "forward(train)").verdict == "pass" for c in ran)


def test_seed_001_with_names_fixed_leaves_eps_out_of_dx(tmp_path):
    text = source("seed_001").replace(*SEED_ORDER).replace("np.sqrt(var)", "np.sqrt(sigma2)")
    report = bt.check(plain_adapter(write(tmp_path, "seed.py", text)))
    failed = failures_by_quantity(report)
    assert set(failed) == {"dx"}
    assert all(r.mistakes == ("eps_missing_backward",) for r in failed["dx"])
    assert report.find("tiny-var", "dx").verdict == "FAIL"  # var << eps: off by 30x


def test_seed_001_fixed_passes_and_its_order_is_checked(tmp_path):
    fixed = source("seed_001").replace(*SEED_ORDER).replace("np.sqrt(var)", "np.sqrt(sigma2+eps)")
    assert bt.check(plain_adapter(write(tmp_path, "seed.py", fixed))).ok
    swapped = fixed.replace("return dX, dbeta, dgamma", "return dX, dgamma, dbeta")
    report = bt.check(plain_adapter(write(tmp_path, "swapped.py", swapped)))
    rows = report.failures
    assert rows and all(r.mistakes == ("swapped",) for r in rows)
    assert "(dX, dbeta, dgamma)" in rows[0].diagnosis
