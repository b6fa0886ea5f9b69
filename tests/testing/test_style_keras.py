"""The keras calling style on the JAX, PyTorch and TensorFlow backends (one process each:
Keras reads KERAS_BACKEND once, at import; keras_child.py runs the checks there and reports
JSON)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from batchnorm import testing as bt

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_child.py")
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(_CHILD))), "src")

#: What keras.layers.BatchNormalization does on the case table, as measured with this Keras
#: version. A new Keras that fixes either finding makes this test fail: update the
#: expectation, with the version, do not delete it.
KERAS_MEASURED_WITH = "3.15.1"
FLOAT64 = {c.name for c in bt.CASES if c.dtype == "float64" and not c.mask}
#: float64 is computed in float32 on the JAX and PyTorch backends (keras result_type demotes
#: float64: see keras-team/keras#23223), in float64 on TensorFlow; on PyTorch,
#: keras.ops.moments is the one-pass E[x^2] - E[x]^2.
FLOAT32_COMPUTE = {"jax": FLOAT64, "torch": FLOAT64, "tensorflow": set()}
ONE_PASS = {
    "jax": set(),
    "torch": {"large-offset", "offset-rank4", "large-offset-f64"},
    "tensorflow": set(),
}


def _needs(backend):
    missing = [m for m in ("keras", backend) if importlib.util.find_spec(m) is None]
    return (
        f"{', '.join(missing)} not installed (pip install -e '.[frameworks]')" if missing else None
    )


@functools.cache
def _run(backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, _CHILD], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(params=["jax", "torch", "tensorflow"])
def child(request):
    reason = _needs(request.param)
    if reason:
        pytest.skip(reason)
    out = _run(request.param)
    assert out["backend"] == request.param
    return out


def _failing(report):
    return {case for case, _, _, _ in report["failures"]}


def _named(report, case, quantity):
    return next(m for c, q, _, m in report["failures"] if (c, q) == (case, quantity))


def test_keras_layer_passes_every_float32_and_16_bit_case(child):
    layer = child["layer"]
    backend = child["backend"]
    assert layer["convention"] == ["keras", "biased"], layer["text"]
    assert layer["skipped"] == sorted(c.name for c in bt.CASES if c.mask)
    failing = _failing(layer)
    expected = FLOAT32_COMPUTE[backend] | ONE_PASS[backend]
    assert failing == expected, (
        f"keras {child['keras']} (expectation measured with {KERAS_MEASURED_WITH}), backend "
        f"{backend}: BatchNormalization now fails {sorted(failing)}\n{layer['text']}"
    )
    for case in ONE_PASS[backend] - FLOAT32_COMPUTE[backend]:
        assert _named(layer, case, "forward(train)") == ["one_pass"], layer["text"]
    # float64 at float32 rounding, named so (large-offset-f64's x = 1e8 + N(0, 1) does not
    # survive float32 at all, beyond what the float32_compute diagnosis allows).
    for case in FLOAT32_COMPUTE[backend] - {"large-offset-f64"}:
        assert _named(layer, case, "forward(train)") == ["float32_compute"], layer["text"]


@pytest.mark.parametrize(
    "key,quantity,named",
    [
        ("hand:mean_constant:biased", "dx", "mean_constant"),
        ("hand:eps_outside_sqrt:biased", "forward(train)", "eps_outside_sqrt"),
        ("hand:none:unbiased", "running_var", "biased_running_var"),
    ],
)
def test_wrong_keras_layer_fails_with_the_mistake_named(child, key, quantity, named):
    report = child[key]
    rows = [m for _, q, _, m in report["failures"] if q == quantity]
    assert rows and all(named in m for m in rows), report["text"]
    others = {k for _, _, _, m in report["failures"] for k in m}
    assert not others - {named, f"eval_{named}", "forward_stats"}, report["text"]


def test_the_handwritten_keras_layer_without_a_mistake_passes(child):
    report = child["hand:none:biased"]
    assert report["ok"], report["text"]
