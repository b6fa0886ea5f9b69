"""GPU parts (Triton on CUDA): the layer peer and the Triton tuning knobs.

``batchnorm bench --device cuda`` runs the same rounds as on CPU, timed with CUDA events
(``bench.timing``), with the fused BN+ReLU / BN+add+ReLU tails and a correctness check of every
non-baseline torch-like peer against eager. On a CPU with ``TRITON_INTERPRET=1`` the same code
runs the Triton kernels in the interpreter: that checks the plumbing and the record, not speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .peers import EPS, TorchPeer, Unavailable
from .shapes import Problem
from .timing import Op

__all__ = ["LayerPeer", "triton_tuning"]


class LayerPeer(TorchPeer):
    """``batchnorm.torch.batch_norm`` and the fused functionals on one backend, autograd
    included: what a user's model calls. Beside the backend's own peer it shows the glue's cost
    (and, for a channels-last 3-D input, the copy back to PyTorch's output memory format)."""

    def __init__(self, backend: str, devices: tuple[str, ...]) -> None:
        self.backend = backend
        self.name = f"{backend}-layer"
        self.devices = devices

    def functions(self) -> dict[str, Callable[..., Any]]:
        from ..torch import batch_norm
        from ..torch.fused import batch_norm_add_relu, batch_norm_relu

        name = self.backend
        return {
            "train": lambda x, w, b: batch_norm(x, None, None, w, b, True, eps=EPS, backend=name),
            "infer": lambda x, rm, rv, w, b: batch_norm(
                x, rm, rv, w, b, False, eps=EPS, backend=name
            ),
            "relu": lambda x, w, b: batch_norm_relu(
                x, None, None, w, b, True, eps=EPS, backend=name
            ),
            "add_relu": lambda x, r, w, b: batch_norm_add_relu(
                x, r, None, None, w, b, True, eps=EPS, backend=name
            ),
        }

    def ops(self, problem: Problem, fused: bool) -> dict[str, Op]:
        from ..kernels import BackendUnavailable, get_backend

        try:
            get_backend(self.backend, problem.x)
        except BackendUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        return super().ops(problem, fused)


@contextlib.contextmanager
def triton_tuning(tile_elems: int | None, programs: int | None) -> Iterator[None]:
    """The Triton kernels' tile size and reduction grid, overridden for a sweep (docs/triton.md);
    nothing to do (and triton not imported) when neither is given."""
    if tile_elems is None and programs is None:
        yield
        return
    from ..kernels import triton_gpu

    with triton_gpu.tuning(tile_elems=tile_elems, programs=programs):
        yield
