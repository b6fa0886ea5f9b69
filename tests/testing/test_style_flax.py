"""The flax-linen and flax-nnx calling styles: Flax's layers in their correct configuration
pass, its default configuration is caught by its one-pass variance, and batch norms written
in Flax with a classic mistake fail with that mistake named."""

from __future__ import annotations

import functools

import pytest

from batchnorm import testing as bt

pytest.importorskip("flax", reason="flax is not installed (pip install -e '.[frameworks]')")
import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from wrong_flax import LinenBatchNorm, NnxBatchNorm  # noqa: E402

STYLES = {
    "linen": (bt.FlaxLinenStyle, nn.BatchNorm, LinenBatchNorm),
    "nnx": (bt.FlaxNnxStyle, nnx.BatchNorm, NnxBatchNorm),
}
#: Cases where each mistake shows in float32 and float64 (docs/conformance.md: eps outside the
#: sqrt is below float32 resolution at var ~ 1; m = 2 makes m/(m-1) = 2 for the running var).
MISTAKE_CASES = "rank2,rank4,m2,eps-large,tiny-var,last-rank4,rank2-f64,m2-f64"

#: What Flax's defaults (use_fast_variance=True: E[x^2] - E[x]^2) do on the case table, as
#: measured with this version. If a new Flax fixes google/flax#1491, this test fails: update
#: the expectation with the version that changed it, do not delete it.
FLAX_DEFAULT_MEASURED_WITH = "0.12.8"
FLAX_DEFAULT_FAILS = {"large-offset", "offset-rank4", "large-offset-f64"}


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_two_pass_configuration_passes_every_case_it_can_express(flavour):
    style_cls, layer, _ = STYLES[flavour]
    report = bt.check(style_cls(layer, use_fast_variance=False))
    assert report.ok, report.format()
    assert report.running_convention == ("keras", "biased")
    # Everything but the masked cases ran (every rank, layout and dtype, float64 included).
    skipped = {c.case for c in report.checks if c.verdict == "skip"}
    assert skipped == {c.name for c in bt.CASES if c.mask}
    assert "Flax's mask=" in " ".join(report.notes)


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_default_configuration_fails_at_large_offsets_with_one_pass_named(flavour):
    style_cls, layer, _ = STYLES[flavour]
    cases = bt.CASES if flavour == "linen" else bt.select_cases("large-offset*,offset*,rank2*")
    report = bt.check(style_cls(layer), cases)
    failing = {c.case for c in report.failures}
    expected = FLAX_DEFAULT_FAILS & {c.name for c in cases}
    assert failing == expected, (
        f"flax {flax.__version__} (expectation measured with {FLAX_DEFAULT_MEASURED_WITH}): "
        f"the default BatchNorm now fails {sorted(failing)}\n{report.format()}"
    )
    for name in expected:
        forward = report.find(name, "forward(train)")
        assert forward.verdict == "FAIL" and forward.mistakes == ("one_pass",), forward


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
@pytest.mark.parametrize(
    "mistake,running_var,quantity,named",
    [
        ("mean_constant", "biased", "dx", "mean_constant"),
        ("eps_outside_sqrt", "biased", "forward(train)", "eps_outside_sqrt"),
        # A correct Flax module (biased running variance) checked under the unbiased
        # declaration (PyTorch's): the running variance is what is off.
        ("", "unbiased", "running_var", "biased_running_var"),
    ],
)
def test_wrong_module_fails_with_the_mistake_named(flavour, mistake, running_var, quantity, named):
    style_cls, _, handwritten = STYLES[flavour]
    style = style_cls(functools.partial(handwritten, mistake=mistake))
    report = bt.check(style, bt.select_cases(MISTAKE_CASES), running_var=running_var)
    rows = [c for c in report.failures if c.quantity == quantity]
    assert rows, report.format()
    assert all(named in c.mistakes for c in rows), report.format()
    # No other mistake is named anywhere (the same one in eval may be, and a wrong forward's
    # statistics, as such).
    others = {m for c in report.failures for m in c.mistakes}
    others -= {named, f"eval_{named}", "forward_stats"}
    assert not others, report.format()


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_the_handwritten_module_without_a_mistake_passes(flavour):
    """So the failures above are the mistake's, not the module's or the adapter's."""
    style_cls, _, handwritten = STYLES[flavour]
    report = bt.check(style_cls(handwritten), bt.select_cases(MISTAKE_CASES))
    assert report.ok, report.format()


def test_the_command_line_takes_a_flax_class(capsys):
    status = bt.cli_main(
        ["flax.linen:BatchNorm", "--style", "flax-linen", "--cases", "rank2,large-offset"]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert "one-pass E[x^2] - E[x]^2" in out and "style flax-linen" in out


def test_the_nnx_style_on_the_command_line_and_a_wrong_count_of_names(capsys):
    assert bt.cli_main(["flax.nnx:BatchNorm", "--style", "flax-nnx", "--cases", "rank2"]) == 0
    assert "PASS" in capsys.readouterr().out
    status = bt.cli_main(["flax.nnx:BatchNorm,BatchNorm", "--style", "flax-nnx"])
    assert status == 2 and "needs one module class" in capsys.readouterr().err
