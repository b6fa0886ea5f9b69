"""The checker: run an adapter on every case, compare with the reference, diagnose failures.

For each case it runs ``case.steps`` training steps (forward, backward, running statistics
after each), then one eval forward. Expected values come from ``batchnorm.reference`` in
float64 on the exact inputs the implementation saw. Each step's running statistics are
predicted from the implementation's *own* previous values, so one wrong step does not hide
or smear the next, and every running-statistics convention of
``reference.update_running_stats`` is tried: the declared one decides the verdict (or, when
none is declared, the one that fits the most cases is inferred and reported), the others
serve as diagnoses.

Split by seam: ``run`` (one case), ``diagnose`` (naming one failure), ``conventions``
(running-statistics conventions, predicted, inferred, diagnosed), ``orchestrate`` (``check``
itself), ``report`` and ``formatting`` (the result and its text).
"""

from .conventions import MOMENTUM_CONVENTIONS, RUNNING_VARS
from .orchestrate import check
from .report import Check, Report

__all__ = ["Check", "Report", "check", "MOMENTUM_CONVENTIONS", "RUNNING_VARS"]
