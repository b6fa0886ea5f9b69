"""Calling styles ``flax-linen`` and ``flax-nnx``: Flax batch norm layers, and modules built
like them, checked through the same :class:`~batchnorm.testing.adapters.Session` protocol.

* ``flax-linen``: ``cls(use_running_average=, axis=, momentum=, epsilon=[, use_bias=False,
  use_scale=False])`` like ``flax.linen.BatchNorm``; the running statistics are the
  ``batch_stats`` collection's ``mean``/``var``, the affine parameters ``params``'
  ``scale``/``bias`` (found by name, at any depth, so a module wrapping one BatchNorm works).
* ``flax-nnx``: ``cls(num_features, use_running_average=, axis=, momentum=, epsilon=[, ...],
  rngs=)`` like ``flax.nnx.BatchNorm``; ``nnx.Param`` ``scale``/``bias`` and ``nnx.BatchStat``
  ``mean``/``var``; eval by ``model.eval()``.

Gradients come from JAX's own differentiation (``jax.vjp`` of the training forward with respect
to the input and the parameters). The case is handed over in its own layout, with ``axis`` set
to its channel axis, so channels-last cases need no transposition. Flax's conventions are the
declared default: momentum weighs the old value, the running variance is biased. float64 cases
run with 64-bit types enabled for the case only (``jax.enable_x64``, thread-local), so the rest
of the process keeps JAX's default. Masked cases are skipped: Flax's ``mask=`` normalises the
padded positions too (their output and gradient are not 0), which is not what the suite's
masked cases check.

JAX and Flax are imported when a style is built, never by ``import batchnorm.testing``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..cases import Case, CaseData
from .base import ImplementationError, Session, Style, call_user

__all__ = ["FlaxLinenStyle", "FlaxNnxStyle", "JaxIO", "jax_x64", "INSTALL_HINT"]

_NO_MASK = (
    "masked cases: Flax's mask= normalises the padded positions too (output and gradient "
    "not 0 there), not what the masked cases check"
)
INSTALL_HINT = "install the frameworks extra: pip install -e '.[frameworks]' -c constraints.txt"
#: Flax's own meaning of momentum and the running variance (docs/conventions.md).
FLAX_CONVENTIONS = ("keras", "biased")


def jax_x64(enabled: bool) -> Any:
    """64-bit JAX types on or off inside a ``with`` block, in this thread only."""
    import jax

    if hasattr(jax, "enable_x64"):  # jax >= 0.6
        return jax.enable_x64(enabled)
    from jax.experimental import disable_x64, enable_x64

    return enable_x64() if enabled else disable_x64()


class JaxIO:
    """A case's arrays as JAX arrays of its dtype, and JAX results back as float64 NumPy."""

    def __init__(self, case: Case) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.case = jax, jnp, case
        self.dtype = getattr(jnp, case.dtype)
        #: the dtype parameters and running statistics are kept in (Flax's param_dtype rule)
        self.param_dtype = jnp.float64 if case.dtype == "float64" else jnp.float32

    def scope(self) -> Any:
        """Where every JAX call of a float64 case must run: x64 on (else float64 would silently
        become float32). Other cases run in the process's own setting."""
        return jax_x64(True) if self.case.dtype == "float64" else contextlib.nullcontext()

    def array(self, arr: np.ndarray, dtype: Any = None) -> Any:
        return self.jnp.asarray(arr, dtype=self.dtype if dtype is None else dtype)

    def output(self, stage: str, name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        """Float64 NumPy of a floating JAX (or NumPy) array of ``shape``; any floating dtype
        is accepted (Flax promotes a float16 input with float32 parameters to float32)."""
        if value is None:
            raise ImplementationError(f"{stage}: {name} is None, expected an array")
        if not hasattr(value, "dtype") or not hasattr(value, "shape"):
            raise ImplementationError(
                f"{stage} returned a {type(value).__name__}, expected an array ({name})"
            )
        if not self.jnp.issubdtype(value.dtype, self.jnp.floating):
            raise ImplementationError(f"{stage}: {name} has dtype {value.dtype}, not floating")
        if tuple(value.shape) != tuple(shape):
            raise ImplementationError(
                f"{stage}: {name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
            )
        if value.dtype == self.jnp.float64:
            return np.array(value, dtype=np.float64)
        # through float32: NumPy has no bfloat16 of its own
        return np.asarray(self.jnp.asarray(value, dtype=self.jnp.float32), np.float64)

    def vector(self, stage: str, name: str, value: Any) -> np.ndarray:
        return self.output(stage, name, value, (self.case.channels,))


def _leaf(tree: Any, key: str, where: str) -> tuple[tuple[str, ...], Any]:
    """The one leaf of a nested dict whose last key is ``key``: (path, value)."""
    from flax.traverse_util import flatten_dict

    found = [(p, v) for p, v in flatten_dict(dict(tree)).items() if p[-1] == key]
    if len(found) != 1:
        paths = ", ".join("/".join(p) for p, _ in found) or "none"
        raise ImplementationError(f"expected one {key!r} in {where}, found {paths}")
    return found[0]


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of the nested dict ``tree`` with ``path`` set to ``value``."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(dict(tree[path[0]]), path[1:], value)}


class _FlaxStyle(Style):
    conventions = FLAX_CONVENTIONS
    no_running = None
    no_eval = None

    def __init__(self, cls: Callable[..., Any], **options: Any) -> None:
        try:
            import flax  # noqa: F401
        except ImportError as exc:  # said when the style is built, not in every case
            raise ValueError(f"style {self.style!r} needs flax ({exc}); {INSTALL_HINT}") from None
        self.cls, self.options = cls, options
        name = getattr(cls, "__name__", None) or getattr(
            getattr(cls, "func", None), "__name__", repr(cls)
        )
        extra = "".join(f", {k}={v!r}" for k, v in options.items())
        self.signature = self._signature(name, extra)

    target_names = "one module class (or functools.partial)"

    @classmethod
    def from_target(cls, objects: Sequence[Any], *, layout: str, device: str) -> Style:
        return cls(objects[0])  # ValueError if flax is not installed

    def unsupported(self, case: Case) -> str | None:
        return _NO_MASK if case.mask else None

    def kwargs(self, case: Case, momentum: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "axis": case.channel_axis,
            "momentum": momentum,
            "epsilon": case.eps,
            **self.options,
        }
        if not case.affine:
            kwargs.update(use_bias=False, use_scale=False)
        return kwargs


class FlaxLinenStyle(_FlaxStyle):
    """A ``flax.linen`` module class (or partial) built like ``flax.linen.BatchNorm``;
    ``options`` are extra constructor arguments (``use_fast_variance=False``)."""

    style = "flax-linen"
    grad_order = "(params['scale'] grad, params['bias'] grad)"

    def _signature(self, name: str, extra: str) -> str:
        return (
            f"{name}(use_running_average=, axis=, momentum=, epsilon={extra}"
            "[, use_bias=False, use_scale=False]); gradients by jax.vjp"
        )

    def session(self, data: CaseData, momentum: float) -> Session:
        return _LinenSession(self, data, momentum)


class _LinenSession:
    def __init__(self, style: FlaxLinenStyle, data: CaseData, momentum: float) -> None:
        self.case = case = data.case
        self.io = io = JaxIO(case)
        kwargs = style.kwargs(case, momentum)
        name = getattr(style.cls, "__name__", "module")
        with io.scope():
            build = functools.partial(call_user, f"{name}(...)", style.cls, **kwargs)
            self.train_module = build(use_running_average=False)
            self.eval_module = build(use_running_average=True)
            x0 = io.array(data.xs[0])
            variables = call_user("init", self.train_module.init, io.jax.random.PRNGKey(0), x0)
            variables = {k: dict(v) for k, v in dict(variables).items()}
            stats = variables.get("batch_stats", {})
            self.mean_path = _leaf(stats, "mean", "the 'batch_stats' collection")[0]
            self.var_path = _leaf(stats, "var", "the 'batch_stats' collection")[0]
            stats = _set(stats, self.mean_path, io.array(data.running_mean, io.param_dtype))
            stats = _set(stats, self.var_path, io.array(data.running_var, io.param_dtype))
            variables["batch_stats"] = stats
            self.param_paths: dict[str, tuple[str, ...]] = {}
            if case.affine:
                params = variables.get("params", {})
                for key, value in (("scale", data.gamma), ("bias", data.beta)):
                    path = _leaf(params, key, "the 'params' collection")[0]
                    params = _set(params, path, io.array(value, io.param_dtype))
                    self.param_paths[key] = path
                variables["params"] = params
        self.variables = variables
        self.vjp: Any = None

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        io = self.io
        rest = {k: v for k, v in self.variables.items() if k != "params"}

        def train(x, params):
            return self.train_module.apply({**rest, "params": params}, x, mutable=["batch_stats"])

        with io.scope():
            xj = io.array(x)
            params = self.variables.get("params", {})
            y, self.vjp, updates = call_user(
                "forward (use_running_average=False)", io.jax.vjp, train, xj, params, has_aux=True
            )
            self.variables = {**self.variables, **dict(updates)}
            self.y_dtype = getattr(y, "dtype", None)
            return io.output("forward", "output", y, self.case.shape)

    def backward(self, dy: np.ndarray):
        io = self.io
        with io.scope():
            dx, dparams = call_user("backward (jax.vjp)", self.vjp, io.array(dy, self.y_dtype))
            dx = io.output("backward", "dx", dx, self.case.shape)
            if not self.case.affine:
                return dx, None, None
            grads = [
                io.vector("backward", f"d{key}", _leaf(dparams, path[-1], "the gradients")[1])
                for key, path in self.param_paths.items()
            ]
            return dx, grads[0], grads[1]

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        stats = self.variables.get("batch_stats", {})
        return (
            self.io.vector("batch_stats", "mean", _leaf(stats, "mean", "batch_stats")[1]),
            self.io.vector("batch_stats", "var", _leaf(stats, "var", "batch_stats")[1]),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        with self.io.scope():
            y = call_user(
                "forward (use_running_average=True)",
                self.eval_module.apply,
                self.variables,
                self.io.array(x),
            )
            return self.io.output("forward (eval)", "output", y, self.case.shape)


class FlaxNnxStyle(_FlaxStyle):
    """A ``flax.nnx`` module class (or partial) built like ``flax.nnx.BatchNorm``;
    ``options`` are extra constructor arguments (``use_fast_variance=False``)."""

    style = "flax-nnx"
    grad_order = "(scale grad, bias grad)"

    def _signature(self, name: str, extra: str) -> str:
        return (
            f"{name}(num_features, use_running_average=False, axis=, momentum=, epsilon={extra}"
            "[, use_bias=False, use_scale=False], rngs=); .eval(); gradients by jax.vjp"
        )

    def session(self, data: CaseData, momentum: float) -> Session:
        return _NnxSession(self, data, momentum)


class _NnxSession:
    def __init__(self, style: FlaxNnxStyle, data: CaseData, momentum: float) -> None:
        from flax import nnx

        self.nnx, self.case = nnx, data.case
        self.io = io = JaxIO(data.case)
        name = getattr(style.cls, "__name__", "module")
        with io.scope():
            model = call_user(
                f"{name}({data.case.channels}, ...)",
                style.cls,
                data.case.channels,
                use_running_average=False,
                rngs=nnx.Rngs(0),
                **style.kwargs(data.case, momentum),
            )
            self.graph, params, stats, self.rest = call_user(
                "nnx.split", nnx.split, model, nnx.Param, nnx.BatchStat, ...
            )
            self.params, self.stats = _pure(nnx, params), _pure(nnx, stats)
            for key, value in (("mean", data.running_mean), ("var", data.running_var)):
                path = _leaf(self.stats, key, "the nnx.BatchStat state")[0]
                self.stats = _set(self.stats, path, io.array(value, io.param_dtype))
            if data.case.affine:
                for key, value in (("scale", data.gamma), ("bias", data.beta)):
                    path = _leaf(self.params, key, "the nnx.Param state")[0]
                    self.params = _set(self.params, path, io.array(value, io.param_dtype))
            self.state_types = (params, stats)
        self.vjp: Any = None

    def _merge(self, params: dict, stats: dict) -> Any:
        """A fresh model holding these values (the templates are never written to)."""
        p, s = (
            _replace(self.nnx, self.io.jax, template, values)
            for template, values in zip(self.state_types, (params, stats), strict=True)
        )
        return self.nnx.merge(self.graph, p, s, self.rest)

    def forward_train(self, x: np.ndarray) -> np.ndarray:
        io, nnx = self.io, self.nnx

        def train(x, params):
            model = self._merge(params, self.stats)
            model.train()
            y = model(x)
            return y, _pure(nnx, nnx.split(model, nnx.Param, nnx.BatchStat, ...)[2])

        with io.scope():
            y, self.vjp, self.stats = call_user(
                "forward (train)", io.jax.vjp, train, io.array(x), self.params, has_aux=True
            )
            self.y_dtype = getattr(y, "dtype", None)
            return io.output("forward", "output", y, self.case.shape)

    def backward(self, dy: np.ndarray):
        io = self.io
        with io.scope():
            dx, dparams = call_user("backward (jax.vjp)", self.vjp, io.array(dy, self.y_dtype))
            dx = io.output("backward", "dx", dx, self.case.shape)
            if not self.case.affine:
                return dx, None, None
            return (
                dx,
                io.vector("backward", "dscale", _leaf(dparams, "scale", "the gradients")[1]),
                io.vector("backward", "dbias", _leaf(dparams, "bias", "the gradients")[1]),
            )

    def running(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.io.vector("BatchStat", "mean", _leaf(self.stats, "mean", "BatchStat")[1]),
            self.io.vector("BatchStat", "var", _leaf(self.stats, "var", "BatchStat")[1]),
        )

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        io, nnx = self.io, self.nnx
        with io.scope():
            model = self._merge(self.params, self.stats)
            call_user("model.eval", model.eval)
            y = call_user("forward (eval)", model, io.array(x))
            # What eval left in the statistics: the checker requires them unchanged.
            self.stats = _pure(nnx, nnx.split(model, nnx.Param, nnx.BatchStat, ...)[2])
            return io.output("forward (eval)", "output", y, self.case.shape)


def _pure(nnx: Any, state: Any) -> dict:
    """The nested dict of arrays an nnx state holds (``nnx.to_pure_dict`` where Flax has it)."""
    if hasattr(nnx, "to_pure_dict"):
        return nnx.to_pure_dict(state)
    return state.to_pure_dict()


def _replace(nnx: Any, jax: Any, state: Any, pure: dict) -> Any:
    """A copy of the nnx ``state`` (new Variable objects) holding the values of ``pure``."""
    new = jax.tree.map(lambda leaf: leaf, state)
    nnx.replace_by_pure_dict(new, pure)
    return new
