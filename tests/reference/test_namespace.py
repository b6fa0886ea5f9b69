"""``_xp.namespace`` remembers the namespace per array type: the same answer as
``array_api_compat.array_namespace`` for one kind of array, and the same errors for mixed or
unknown kinds (which it never remembers)."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from batchnorm import _xp


def test_one_kind_gives_array_api_compat_namespace():
    torch = pytest.importorskip("torch")
    for arrays in ((np.ones(3),), (np.ones(3), None, np.zeros(2)), (torch.ones(3),)):
        present = [a for a in arrays if a is not None]
        for _ in range(2):  # the second answer comes from the cache
            assert _xp.namespace(*arrays) is array_api_compat.array_namespace(*present)


def test_mixed_or_unknown_kinds_still_raise():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError):
        _xp.namespace(np.ones(3), torch.ones(3))
    for _ in range(2):
        with pytest.raises(TypeError):
            _xp.namespace([1.0, 2.0])
    assert list not in _xp._BY_TYPE
