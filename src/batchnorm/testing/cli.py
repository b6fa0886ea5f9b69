"""``batchnorm conform``: load a user's implementation, run the suite, print the report.

Exit status: 0 when every check passes, 1 when a check fails or the implementation raised,
2 when the command line or the file itself is wrong (syntax error, missing name), 3 when the
suite itself broke (a bug to report). The suite never ends in a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .adapters import STYLES, BackendStyle, describe_exception
from .cases import CASES, select_cases, tolerance
from .checker import check

__all__ = ["TargetError", "load_target", "make_adapter", "cli_main"]


class TargetError(Exception):
    """The implementation could not be loaded; the message says why."""


def _load_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise TargetError(f"no such file: {path}")
    path = os.path.abspath(path)
    name = "_batchnorm_conform_" + "".join(ch if ch.isalnum() else "_" for ch in path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(path))  # so that it can import its neighbours
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        line = f"\n    {exc.text.rstrip()}" if exc.text else ""
        raise TargetError(
            f"{os.path.basename(path)}, line {exc.lineno}: syntax error: {exc.msg}{line}"
        ) from None
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise TargetError(
            f"importing {os.path.basename(path)} raised {describe_exception(exc)}"
        ) from None
    finally:
        sys.path.remove(os.path.dirname(path))
    return module


def load_target(spec: str) -> list[Any]:
    """The objects named by ``PATH.py:NAME[,NAME]`` or ``package.module:NAME[,NAME]``."""
    where, sep, names = spec.rpartition(":")
    if not sep or not where or not names:
        raise TargetError(f"expected PATH.py:NAME[,NAME] or module:NAME[,NAME], got {spec!r}")
    if where.endswith(".py") or os.sep in where or os.path.exists(where):
        module = _load_file(where)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise TargetError(f"cannot import {where}: {describe_exception(exc)}") from None
    objects = []
    for name in (n.strip() for n in names.split(",")):
        obj: Any = module
        for part in name.split("."):
            if not hasattr(obj, part):
                public = sorted(n for n in vars(module) if not n.startswith("_"))
                raise TargetError(
                    f"{where} has no name {name!r}; it defines: {', '.join(public) or 'nothing'}"
                )
            obj = getattr(obj, part)
        if not callable(obj):
            raise TargetError(f"{where}:{name} is a {type(obj).__name__}, not callable")
        objects.append(obj)
    return objects


def make_adapter(
    style: str, objects: Sequence[Any], *, layout: str = "rows", device: str = "cpu"
) -> Any:
    """The adapter of ``style`` (a key of :data:`STYLES`) for the loaded ``objects``;
    TargetError if they do not fit."""
    cls = STYLES.get(style)
    if cls is None:
        raise TargetError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    if len(objects) not in cls.target_counts:
        raise TargetError(f"style {style!r} needs {cls.target_names}, got {len(objects)} name(s)")
    return cls.from_target(objects, layout=layout, device=device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batchnorm conform",
        description="Check your own batch norm against the reference, case by case, and name "
        "the known mistake a failure fits. See docs/conformance.md.",
        epilog="TARGET names: "
        + "; ".join(f"{name}: {cls.target_names}" for name, cls in STYLES.items())
        + " (keras: the backend is KERAS_BACKEND's, jax when unset)"
        + ". Exit status: 0 pass, 1 failures, 2 usage or load error, 3 a bug in the suite "
        "itself (please report it).",
    )
    p.add_argument("target", nargs="?", help="PATH.py:NAME[,NAME] or package.module:NAME[,NAME]")
    p.add_argument("--style", choices=sorted(STYLES), help="how TARGET is called")
    p.add_argument("--backend", help="check a batchnorm.kernels backend instead of a TARGET")
    p.add_argument(
        "--momentum-convention",
        choices=("auto", "torch", "keras", "infer"),
        default="auto",
        help="torch: momentum weighs the new batch; keras: the old "
        "value (cs231n's bn_param convention); infer: report which fits; auto (default): "
        "torch for the module and functional styles, infer for the others",
    )
    p.add_argument(
        "--running-var",
        choices=("auto", "unbiased", "biased", "infer"),
        default="auto",
        help="what the running variance stores (default auto: unbiased for the module and "
        "functional styles, as PyTorch; infer for the others)",
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=0.1,
        help="momentum handed to the implementation (default 0.1)",
    )
    p.add_argument(
        "--layout",
        choices=("rows", "native"),
        default="rows",
        help="NumPy styles: every case as an (m, C) matrix (rows, default) or as "
        "(N, C, ...) arrays (native, for spatial implementations)",
    )
    p.add_argument("--device", default="cpu", help="torch device for torch styles (cpu)")
    p.add_argument("--cases", help="comma-separated shell patterns of case names to run")
    p.add_argument("--list-cases", action="store_true", help="print the case table and exit")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="one row per check, passes included"
    )
    return p


def _list_cases() -> str:
    rows = [("case", "shape", "axis", "dtype", "eps", "affine", "tol(dx)", "what")]
    for c in CASES:
        rows.append(
            (
                c.name,
                str(c.shape),
                str(c.axis),
                c.dtype,
                f"{c.eps:.0e}",
                "yes" if c.affine else "no",
                f"{tolerance(c, 'dx'):.1e}",
                c.what,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    return "\n".join(
        ("  ".join(r[i].ljust(widths[i]) for i in range(7)) + "  " + r[7]).rstrip() for r in rows
    )


def _run(argv: Sequence[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed the reason
        return int(exc.code or 0)
    if args.list_cases:
        print(_list_cases())
        return 0
    if args.backend is not None:
        if args.target is not None:
            parser.print_usage(sys.stderr)
            print("batchnorm conform: error: give either TARGET or --backend", file=sys.stderr)
            return 2
        try:
            adapter: Any = BackendStyle(args.backend, device=args.device)
        except ValueError as exc:
            print(f"batchnorm conform: error: {exc}", file=sys.stderr)
            return 2
        title = f"backend {args.backend}"
    else:
        if args.target is None or args.style is None:
            parser.print_usage(sys.stderr)
            print(
                "batchnorm conform: error: TARGET and --style are required (or --backend)",
                file=sys.stderr,
            )
            return 2
        if args.style == "keras":
            # Keras picks its backend once, at import, from KERAS_BACKEND; its own default is
            # TensorFlow, an optional install (JAX comes with the frameworks extra).
            os.environ.setdefault("KERAS_BACKEND", "jax")
        try:
            adapter = make_adapter(
                args.style, load_target(args.target), layout=args.layout, device=args.device
            )
        except (TargetError, ValueError) as exc:
            print(f"batchnorm conform: error: {exc}", file=sys.stderr)
            return 2
        title = args.target
    cases = select_cases(args.cases)
    if not cases:
        print(
            f"batchnorm conform: error: no case matches {args.cases!r} (see --list-cases)",
            file=sys.stderr,
        )
        return 2
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # The implementation's own warnings (sqrt of a negative variance, ...) would
            # interleave with the table; the report states what went wrong instead.
            warnings.simplefilter("ignore")
            report = check(
                adapter,
                cases,
                momentum=args.momentum,
                momentum_convention=None
                if args.momentum_convention == "infer"
                else args.momentum_convention,
                running_var=None if args.running_var == "infer" else args.running_var,
            )
    except (ValueError, TypeError) as exc:
        print(f"batchnorm conform: error: {exc}", file=sys.stderr)
        return 2
    print(f"batchnorm conform {title}")
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1


def cli_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``batchnorm conform``; returns the exit status."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `batchnorm conform ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug in the suite: say so in one line, not a traceback
        print(
            f"batchnorm conform: internal error in the conformance suite, please report it: "
            f"{type(exc).__name__}: {exc}{_where(exc)}",
            file=sys.stderr,
        )
        return 3


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    return f" ({os.path.basename(frames[-1].filename)}, line {frames[-1].lineno})"
