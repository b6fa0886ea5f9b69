"""The networks and the training loop the experiments share (PyTorch).

``MLP`` is the network of Ioffe & Szegedy 2015, section 4.1: fully-connected hidden layers
(three of 100 units by default), each ``Linear -> [BatchNorm1d] -> [noise] -> sigmoid``, small
Gaussian initialisation, softmax output. Batch norm is ``batchnorm.torch.BatchNorm1d`` (ours),
so ``through_mean`` / ``through_var`` switch the gradient through each moment off.

The linear layers keep their bias even before batch norm (the paper drops it, since beta
subsumes it): the ``moments`` experiment watches exactly that bias drift when the mean's gradient
is dropped. With the true gradient its gradient is zero and it stays at its initial value.

Test-time statistics follow Algorithm 2: the population mean is the average of mini-batch means
and the population variance ``m/(m-1)`` times the average of mini-batch variances, over
training mini-batches processed by the training-mode network (``population_statistics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..reference import batch_stats

__all__ = [
    "MLP",
    "NoisyShift",
    "make_batchnorm",
    "batches",
    "population_statistics",
    "evaluate",
    "TrainConfig",
    "train",
    "to_tensors",
    "load_tensors",
]

NORMS = ("none", "bn", "noisy-bn")


def make_batchnorm(
    num_features: int,
    *,
    through_mean: bool = True,
    through_var: bool = True,
    backend: str = "auto",
    dtype: Any = None,
) -> nn.Module:
    """Our ``BatchNorm1d``; the switches are only passed when they differ from the default."""
    from ..torch import BatchNorm1d

    kwargs: dict[str, Any] = {"backend": backend, "dtype": dtype}
    if not through_mean:
        kwargs["through_mean"] = False
    if not through_var:
        kwargs["through_var"] = False
    return BatchNorm1d(num_features, **kwargs)


class NoisyShift(nn.Module):
    """Santurkar et al. 2018's "noisy BatchNorm": a random scale and shift after BN.

    Per unit, ``y -> scale * y + shift`` with ``shift ~ U(-shift_range, shift_range)`` and
    ``scale ~ U(1/scale_range, scale_range)``, redrawn by ``resample()`` once per training step
    (so every forward within one step, e.g. the landscape probes, sees the same network). Active
    only in training mode: it is an injected distribution shift, not part of the model.
    """

    def __init__(
        self,
        num_features: int,
        shift_range: float = 0.5,
        scale_range: float = 1.5,
        dtype: Any = None,
    ):
        super().__init__()
        if shift_range < 0 or scale_range < 1:
            raise ValueError(
                f"need shift_range >= 0 and scale_range >= 1, got {shift_range}, {scale_range}"
            )
        self.shift_range, self.scale_range = float(shift_range), float(scale_range)
        self.active = True
        self.register_buffer("scale", torch.ones(num_features, dtype=dtype))
        self.register_buffer("shift", torch.zeros(num_features, dtype=dtype))

    def resample(self, generator: torch.Generator) -> None:
        low = 1.0 / self.scale_range
        u = torch.rand(2, self.scale.shape[0], generator=generator, dtype=torch.float64)
        self.scale.copy_(low + (self.scale_range - low) * u[0])
        self.shift.copy_(self.shift_range * (2.0 * u[1] - 1.0))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.active:
            return y * self.scale + self.shift
        return y


class MLP(nn.Module):
    """``Linear -> [BN] -> [noise] -> activation`` per hidden layer, then a linear head.

    Parameters are drawn from ``torch.Generator().manual_seed(seed)``: weights N(0, init_std^2)
    ("small random Gaussian values", section 4.1) or, with ``init_std="kaiming"``,
    N(0, 2/fan_in); biases zero.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden: Sequence[int] = (100, 100, 100),
        norm: str = "none",
        through_mean: bool = True,
        through_var: bool = True,
        init_std: float | str = 0.1,
        activation: str = "sigmoid",
        seed: int = 0,
        backend: str = "auto",
        dtype: Any = None,
        noise: tuple[float, float] = (0.5, 1.5),
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if activation not in ("sigmoid", "relu"):
            raise ValueError(f"activation must be 'sigmoid' or 'relu', got {activation!r}")
        if init_std != "kaiming" and not (isinstance(init_std, int | float) and init_std > 0):
            raise ValueError(f"init_std must be > 0 or 'kaiming', got {init_std!r}")
        self.norm = norm
        widths = (in_features, *hidden)
        self.linears = nn.ModuleList(
            nn.Linear(a, b, dtype=dtype) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        if norm == "none":
            self.norms = nn.ModuleList(nn.Identity() for _ in hidden)
        else:
            self.norms = nn.ModuleList(
                make_batchnorm(
                    h,
                    through_mean=through_mean,
                    through_var=through_var,
                    backend=backend,
                    dtype=dtype,
                )
                for h in hidden
            )
        self.noises = nn.ModuleList(
            NoisyShift(h, *noise, dtype=dtype) if norm == "noisy-bn" else nn.Identity()
            for h in hidden
        )
        self.head = nn.Linear(widths[-1], num_classes, dtype=dtype)
        self.act = torch.sigmoid if activation == "sigmoid" else torch.relu
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for layer in (*self.linears, self.head):
                weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
                # "kaiming": std sqrt(2 / fan_in) (He et al. 2015), what ReLU networks use.
                std = (2.0 / layer.in_features) ** 0.5 if init_std == "kaiming" else init_std
                layer.weight.copy_(weight * std)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor, return_preactivations: bool = False) -> Any:
        """Logits; with ``return_preactivations`` also every activation's input (list)."""
        preactivations = []
        for linear, norm, noise in zip(self.linears, self.norms, self.noises, strict=True):
            z = noise(norm(linear(x)))
            preactivations.append(z)
            x = self.act(z)
        logits = self.head(x)
        return (logits, preactivations) if return_preactivations else logits

    def resample_noise(self, generator: torch.Generator) -> None:
        for noise in self.noises:
            if isinstance(noise, NoisyShift):
                noise.resample(generator)

    def set_noise(self, active: bool) -> None:
        for noise in self.noises:
            if isinstance(noise, NoisyShift):
                noise.active = active

    @property
    def batchnorms(self) -> list[nn.Module]:
        return [n for n in self.norms if not isinstance(n, nn.Identity)]


# ------------------------------------------------------------------------------------ training


def to_tensors(dataset: Any, dtype: Any = None) -> dict[str, Any]:
    dtype = dtype or torch.float32
    return {
        "x_train": torch.as_tensor(dataset.x_train, dtype=dtype),
        "y_train": torch.as_tensor(dataset.y_train, dtype=torch.int64),
        "x_test": torch.as_tensor(dataset.x_test, dtype=dtype),
        "y_test": torch.as_tensor(dataset.y_test, dtype=torch.int64),
    }


def load_tensors(data: str) -> tuple[Any, dict[str, Any]]:
    """``(dataset, tensors)``: the data set ``load_dataset(data)`` names and its tensors."""
    from .data import load_dataset

    dataset = load_dataset(data)
    return dataset, to_tensors(dataset)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless mini-batch indices: a fresh permutation each epoch, the remainder dropped."""
    if not 2 <= batch_size <= n:
        raise ValueError(
            f"batch_size must be in [2, {n}] (the training set size), got {batch_size}"
        )
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def population_statistics(
    model: Any, x_train: Any, *, batch_size: int, num_batches: int, rng: np.random.Generator
) -> None:
    """Algorithm 2: set every BN layer's running stats to population estimates.

    ``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) E_B[sigma_B^2]`` over ``num_batches`` training
    mini-batches of size ``batch_size`` seen by the training-mode network (batch statistics in
    every BN layer, as during training). Noise layers are switched off meanwhile.
    """
    norms = model.batchnorms
    if not norms:
        return
    sums: dict[int, list[Any]] = {i: [0.0, 0.0] for i in range(len(norms))}

    def hook(index: int) -> Callable[..., None]:
        def record(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            stats = batch_stats(inputs[0].detach(), 1)
            sums[index][0] = sums[index][0] + stats.mean.double()
            sums[index][1] = sums[index][1] + stats.var.double() * (stats.count / (stats.count - 1))

        return record

    handles = [bn.register_forward_hook(hook(i)) for i, bn in enumerate(norms)]
    was_training = model.training
    model.train()
    model.set_noise(False)
    try:
        with torch.no_grad():
            stream = batches(x_train.shape[0], batch_size, rng)
            for _ in range(num_batches):
                model(x_train[torch.as_tensor(next(stream))])
    finally:
        for handle in handles:
            handle.remove()
        model.set_noise(True)
        model.train(was_training)
    with torch.no_grad():
        for i, bn in enumerate(norms):
            bn.running_mean.copy_(sums[i][0] / num_batches)
            bn.running_var.copy_(sums[i][1] / num_batches)


def evaluate(model: Any, x: Any, y: Any) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` in eval mode (population statistics)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    model.train(was_training)
    return loss, accuracy


@dataclass
class TrainConfig:
    steps: int = 5000
    lr: float = 0.1
    batch_size: int = 60
    eval_every: int = 100
    population_batches: int = 20
    seed: int = 0

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], *, lr: float, batch_size: int, seed: int
    ) -> TrainConfig:
        """The config of one run from an experiment's resolved settings."""
        return cls(
            steps=settings["steps"],
            lr=lr,
            batch_size=batch_size,
            eval_every=settings["eval_every"],
            population_batches=settings["population_batches"],
            seed=seed,
        )


def train(
    model: Any,
    data: dict[str, Any],
    config: TrainConfig,
    *,
    on_eval: Callable[[int, Any], dict[str, Any]] | None = None,
    before_step: Callable[[int, Any, Any, Any], None] | None = None,
    desc: str = "train",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Plain SGD on cross-entropy. Returns one row per evaluation (step 0 included).

    Each row has ``step, train_loss`` (mean mini-batch loss since the last row),
    ``test_loss, test_accuracy`` (eval mode, Algorithm 2 statistics) and whatever ``on_eval``
    adds; ``before_step(step, model, xb, yb)`` runs before each step's gradient (probes).
    """
    from .common import progress

    rng = np.random.default_rng(config.seed)
    noise_generator = torch.Generator().manual_seed(config.seed + 1)
    stream = batches(data["x_train"].shape[0], config.batch_size, rng)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    rows: list[dict[str, Any]] = []
    running: list[float] = []

    def record(step: int) -> None:
        population_statistics(
            model,
            data["x_train"],
            batch_size=config.batch_size,
            num_batches=config.population_batches,
            rng=np.random.default_rng((config.seed, step)),
        )
        test_loss, test_accuracy = evaluate(model, data["x_test"], data["y_test"])
        row = {
            "step": step,
            "train_loss": float(np.mean(running)) if running else None,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
        if on_eval is not None:
            row.update(on_eval(step, model))
        rows.append(row)
        running.clear()

    model.train()
    record(0)
    for step in progress(
        range(1, config.steps + 1), total=config.steps, desc=desc, enabled=show_progress
    ):
        index = torch.as_tensor(next(stream))
        xb, yb = data["x_train"][index], data["y_train"][index]
        model.resample_noise(noise_generator)
        if before_step is not None:
            before_step(step, model, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            record(step)
    return rows
