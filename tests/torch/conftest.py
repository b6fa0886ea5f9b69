"""Fixtures for the PyTorch layer: the ``backend`` every test runs under.

``backend`` is parametrized over the registry's backends that can run on a CPU float32 tensor,
so a backend that lands in ``batchnorm.kernels.REGISTRY`` (numba) gets every test here without
editing them. ``BATCHNORM_TEST_BACKENDS=reference,numba`` overrides the list.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

#: Without torch (the reference must still be testable) nothing here is collected.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
if not HAVE_TORCH:
    collect_ignore_glob = ["test_*.py"]


def _cpu_backends() -> list[str]:
    chosen = os.environ.get("BATCHNORM_TEST_BACKENDS")
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    if not HAVE_TORCH:
        return []
    import torch

    from batchnorm.kernels import available_backends

    reasons = available_backends(torch.zeros(2, 3))
    return [name for name, reason in reasons.items() if reason is None]


@pytest.fixture(params=_cpu_backends())
def backend(request) -> str:
    return request.param
