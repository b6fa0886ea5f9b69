"""Fixtures for the PyTorch layer: the ``backend`` every test runs under.

``backend`` is parametrized over every backend of the registry; those that cannot run on a CPU
float32 tensor here are skipped with the reason. A backend that lands in
``batchnorm.kernels.REGISTRY`` gets every test here without editing them.
``BATCHNORM_TEST_BACKENDS=reference,numba`` overrides the list.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

#: Without torch (the reference must still be testable) nothing here is collected.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
if not HAVE_TORCH:
    collect_ignore_glob = ["test_*.py"]


def _cpu_backends() -> dict[str, str | None]:
    """Every registered backend, with why it cannot run on a CPU float32 tensor (None: it can).
    All are parametrized, so a backend that cannot run shows up as skipped, with the reason,
    instead of silently running nothing (e.g. triton without ``TRITON_INTERPRET=1``)."""
    chosen = os.environ.get("BATCHNORM_TEST_BACKENDS")
    if chosen:
        return {name.strip(): None for name in chosen.split(",") if name.strip()}
    if not HAVE_TORCH:
        return {}
    import torch

    from batchnorm.kernels import available_backends

    return available_backends(torch.zeros(2, 3))


_BACKENDS = _cpu_backends()


@pytest.fixture(params=list(_BACKENDS))
def backend(request) -> str:
    reason = _BACKENDS[request.param]
    if reason is not None:
        pytest.skip(reason)
    return request.param
