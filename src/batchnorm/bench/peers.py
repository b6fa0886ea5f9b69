"""Who is timed. One vocabulary on every device:

* a backend of ``batchnorm.kernels`` by its name (``numba``, ``triton``): its stages called
  through the stage protocol on torch tensors, what ``batchnorm.torch`` runs inside its
  autograd Function (``BackendPeer``);
* ``torch``: PyTorch eager (``torch.nn.functional``), the baseline every speed-up is against;
* ``torch.compile``: the same functions compiled by inductor;
* ``<backend>-layer``: ``batchnorm.torch``'s functional API on that backend, autograd and the
  fused BN+ReLU tails included: what a user calls (``bench.gpu.LayerPeer``);
* ``numpy``: the reference on NumPy arrays, the readable oracle (``bench.cpu``).

Ops: ``forward`` (training forward), ``backward`` (given one forward's saved statistics),
``fwd+bwd``, ``inference``; with ``fused`` the torch-like peers add ``relu fwd+bwd`` =
relu(bn(x)) and ``add_relu fwd+bwd`` = relu(bn(x) + residual), PyTorch's being the unfused
sequence of the same ops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..reference.stages import backward_train, forward_train
from .shapes import Problem
from .timing import Op, sync

__all__ = ["EPS", "Unavailable", "Peer", "BackendPeer", "TorchPeer", "TorchCompilePeer"]

EPS = 1e-5


class Unavailable(Exception):
    """A peer cannot run this problem; the message says why (it is recorded, not fatal)."""


class Peer:
    name: str = "?"
    devices: tuple[str, ...] = ("cpu",)
    #: Left out unless asked for by name (or by --compile): slow to set up.
    optional: bool = False

    def ops(self, problem: Problem, fused: bool) -> dict[str, Op]:
        raise NotImplementedError

    def first_call(self, problem: Problem) -> dict[str, Any] | None:
        """Compile/load cost of the first calls, measured before any warm-up (or None)."""
        return None

    def check(self, problem: Problem) -> dict[str, float] | None:
        """Largest differences from the torch peer's results (or None: not checked)."""
        return None


class BackendPeer(Peer):
    """A ``batchnorm.kernels`` backend called through the stage protocol on torch tensors."""

    def __init__(self, backend: str, devices: tuple[str, ...]) -> None:
        self.name = backend
        self.devices = devices
        self._first_done = False

    def _backend(self, problem: Problem) -> Any:
        from ..kernels import BackendUnavailable, get_backend

        try:
            return get_backend(self.name, problem.x)
        except BackendUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    def first_call(self, problem: Problem) -> dict[str, Any] | None:
        # A second run in the same process finds the kernels compiled: say so.
        warm, self._first_done = self._first_done, True
        p = problem
        t0 = time.perf_counter()
        backend = self._backend(p)
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, mean, _, invstd, _ = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)
        backward_train(backend, p.dy, p.x, mean, invstd, p.weight, 1)
        backend.forward_infer(p.x, p.running_mean, p.running_var, p.weight, p.bias, EPS, 1)
        sync(p.device)
        info: dict[str, Any] = {
            "import_s": t_import,
            "first_calls_s": time.perf_counter() - t0,
            "shape": list(p.shape),
            "layout": p.layout,
            "warm_in_process": warm,
        }
        from .cpu import jit_cache_report

        info.update(jit_cache_report(self.name))
        return info

    def ops(self, problem: Problem, fused: bool) -> dict[str, Op]:
        backend = self._backend(problem)
        p = problem
        saved = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)

        def fwd_bwd() -> Any:
            _, mean, _, invstd, _ = forward_train(backend, p.x, p.weight, p.bias, EPS, 1)
            return backward_train(backend, p.dy, p.x, mean, invstd, p.weight, 1)

        return {
            "forward": Op(lambda: forward_train(backend, p.x, p.weight, p.bias, EPS, 1)),
            "backward": Op(
                lambda: backward_train(backend, p.dy, p.x, saved[1], saved[3], p.weight, 1)
            ),
            "fwd+bwd": Op(fwd_bwd),
            "inference": Op(
                lambda: backend.forward_infer(
                    p.x, p.running_mean, p.running_var, p.weight, p.bias, EPS, 1
                )
            ),
        }


class TorchPeer(Peer):
    """PyTorch eager: ``torch.nn.functional`` and autograd's backward."""

    name = "torch"
    devices = ("cpu", "cuda")

    def functions(self) -> dict[str, Callable[..., Any]]:
        """train(x, w, b), infer(x, rm, rv, w, b), relu(x, w, b), add_relu(x, r, w, b)."""
        import torch.nn.functional as F

        def train(x, w, b):
            return F.batch_norm(x, None, None, w, b, True, 0.1, EPS)

        def infer(x, rm, rv, w, b):
            return F.batch_norm(x, rm, rv, w, b, False, 0.1, EPS)

        def relu(x, w, b):
            return F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS))

        def add_relu(x, r, w, b):
            return F.relu(F.batch_norm(x, None, None, w, b, True, 0.1, EPS) + r)

        return {"train": train, "infer": infer, "relu": relu, "add_relu": add_relu}

    def _functions(self) -> dict[str, Callable[..., Any]]:
        # Made once per peer: torch.compile compiles each new function object again.
        if not hasattr(self, "_made"):
            self._made = self.functions()
        return self._made

    def ops(self, problem: Problem, fused: bool) -> dict[str, Op]:
        import torch

        p, f = problem, self._functions()
        leaves = p.leaves()  # gradients for x, weight and bias, like the backends'
        kept = f["train"](*leaves)  # recorded once, untimed: the backward alone runs on it

        def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                with torch.no_grad():
                    return fn()

            return call

        ops = {
            "forward": Op(no_grad(lambda: f["train"](p.x, p.weight, p.bias))),
            "backward": Op(lambda: torch.autograd.grad(kept, leaves, p.dy, retain_graph=True)),
            "fwd+bwd": Op(lambda: torch.autograd.grad(f["train"](*leaves), leaves, p.dy)),
            "inference": Op(
                no_grad(lambda: f["infer"](p.x, p.running_mean, p.running_var, p.weight, p.bias))
            ),
        }
        if fused:
            x, w, b, r = p.leaves(residual=True)
            ops["relu fwd+bwd"] = Op(lambda: torch.autograd.grad(f["relu"](*leaves), leaves, p.dy))
            ops["add_relu fwd+bwd"] = Op(
                lambda: torch.autograd.grad(f["add_relu"](x, r, w, b), (x, w, b, r), p.dy)
            )
        return ops

    def check(self, problem: Problem) -> dict[str, float] | None:
        """Outputs and dx of train, relu, add_relu against eager's: largest difference relative
        to eager's largest value (the baseline itself is not checked). After a ReLU, dx is
        compared where the two outputs are on the same side of 0: where one rounded output is
        0 and the other just above it, the ReLU passes dy in one and not in the other, a
        difference of the whole dy that says nothing about the kernel (on an H200, 2026-12-04,
        it read 0.06-0.82 at these shapes). Those positions are judged by their output
        instead: ``"<op> flip y"`` is the largest |y| there, relative to eager's largest."""
        if type(self) is TorchPeer:
            return None
        import torch

        p, ours, eager = problem, self._functions(), TorchPeer().functions()
        out = {}
        for name, with_residual in (("train", False), ("relu", False), ("add_relu", True)):
            results = []
            for f in (ours, eager):
                leaves = p.leaves(residual=with_residual)
                args = (leaves[0], leaves[3], *leaves[1:3]) if with_residual else leaves
                y = f[name](*args)
                (dx,) = torch.autograd.grad(y, leaves[:1], p.dy)
                results.append((y.detach().float(), dx.float()))
            (y_a, dx_a), (y_b, dx_b) = results
            out[f"{name} y"] = _relative(y_a, y_b)
            if name == "train":
                out[f"{name} dx"] = _relative(dx_a, dx_b)
                continue
            same_side = (y_a > 0) == (y_b > 0)
            out[f"{name} dx"] = _relative(dx_a[same_side], dx_b[same_side], dx_b)
            flipped = torch.maximum(y_a, y_b)[~same_side]
            out[f"{name} flip y"] = _relative(flipped, torch.zeros_like(flipped), y_b)
        return out


def _relative(a: Any, b: Any, scale: Any = None) -> float:
    """max |a - b| over max |scale| (default ``b``); 0 for empty ``a``."""
    if a.numel() == 0:
        return 0.0
    scale = b if scale is None else scale
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-30))


class TorchCompilePeer(TorchPeer):
    """``torch.compile(dynamic=False)`` of the same functions (inductor; compiling is slow)."""

    name = "torch.compile"
    optional = True

    def functions(self) -> dict[str, Callable[..., Any]]:
        import torch

        _raise_recompile_limits()
        return {k: torch.compile(f, dynamic=False) for k, f in super().functions().items()}


def _raise_recompile_limits() -> None:
    """Every shape x layout x dtype is its own graph: let dynamo keep them all compiled."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
