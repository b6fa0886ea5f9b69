"""Saying where an exception came from in the *user's* code: shared by the conformance suite
(an implementation under test raised) and the torch tools (a model did not trace). It lives at
the bottom layer so that neither has to import the other.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Iterable

#: The standard library's frames (importlib, ...) are never the user's code.
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def describe_exception(exc: BaseException, *, library_dirs: Iterable[str] = ()) -> str:
    """``"NameError: name 'x' is not defined (impl.py, line 3, in bn_backward)"``.

    The location is the innermost frame outside ``library_dirs``, the standard library and
    installed packages: the caller's idea of "the code under test".
    """
    skip = (*(os.path.abspath(d) for d in library_dirs), _STDLIB_DIR)
    frames = traceback.extract_tb(exc.__traceback__)
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text.splitlines()[0]}"
    own = [
        f
        for f in frames
        if not os.path.abspath(f.filename).startswith(skip)
        and "site-packages" not in f.filename
        and "<frozen" not in f.filename
    ]
    if own:  # none when the call itself failed (a wrong signature): no line to point at
        frame = own[-1]
        text += f" ({os.path.basename(frame.filename)}, line {frame.lineno}, in {frame.name})"
    return text
