"""Conformance suite: check anyone's batch norm against the reference, and say what is wrong.

* :data:`CASES` — the public case table (:class:`Case`), with :func:`make_data` and
  :func:`tolerance` per dtype.
* :func:`check` — run an adapter over the cases; returns a :class:`Report` of :class:`Check`
  rows (case, quantity, max error, tolerance, verdict, diagnosis).
* Adapters for the common shapes of an implementation: :class:`CourseStyle`
  (``forward(x, gamma, beta, bn_param)``), :class:`PlainStyle` (``forward(X, gamma, beta,
  eps)``, backward returning ``(dX, dbeta, dgamma)``), :class:`ModuleStyle` (an
  ``nn.Module`` class like ``torch.nn.BatchNorm2d``), :class:`FunctionalStyle` (like
  ``torch.nn.functional.batch_norm``) and :class:`BackendStyle` (a ``batchnorm.kernels``
  backend); other frameworks: :class:`FlaxLinenStyle`, :class:`FlaxNnxStyle`,
  :class:`KerasStyle` (gradients by jax.vjp / the Keras backend's autodiff).
* :data:`MISTAKES` — the known mistakes a failure is matched against.
* :func:`cli_main` — ``batchnorm conform``.

Importing this package imports NumPy and the reference only; PyTorch is imported by the
PyTorch adapters when they run.
"""

from .adapters import (
    STYLES,
    Adapter,
    BackendStyle,
    CourseStyle,
    FlaxLinenStyle,
    FlaxNnxStyle,
    FunctionalStyle,
    ImplementationError,
    KerasStyle,
    ModuleStyle,
    PlainStyle,
    Session,
)
from .cases import CASES, DTYPES, QUANTITIES, Case, CaseData, make_data, select_cases, tolerance
from .checker import MOMENTUM_CONVENTIONS, RUNNING_VARS, Check, Report, check
from .cli import TargetError, cli_main, load_target, make_adapter
from .mistakes import MISTAKES

__all__ = [
    "Adapter",
    "BackendStyle",
    "CASES",
    "Case",
    "CaseData",
    "Check",
    "CourseStyle",
    "DTYPES",
    "FlaxLinenStyle",
    "FlaxNnxStyle",
    "FunctionalStyle",
    "ImplementationError",
    "KerasStyle",
    "MISTAKES",
    "MOMENTUM_CONVENTIONS",
    "ModuleStyle",
    "PlainStyle",
    "QUANTITIES",
    "RUNNING_VARS",
    "Report",
    "STYLES",
    "Session",
    "TargetError",
    "check",
    "cli_main",
    "load_target",
    "make_adapter",
    "make_data",
    "select_cases",
    "tolerance",
]
