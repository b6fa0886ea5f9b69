"""Shared fixtures: ``xp`` runs a test on NumPy arrays, torch tensors and JAX arrays."""

from __future__ import annotations

import contextlib
import importlib.util

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


class JaxNS:
    """jax.numpy arrays; the test runs with 64-bit types on (see ``jax_x64``)."""

    name = "jax"

    @staticmethod
    def asarray(a, dtype="float64"):
        import jax.numpy as jnp

        a = np.asarray(a)
        out = jnp.asarray(a, dtype=getattr(jnp, dtype))
        if out.dtype != np.dtype(dtype) and dtype != "bfloat16":
            # Without x64 JAX would hand back float32 silently and the test would compare
            # float32 results against float64 bounds.
            raise RuntimeError(f"JAX made {out.dtype} of {dtype}: is x64 enabled?")
        return out

    @staticmethod
    def to_numpy(a):
        if str(a.dtype) == "bfloat16":
            a = a.astype("float32")
        return np.asarray(a)


def jax_x64():
    """64-bit JAX types for the duration of a ``with`` block, in this thread only.

    ``jax.config.update("jax_enable_x64", True)`` is process-global: it would change the dtypes
    every other test in the process sees (a JAX float64 request silently becomes float32 only
    without it), so the switch is scoped instead.
    """
    import jax

    if hasattr(jax, "enable_x64"):  # jax >= 0.6: a thread-local context manager
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


XP_PARAMS = [pytest.param(NumpyNS, id="numpy")]
if torch is not None:
    XP_PARAMS.append(pytest.param(TorchNS, id="torch"))
_NO_JAX = "jax is not installed (pip install -e '.[frameworks]')"
XP_PARAMS.append(
    pytest.param(
        JaxNS,
        id="jax",
        marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason=_NO_JAX),
    )
)


@pytest.fixture(params=XP_PARAMS)
def xp(request):
    """A tiny adapter: ``xp.asarray(numpy_array, dtype_name)`` and ``xp.to_numpy(array)``."""
    scope = jax_x64() if request.param is JaxNS else contextlib.nullcontext()
    with scope:
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
