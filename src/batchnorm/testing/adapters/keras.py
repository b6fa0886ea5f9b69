"""Calling style ``keras``: ``keras.layers.BatchNormalization`` (Keras 3) and layers built like
it, on whichever Keras backend this process selected (``KERAS_BACKEND``, read when Keras is
first imported: one backend per process).

The layer is built as ``cls(axis=, momentum=, epsilon=, dtype=[, center=False, scale=False])``
with ``axis`` the case's channel axis (the case is handed over in its own layout), ``gamma``,
``beta``, ``moving_mean`` and ``moving_variance`` set from the case, and called as
``layer(x, training=True/False)``. ``dtype`` is the layer's dtype policy: ``float32`` and
``float64`` as the case, ``mixed_float16`` / ``mixed_bfloat16`` for the 16-bit cases (16-bit
compute, float32 variables: how Keras is meant to run them). Gradients come from the backend's
own differentiation: ``jax.vjp`` of ``layer.stateless_call`` on JAX, ``torch.autograd.grad`` on
PyTorch, ``tf.GradientTape`` on TensorFlow; any other backend is reported as unsupported with
the reason. Keras's
conventions are the declared default: momentum weighs the old value, the running variance is
biased. Masked cases are skipped (the layer takes no per-position mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, call_user
from .flax import INSTALL_HINT, jax_x64

__all__ = ["KerasStyle", "DTYPE_POLICY"]

#: the Keras dtype policy each case dtype runs under
DTYPE_POLICY = {
    "float64": "float64",
    "float32": "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
}
_DIFFERENTIABLE = ("jax", "torch", "tensorflow")
_FLOATING = ("float16", "bfloat16", "float32", "float64")


class KerasStyle(Style):
    """A Keras 3 layer class (or partial) built like ``keras.layers.BatchNormalization``;
    ``options`` are extra constructor arguments."""

    style = "keras"
    conventions = ("keras", "biased")
    grad_order = "(gamma grad, beta grad)"
    no_running = None
    no_eval = None
    target_names = "one layer class (or functools.partial)"

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> Style:
        return cls(objects[0])  # ValueError if keras is not installed

    def __init__(self, cls: Callable[..., Any], **options: Any) -> None:
        try:
            import keras
        except ImportError as exc:
            raise ValueError(f"style 'keras' needs keras ({exc}); {INSTALL_HINT}") from None
        self.keras, self.cls, self.options = keras, cls, options
        self.backend = keras.backend.backend()
        name = getattr(cls, "__name__", None) or getattr(
            getattr(cls, "func", None), "__name__", repr(cls)
        )
        extra = "".join(f", {k}={v!r}" for k, v in options.items())
        how = {"jax": "jax.vjp", "torch": "torch.autograd", "tensorflow": "tf.GradientTape"}.get(
            self.backend, "none"
        )
        self.signature = (
            f"{name}(axis=, momentum=, epsilon=, dtype={extra}[, center=False, scale=False]) "
            f"on Keras {keras.__version__}, backend {self.backend}; gradients by {how}"
        )

    def unsupported(self, case: Case) -> str | None:
        if self.backend not in _DIFFERENTIABLE:
            return (
                f"Keras backend {self.backend!r}: this style takes gradients on "
                f"{' and '.join(_DIFFERENTIABLE)} only (set KERAS_BACKEND)"
            )
        if case.mask:
            return "masked cases: a Keras BatchNormalization layer takes no per-position mask"
        return None

    def session(self, data: CaseData, momentum: float) -> Session:
        return _KerasSession(self, data, momentum)


class _KerasSession:
    def __init__(self, style: KerasStyle, data: CaseData, momentum: float) -> None:
        self.keras, self.backend, self.case = style.keras, style.backend, data.case
        case = data.case
        self.scope = (
            (lambda: jax_x64(True))
            if self.backend == "jax" and case.dtype == "float64"
            else contextlib.nullcontext
        )
        kwargs: dict[str, Any] = {
            "axis": case.channel_axis,
            "momentum": momentum,
            "epsilon": case.eps,
            "dtype": DTYPE_POLICY[case.dtype],
            **style.options,
        }
        if not case.affine:
            kwargs.update(center=False, scale=False)
        name = getattr(style.cls, "__name__", "layer")
        with self.scope():
            self.layer = layer = call_user(f"{name}(...)", style.cls, **kwargs)
            call_user("layer.build", layer.build, case.shape)
            values = [("moving_mean", data.running_mean), ("moving_variance", data.running_var)]
            if case.affine:
                values += [("gamma", data.gamma), ("beta", data.beta)]
            for attr, value in values:
                variable = getattr(layer, attr, None)
                if variable is None or not hasattr(variable, "assign"):
                    raise ImplementationError(f"{name} has no variable {attr!r} after build")
                call_user(f"{attr}.assign", variable.assign, value.astype(variable.dtype))
        self.pending: Any = None

    # ------------------------------------------------------------------ conversion

    def _input(self, arr: np.ndarray) -> Any:
        """x or dy in the case's dtype, as the backend's array."""
        if self.backend == "torch":
            import torch

            return torch.tensor(arr, dtype=getattr(torch, self.case.dtype))
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.constant(arr, dtype=getattr(tf, self.case.dtype))
        import jax.numpy as jnp

        return jnp.asarray(arr, dtype=getattr(jnp, self.case.dtype))

    def _numpy(self, stage: str, name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        if value is None:
            raise ImplementationError(f"{stage}: {name} is None (no gradient reached it)")
        if not hasattr(value, "dtype") or not hasattr(value, "shape"):
            raise ImplementationError(
                f"{stage} returned a {type(value).__name__}, expected a tensor ({name})"
            )
        # NumPy, JAX and TensorFlow dtypes have a name; torch's print as "torch.float32"
        name = getattr(value.dtype, "name", None)
        dtype = name if isinstance(name, str) else str(value.dtype).removeprefix("torch.")
        if dtype not in _FLOATING:
            raise ImplementationError(f"{stage}: {name} has dtype {dtype}, not floating")
        if tuple(value.shape) != tuple(shape):
            raise ImplementationError(
                f"{stage}: {name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        if hasattr(value, "detach"):
            return value.detach().cpu().double().numpy().copy()
        return np.asarray(self.keras.ops.convert_to_numpy(value)).astype(np.float64)

    def _vector(self, stage: str, name: str, value: Any) -> np.ndarray:
        return self._numpy(stage, name, value, (self.case.channels,))

    # ------------------------------------------------------------------ the protocol

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        with self.scope():
            if self.backend == "torch":
                xt = self._input(x).requires_grad_(True)
                y = call_user("forward (training=True)", self.layer, xt, training=True)
                self.pending = (xt, y)
            elif self.backend == "tensorflow":
                import tensorflow as tf

                xt = self._input(x)
                with tf.GradientTape() as tape:
                    tape.watch(xt)
                    y = call_user("forward (training=True)", self.layer, xt, training=True)
                self.pending = (tape, xt, y)
            else:
                y = self._jax_forward(self._input(x))
            return self._numpy("forward", "output", y, self.case.shape)

    def _jax_forward(self, x: Any) -> Any:
        import jax

        layer = self.layer
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def train(x, trainable):
            return layer.stateless_call(trainable, non_trainable, x, training=True)

        y, vjp, updated = call_user(
            "forward (training=True)", jax.vjp, train, x, trainable, has_aux=True
        )
        for variable, value in zip(layer.non_trainable_variables, updated, strict=True):
            variable.assign(value)
        self.pending = (vjp, getattr(y, "dtype", None))
        return y

    def _affine_index(self) -> list[int]:
        """Where gamma and beta sit among the trainable variables (by identity)."""
        ids = [id(v) for v in self.layer.trainable_variables]
        found = []
        for attr in ("gamma", "beta"):
            variable = getattr(self.layer, attr, None)
            if id(variable) not in ids:
                raise ImplementationError(f"layer.{attr} is not a trainable variable")
            found.append(ids.index(id(variable)))
        return found

    def backward(self, dy: np.ndarray):
        with self.scope():
            if self.backend == "torch":
                import torch

                xt, y = self.pending
                if not getattr(y, "requires_grad", False):
                    raise ImplementationError("the output does not require grad: no graph")
                wrt = [xt]
                if self.case.affine:
                    wrt += [self.layer.gamma.value, self.layer.beta.value]
                dyt = self._input(dy).to(y.dtype)
                grads = call_user(
                    "backward (torch.autograd)",
                    torch.autograd.grad,
                    y,
                    wrt,
                    dyt,
                    allow_unused=True,
                )
                dx, dgamma, dbeta = (*grads, None, None)[:3]
            elif self.backend == "tensorflow":
                import tensorflow as tf

                tape, xt, y = self.pending
                wrt = [xt]
                if self.case.affine:
                    wrt += [self.layer.gamma.value, self.layer.beta.value]
                grads = call_user(
                    "backward (tf.GradientTape)",
                    tape.gradient,
                    y,
                    wrt,
                    output_gradients=tf.cast(self._input(dy), y.dtype),
                )
                dx, dgamma, dbeta = (*grads, None, None)[:3]
            else:
                import jax.numpy as jnp

                vjp, y_dtype = self.pending
                dx, dtrainable = call_user(
                    "backward (jax.vjp)", vjp, jnp.asarray(dy, dtype=y_dtype)
                )
                dgamma = dbeta = None
                if self.case.affine:
                    gamma_at, beta_at = self._affine_index()
                    dgamma, dbeta = dtrainable[gamma_at], dtrainable[beta_at]
            dx = self._numpy("backward", "dx", dx, self.case.shape)
            if not self.case.affine:
                return dx, None, None
            return (
                dx,
                self._vector("backward", "gamma grad", dgamma),
                self._vector("backward", "beta grad", dbeta),
            )

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self._vector("layer", "moving_mean", self.layer.moving_mean.value),
            self._vector("layer", "moving_variance", self.layer.moving_variance.value),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        with self.scope():
            if self.backend == "torch":
                import torch

                with torch.no_grad():
                    y = call_user(
                        "forward (training=False)", self.layer, self._input(x), training=False
                    )
            else:
                y = call_user(
                    "forward (training=False)", self.layer, self._input(x), training=False
                )
            return self._numpy("forward (eval)", "output", y, self.case.shape)
