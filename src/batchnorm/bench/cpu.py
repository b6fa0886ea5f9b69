"""CPU-only parts: the NumPy reference peer, NumPy's copy, and Numba's JIT cache report."""

from __future__ import annotations

from typing import Any

from .peers import EPS, Peer, Unavailable
from .shapes import Problem
from .timing import Op

__all__ = ["NumpyReferencePeer", "copy_ops", "jit_cache_report"]

#: The reference is slow by design: a few samples are enough to place it.
NUMPY_REPEATS = 3


class NumpyReferencePeer(Peer):
    """``batchnorm.reference`` on NumPy arrays: the readable oracle, not a competitor."""

    name = "numpy"
    devices = ("cpu",)

    def ops(self, problem: Problem, fused: bool) -> dict[str, Op]:
        from .. import reference as ref

        if problem.dtype not in ("float32", "float64"):
            raise Unavailable(f"NumPy has no {problem.dtype}")
        a = problem.numpy()
        x, w, b, axis = a["x"], a["weight"], a["bias"], a["axis"]
        saved = ref.batch_norm_train(x, w, b, axis=axis, eps=EPS)[1]

        def fwd_bwd() -> Any:
            return ref.backward(a["dy"], ref.batch_norm_train(x, w, b, axis=axis, eps=EPS)[1])

        def inference() -> Any:
            rm, rv = a["running_mean"], a["running_var"]
            return ref.batch_norm_infer(x, rm, rv, w, b, axis=axis, eps=EPS)

        calls = {
            "forward": lambda: ref.batch_norm_train(x, w, b, axis=axis, eps=EPS),
            "backward": lambda: ref.backward(a["dy"], saved),
            "fwd+bwd": fwd_bwd,
            "inference": inference,
        }
        return {op: Op(call, max_repeats=NUMPY_REPEATS) for op, call in calls.items()}


def copy_ops(problem: Problem) -> dict[str, Op]:
    """Plain copies of x, the machine's bandwidth measured beside the peers: ``copy`` (one read
    and one write), ``clone`` (the same plus a fresh output's first-touch page faults) and, on
    CPU, NumPy's ``copyto``."""
    import numpy as np
    import torch

    p = problem
    dst = torch.empty_like(p.x)
    ops = {"copy": Op(lambda: dst.copy_(p.x)), "clone": Op(lambda: p.x.clone())}
    if p.device == "cpu" and p.dtype in ("float32", "float64"):
        src = p.x.numpy()
        out = np.empty_like(src)
        ops["numpy copyto"] = Op(lambda: np.copyto(out, src))
    return ops


def jit_cache_report(backend: str) -> dict[str, Any]:
    """For numba: how many kernel signatures came from the disk cache vs were compiled."""
    if backend != "numba":
        return {}
    from ..kernels.numba_cpu.compiled import _k

    hits = misses = 0
    for value in vars(_k()).values():
        stats = getattr(value, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    return {"jit_cache_hits": hits, "jit_cache_misses": misses}
