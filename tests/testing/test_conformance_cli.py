"""``batchnorm conform``: the table it prints, its exit status (0 pass, 1 failures, 2 usage
or load error, 3 a bug in the suite), every failure of a user's file as a clear report and
never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conform_impls import fixture, mutant, source, write

from batchnorm import testing as bt

try:
    import torch
except ImportError:  # the NumPy half of the suite must work without torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

#: fixtures/course.py's dx without the gradient through the mean
DX_MEAN_CONSTANT = (
    "dx = (dx_hat - dx_hat.mean(axis=0) - x_hat * (dx_hat * x_hat).mean(axis=0)) / std",
    "dx = (dx_hat - x_hat * (dx_hat * x_hat).mean(axis=0)) / std",
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = bt.cli_main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def test_cli_passes_a_correct_file_and_prints_the_table(capsys):
    path = fixture("course")
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
    path = mutant(tmp_path, "course", "momentum * var * m / (m - 1)", "momentum * var")
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
    "text, names, message",
    [
        (
            "def forward(x, gamma, beta, bn_param:\n    pass\n",
            "forward,backward",
            "impl.py, line 1: syntax error",
        ),
        (
            source("course"),
            "forward,backwrd",
            "has no name 'backwrd'; it defines: backward, forward, np",
        ),
        (
            "import numpy as np\n1 / 0\n",
            "forward,backward",
            "importing impl.py raised ZeroDivisionError: division by zero (impl.py, line 2",
        ),
        (source("course"), "forward", "style 'course' needs two names"),
    ],
    ids=["syntax-error", "missing-name", "raises-on-import", "one-name"],
)
def test_cli_reports_a_file_that_cannot_load(tmp_path, capsys, text, names, message):
    path = write(tmp_path, "impl.py", text)
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
    path = mutant(tmp_path, "course", old, new)
    with open(path) as f:
        text = f.read()
    code, out, _ = run_cli(capsys, f"{path}:forward,backward", "--style", "course", "-v")
    assert code == 1
    raise_line = [i for i, line in enumerate(text.splitlines(), 1) if "raise" in line]
    assert message.format(raise_line=raise_line[0] if raise_line else None) in out
    ran = [c.name for c in bt.CASES if c.dtype != "bfloat16"]
    for name in ran:  # every case was attempted and reported
        assert f"\n{name} " in out


@needs_torch
def test_cli_reports_a_module_that_returns_a_tuple(tmp_path, capsys):
    old, new = "return y.to(x.dtype)", "return y.to(x.dtype), None"
    path = mutant(tmp_path, "torch_module", old, new, filename="mine.py")
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
    path = fixture("course")
    code, _, err = run_cli(capsys, f"{path}:forward,backward", "--style", "course")
    assert code == 3
    assert "internal error in the conformance suite" in err and "simulated bug" in err


def test_batchnorm_conform_command_dispatches(tmp_path):
    path = mutant(tmp_path, "course", *DX_MEAN_CONSTANT)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [
                os.path.join(os.path.dirname(__file__), "..", "..", "src"),
                os.environ.get("PYTHONPATH", ""),
            ]
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
def test_torch_styles_are_held_to_pytorchs_conventions_by_default(capsys):
    # Like F.batch_norm, except that momentum is applied to the old value: the default
    # (auto) holds the functional style to PyTorch's meaning instead of inferring Keras's.
    path = fixture("momentum_swapped")
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
