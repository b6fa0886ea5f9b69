"""Run by test_style_keras.py in a process of its own (Keras reads KERAS_BACKEND once, at
import): the keras style on Keras's own layer and on the hand-written ones; JSON to stdout."""

from __future__ import annotations

import functools
import json
import sys
import warnings

import keras
from wrong_keras import HandBatchNormalization

from batchnorm import testing as bt

# float32 only: Keras 3.15 computes float64 in float32 (keras.ops.mean too), so every
# float64 case fails for a layer written with keras.ops as well.
MISTAKE_CASES = "rank2,rank4,m2,eps-large,tiny-var,last-rank4"


def rows(report):
    return {
        "ok": report.ok,
        "convention": list(report.running_convention or ()),
        "signature": report.signature,
        "skipped": sorted(c.case for c in report.checks if c.verdict == "skip"),
        "failures": [[c.case, c.quantity, c.verdict, list(c.mistakes)] for c in report.failures],
        "text": report.format(),
    }


def main() -> None:
    warnings.simplefilter("ignore")
    out = {"backend": keras.backend.backend(), "keras": keras.__version__}
    out["layer"] = rows(bt.check(bt.KerasStyle(keras.layers.BatchNormalization)))
    cases = bt.select_cases(MISTAKE_CASES)
    for mistake, running_var in (
        ("", "biased"),
        ("mean_constant", "biased"),
        ("eps_outside_sqrt", "biased"),
        ("", "unbiased"),
    ):
        style = bt.KerasStyle(functools.partial(HandBatchNormalization, mistake=mistake))
        report = bt.check(style, cases, running_var=running_var)
        out[f"hand:{mistake or 'none'}:{running_var}"] = rows(report)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
