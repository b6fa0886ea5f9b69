"""Shared fixtures: ``xp`` runs a test on NumPy arrays and on torch tensors."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import torch
except ImportError:  # the reference must work without torch
    torch = None


class NumpyNS:
    name = "numpy"

    @staticmethod
    def asarray(a, dtype="float64"):
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def to_numpy(a):
        return np.asarray(a)


class TorchNS:
    name = "torch"

    @staticmethod
    def asarray(a, dtype="float64"):
        return torch.as_tensor(np.asarray(a), dtype=getattr(torch, dtype))

    @staticmethod
    def to_numpy(a):
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.detach().cpu().numpy()


XP_PARAMS = [pytest.param(NumpyNS, id="numpy")]
if torch is not None:
    XP_PARAMS.append(pytest.param(TorchNS, id="torch"))


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    """A tiny adapter: ``xp.asarray(numpy_array, dtype_name)`` and ``xp.to_numpy(array)``."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
