"""The calling styles' registry: every entry is reachable from ``batchnorm conform --style``,
refuses the wrong number of names, and a new style is one class plus one entry in
:data:`batchnorm.testing.STYLES` (the recipe of docs/conformance.md, worked here)."""

from __future__ import annotations

import numpy as np
import pytest
from conform_impls import fixture, mutant

from batchnorm import testing as bt
from batchnorm.testing.adapters.base import (
    ImplementationError,
    Style,
    call_user,
    returned,
)
from batchnorm.testing.adapters.numpy_io import NumpySession, numpy_unsupported


class PureStyle(Style):
    """``forward(x, gamma, beta, eps) -> y`` and ``grads(dy, x, gamma, beta, eps) -> (dx,
    dgamma, dbeta)`` on (m, C) rows: no state, so no running statistics and no eval mode."""

    style = "pure"
    grad_order = "(dx, dgamma, dbeta)"
    no_running = "the pure style keeps no running statistics"
    no_eval = "the pure style has no eval mode"
    target_counts = (2,)
    target_names = "two names (forward,grads)"

    def __init__(self, forward, grad_fn):
        self.forward, self.grad_fn = forward, grad_fn
        self.signature = (
            "forward(x, gamma, beta, eps) -> y; grads(dy, x, gamma, beta, eps) -> "
            "(dx, dgamma, dbeta)"
        )

    @classmethod
    def from_target(cls, objects, *, layout, device):
        return cls(objects[0], objects[1])

    def unsupported(self, case):
        return numpy_unsupported(case, "rows")

    def session(self, data, momentum):
        return _PureSession(self, data)


class _PureSession(NumpySession):
    def __init__(self, style: PureStyle, data: bt.CaseData) -> None:
        super().__init__(data, "rows")
        self.style = style

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        self.x = self.layout.present(x)
        args = (self.x, self.gamma.copy(), self.beta.copy(), self.case.eps)
        y = call_user("forward", self.style.forward, *args)
        return self.layout.restore("forward", "y", y)

    def backward(self, dy: np.ndarray):
        args = (self.layout.present(dy), self.x.copy(), self.gamma.copy(), self.beta.copy())
        value = call_user("grads", self.style.grad_fn, *args, self.case.eps)
        return self.grads("grads", *returned("grads", value, ("dx", "dgamma", "dbeta")))

    def running(self) -> None:
        return None

    def forward_eval(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - no_eval is set
        raise ImplementationError("the pure style has no eval mode")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = bt.cli_main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(bt.STYLES))
def test_every_registered_style_is_named_by_its_key_and_refuses_a_wrong_count(name):
    cls = bt.STYLES[name]
    assert cls.style == name
    assert cls.target_counts and all(n >= 1 for n in cls.target_counts)
    wrong = max(cls.target_counts) + 1
    with pytest.raises(bt.TargetError, match=rf"style '{name}' needs .*got {wrong} name\(s\)"):
        bt.make_adapter(name, [len] * wrong)


def test_make_adapter_builds_each_style_from_loaded_objects():
    forward, grad_fn = bt.load_target(f"{fixture('pure')}:forward,grads")
    assert isinstance(bt.make_adapter("course", [forward, grad_fn]), bt.CourseStyle)
    plain = bt.make_adapter("plain", [forward, grad_fn], layout="native")
    assert isinstance(plain, bt.PlainStyle) and plain.layout == "native"
    with pytest.raises(bt.TargetError, match="unknown style 'pure'; known: course, plain"):
        bt.make_adapter("pure", [forward, grad_fn])


def test_a_new_style_is_one_class_and_one_registry_entry(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bt.STYLES, "pure", PureStyle)
    target = f"{fixture('pure')}:forward,grads"
    code, out, _ = run_cli(capsys, target, "--style", "pure")
    assert code == 0, out
    assert "style pure: forward(x, gamma, beta, eps) -> y" in out and "PASS: all" in out
    assert "running statistics not checked: the pure style keeps no running statistics" in out
    # The new style's failures are diagnosed like any other's.
    old = "dy - dy.mean(axis=0) - x_hat"
    path = mutant(tmp_path, "pure", old, "dy - x_hat")
    code, out, _ = run_cli(capsys, f"{path}:forward,grads", "--style", "pure", "--cases", "rank2")
    assert code == 1 and "batch mean treated as a constant" in out
    code, _, err = run_cli(capsys, f"{fixture('pure')}:forward", "--style", "pure")
    assert code == 2 and "style 'pure' needs two names (forward,grads), got 1 name(s)" in err
