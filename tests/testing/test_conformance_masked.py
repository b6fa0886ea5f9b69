"""The conformance suite's masked cases (issue 18, item 4).

Masked batch norm must equal ordinary batch norm of the real positions alone, with 0 at the
padding: this library's layers pass, a hand-written masked layer passes, the classic mistake
(padding counted in the statistics) fails and is named, and every style or implementation
that cannot take a mask reports the masked cases as skipped, with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from conform_impls import source

from batchnorm import testing as bt

torch = pytest.importorskip("torch")

MASKED = bt.select_cases("masked-*")
FINITE_PAD = [c for c in MASKED if not c.pad_nan]

# A correct hand-written masked layer (fixtures/masked_module.py); its mutants replace one
# exact line.
MASKED_MODULE = source("masked_module")

# Statistics over every position, the padding's values included; the output still masked.
PADDING_COUNTED = (
    "xf = torch.where(keep, xf, 0.0)  # NaN padding out of every product (NaN * 0 is NaN)\n"
    "        stat = keep",
    "stat = torch.ones_like(keep)",
)
# Forgetting the padding in one product: NaN padding reaches the gradients (0 * NaN).
NAN_READ = ("xf = torch.where(keep, xf, 0.0)", "xf = xf")
PADDING_KEPT = ("y = torch.where(keep, y, 0.0)", "pass")


def load_module(tmp_path, source: str, name: str = "MaskedBN"):
    path = tmp_path / "masked_impl.py"
    path.write_text(source)
    return bt.load_target(f"{path}:{name}")[0]


def mutant(old: str, new: str) -> str:
    assert old in MASKED_MODULE, "the mutant must change the correct implementation"
    return MASKED_MODULE.replace(old, new)


def masked_rows(report: bt.Report) -> dict[str, list[bt.Check]]:
    return {c.name: [r for r in report.checks if r.case == c.name] for c in MASKED}


# --------------------------------------------------------------------------- the cases


def test_masked_cases_cover_the_awkward_masks():
    kinds = {(c.mask, c.dtype) for c in MASKED}
    assert kinds >= {(k, d) for k in bt.cases.MASKS for d in ("float32", "float64")}
    assert any(c.pad_nan for c in MASKED)
    for case in MASKED:
        data = bt.make_data(case)
        mask = data.mask
        assert case.axis == 1 and len(case.shape) == 3
        assert mask.shape == (case.shape[0], case.shape[2]) and mask.dtype == bool
        assert 2 <= mask.sum() < mask.size  # trainable, and padding to ignore
        if case.mask == "all-but-one":
            assert (mask.sum(axis=1) == 1).all()
        if case.mask == "empty-seq":
            assert (~mask).all(axis=1).any()
        pads = np.broadcast_to(~mask[:, None, :], case.shape)
        for x in (*data.xs, data.x_eval):
            padding, real = x[pads], x[~pads]
            if case.pad_nan:
                assert np.isnan(padding).all()
            else:  # large enough that counting it moves every statistic
                assert np.abs(padding).min() > 100 * np.abs(real).max()
            assert np.isfinite(real).all()


def test_a_malformed_masked_case_is_refused():
    with pytest.raises(ValueError, match="mask must be one of"):
        bt.Case("bad", (4, 3, 5, 5), mask="random")
    with pytest.raises(ValueError, match="mask must be one of"):
        bt.Case("bad", (4, 3, 5), mask="diagonal")
    with pytest.raises(ValueError, match="N >= 2"):
        bt.Case("bad", (1, 3, 5), mask="all-but-one")


def test_expected_values_are_batch_norm_of_the_real_positions():
    from batchnorm import reference as ref

    case = next(c for c in MASKED if c.mask == "empty-seq" and c.dtype == "float64")
    data = bt.make_data(case)
    x = data.xs[0]
    rows = bt.cases.real_values(x, data.mask)
    assert rows.shape == (int(data.mask.sum()), case.channels)
    y, _ = ref.batch_norm_train(rows, data.gamma, data.beta, axis=1, eps=case.eps)
    full = bt.cases.with_padding(y, data.mask)
    assert full.shape == case.shape
    np.testing.assert_array_equal(full[np.broadcast_to(~data.mask[:, None, :], case.shape)], 0.0)
    np.testing.assert_array_equal(bt.cases.real_values(full, data.mask), y)


# --------------------------------------------------------------------------- passes


def _all_masked_pass(report: bt.Report) -> None:
    assert report.ok, report.format()
    for name, rows in masked_rows(report).items():
        assert rows and all(r.verdict == "pass" for r in rows), (name, rows)
        assert {r.quantity for r in rows} == set(bt.QUANTITIES), name


def test_library_module_passes_every_masked_case():
    import batchnorm.torch as bnt

    _all_masked_pass(bt.check(bt.ModuleStyle(bnt.BatchNorm1d), MASKED))


def test_library_functional_passes_every_masked_case():
    import batchnorm.torch as bnt

    _all_masked_pass(bt.check(bt.FunctionalStyle(bnt.batch_norm), MASKED))


def test_a_hand_written_masked_layer_passes(tmp_path):
    _all_masked_pass(bt.check(bt.ModuleStyle(load_module(tmp_path, MASKED_MODULE)), MASKED))


def test_cli_passes_the_library_layer_on_every_case(capsys):
    code = bt.cli_main(["batchnorm.torch:BatchNorm1d,BatchNorm2d,BatchNorm3d", "--style", "module"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "skipped" not in out
    for case in MASKED:
        assert f"\n{case.name} " in out and "pass" in out.split(f"\n{case.name} ")[1].split("\n")[0]


# --------------------------------------------------------------------------- mistakes


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_padding_counted_in_the_statistics_fails_and_is_named(tmp_path):
    cls = load_module(tmp_path, mutant(*PADDING_COUNTED))
    report = bt.check(bt.ModuleStyle(cls), MASKED)
    assert not report.ok
    for name, rows in masked_rows(report).items():
        assert any(r.verdict == "FAIL" for r in rows), (name, report.format())
    for case in FINITE_PAD:
        for quantity in ("forward(train)", "dx", "running_mean", "running_var"):
            row = report.find(case.name, quantity)
            assert row.verdict == "FAIL", (case.name, quantity, report.format())
            assert row.mistakes == ("padding_counted",), (case.name, quantity, row)
    assert "padded positions are counted in the statistics" in report.diagnoses()


def test_nonzero_output_at_the_padding_fails(tmp_path):
    cls = load_module(tmp_path, mutant(*PADDING_KEPT))
    report = bt.check(bt.ModuleStyle(cls), MASKED)
    for case in MASKED:
        assert report.find(case.name, "forward(train)").verdict == "FAIL", case.name
        assert report.find(case.name, "forward(eval)").verdict == "FAIL", case.name
        # the real positions are right: the statistics and the running rows pass
        assert report.find(case.name, "running_var").verdict == "pass", case.name


def test_nan_padding_read_by_a_product_fails_the_nan_case(tmp_path):
    cls = load_module(tmp_path, mutant(*NAN_READ))
    report = bt.check(bt.ModuleStyle(cls), MASKED)
    nan_cases = {c.name for c in MASKED if c.pad_nan}
    assert {r.case for r in report.failures} == nan_cases, report.format()


# --------------------------------------------------------------------------- skipped


def _all_masked_skipped(report: bt.Report, reason: str) -> None:
    assert report.ok, report.format()
    for name, rows in masked_rows(report).items():
        assert [r.verdict for r in rows] == ["skip"], (name, rows)
        assert reason in rows[0].diagnosis
    note = next(n for n in report.notes if n.startswith(f"skipped {len(MASKED)} case(s)"))
    assert reason in note and all(c.name in note for c in MASKED)
    assert not any(r.verdict == "skip" for r in report.checks if not r.case.startswith("masked"))


def test_torch_modules_without_a_mask_parameter_skip_the_masked_cases():
    nn = torch.nn
    report = bt.check(bt.ModuleStyle([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]))
    _all_masked_skipped(report, "BatchNorm1d.forward has no mask parameter")


def test_torch_functional_without_a_mask_parameter_skips_the_masked_cases():
    report = bt.check(bt.FunctionalStyle(torch.nn.functional.batch_norm))
    _all_masked_skipped(report, "batch_norm has no mask parameter")


def test_a_user_module_without_a_mask_parameter_skips_them(tmp_path):
    source = MASKED_MODULE.replace("def forward(self, x, mask):", "def forward(self, x):")
    report = bt.check(bt.ModuleStyle(load_module(tmp_path, source)), MASKED)
    assert not report.failures, report.format()
    assert all(r.verdict == "skip" for r in report.checks)
    assert "MaskedBN.forward has no mask parameter" in report.checks[0].diagnosis


def test_numpy_styles_and_backends_skip_the_masked_cases():
    def forward(x, gamma, beta, bn_param):  # never called
        raise AssertionError("a masked case reached a style without a mask")

    for adapter in (
        bt.CourseStyle(forward, forward),
        bt.PlainStyle(forward, forward),
        bt.BackendStyle("reference"),
    ):
        report = bt.check(adapter, MASKED)
        assert not report.failures, report.format()
        assert all(r.verdict == "skip" and "masked cases" in r.diagnosis for r in report.checks)


def test_cli_shows_the_masked_cases_skipped_for_torch_nn(capsys):
    code = bt.cli_main(["torch.nn:BatchNorm1d", "--style", "module", "--cases", "rank3,masked-*"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"skipped {len(MASKED)} case(s), masked cases: BatchNorm1d.forward has no mask" in out
    assert "(1 case(s) skipped)" not in out and f"({len(MASKED)} case(s) skipped)" in out
