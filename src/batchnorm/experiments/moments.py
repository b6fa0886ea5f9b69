"""Why the moments carry gradient: the ablation ``seeds/000`` and ``seeds/004`` ask about.

Two parts.

**The minimal case** (Ioffe & Szegedy 2015, section 2). A layer adds a learned bias b to its
input u and subtracts the mean: x = u + b, x_hat = x - E[x]. If the gradient step ignores that
E[x] depends on b, then b <- b + delta_b with delta_b = -lr * sum_i dl/dx_hat_i (the same every
step, since x_hat and so the loss never change): b drifts by a constant amount per step, forever,
while the loss stays exactly where it was. With the true gradient dl/db = sum_i dl/dx_hat_i *
(1 - 1/m * m) = 0: b gets no update at all. The same happens to a scale c with
x_hat = c u / std(c u) when the std is held constant (c drifts, the loss does not move).

**The ablation.** The ``ioffe`` network (3 x 100 sigmoid, BN before each sigmoid) trained with
the full BN gradient, with no gradient through the mean (``through_mean=False``), none through
the variance (``through_var=False``) and neither. Recorded: loss, accuracy, and the norms of the
pre-BN linear biases (the true gradient leaves them at 0) and weights (the loss is invariant to
their scale, so the true gradient is orthogonal to them and their norm only creeps up). Then the
gradient each variant computes, at one point in parameter space, against float64 central finite
differences of the actual loss: only the full gradient agrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    Timer,
    curves_over_seeds,
    resolve_settings,
    seed_runs,
    write_records,
)

__all__ = ["minimal_case", "gradient_check", "run", "VARIANTS", "DEFAULTS", "QUICK"]

#: name -> (through_mean, through_var)
VARIANTS = {
    "full": (True, True),
    "no mean grad": (False, True),
    "no var grad": (True, False),
    "neither": (False, False),
}
DEFAULTS = {
    "steps": 3000,
    "eval_every": 100,
    "seeds": 3,
    "population_batches": 20,
    "fd_coordinates": 12,
}
QUICK = {"steps": 600, "eval_every": 100, "seeds": 1, "population_batches": 10, "fd_coordinates": 6}


# -------------------------------------------------------------------------------- minimal case


def minimal_case(steps: int = 25, *, m: int = 8, lr: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Gradient descent on the bias b (and, separately, a scale c), with and without the moment's
    gradient; float64 autograd, where "constant" means ``.detach()``.

    loss = mean((x_hat - t)^2) with targets t of non-zero mean, so sum_i dl/dx_hat_i != 0.
    The shift drifts by a constant per step; the scale (whose gradient is k/c) drifts with c^2
    growing by 2 lr k + (lr k / c)^2 per step, nearly a constant.
    """
    import torch

    rng = np.random.default_rng(seed)
    u = torch.tensor(rng.normal(size=m))
    u_hat = (u - u.mean()) / u.std(unbiased=False)
    # Targets with a non-zero mean (so the shift has somewhere to drift) that ask for a larger
    # spread than x_hat can have (so the scale drifts upward rather than through zero).
    t = 1.0 + 1.5 * u_hat + 0.3 * torch.tensor(rng.normal(size=m))

    def shift_loss(b: torch.Tensor, detach: bool) -> torch.Tensor:
        x = u + b
        mean = x.mean()
        x_hat = x - (mean.detach() if detach else mean)
        return ((x_hat - t) ** 2).mean()

    def scale_loss(c: torch.Tensor, detach: bool) -> torch.Tensor:
        x = c * u
        std = x.std(unbiased=False)
        x_hat = (x - x.mean()) / (std.detach() if detach else std)
        return ((x_hat - t) ** 2).mean()

    result: dict[str, Any] = {
        "m": m,
        "lr": lr,
        "steps": steps,
        "seed": seed,
        "inputs": u.numpy(),
        "targets": t.numpy(),
    }
    for name, loss_fn, start in (("shift", shift_loss, 0.0), ("scale", scale_loss, 1.0)):
        for variant, detach in (("true gradient", False), ("moment as constant", True)):
            param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
            values, losses, grads = [], [], []
            for _ in range(steps + 1):
                loss = loss_fn(param, detach)
                (grad,) = torch.autograd.grad(loss, param)
                values.append(param.item())
                losses.append(loss.item())
                grads.append(grad.item())
                with torch.no_grad():
                    param -= lr * grad
            increments = np.diff(values)
            result[f"{name}/{variant}"] = {
                "param": values,
                "loss": losses,
                "grad": grads,
                "max_abs_grad": float(np.max(np.abs(grads))),
                "max_loss_change": float(np.max(np.abs(np.array(losses) - losses[0]))),
                "increment_mean": float(np.mean(increments)),
                "increment_spread": float(np.max(increments) - np.min(increments)),
                "final_param": values[-1],
            }
    return result


# ------------------------------------------------------------------------------ gradient check


def _named_groups(model: Any) -> list[tuple[str, Any]]:
    groups = []
    for i, (linear, bn) in enumerate(zip(model.linears, model.norms, strict=True), start=1):
        groups += [
            (f"linear{i}.weight", linear.weight),
            (f"linear{i}.bias (pre-BN)", linear.bias),
            (f"bn{i}.gamma", bn.weight),
            (f"bn{i}.beta", bn.bias),
        ]
    groups += [("head.weight", model.head.weight), ("head.bias", model.head.bias)]
    return groups


def gradient_check(
    state: dict[str, Any],
    xb: Any,
    yb: Any,
    *,
    in_features: int,
    num_classes: int,
    coordinates: int = 12,
    h: float = 1e-6,
    seed: int = 0,
    backend: str = "auto",
) -> dict[str, Any]:
    """Each variant's gradient vs float64 central finite differences of the true loss.

    The network (``state``, cast to float64) is evaluated in training mode on one mini-batch
    ``(xb, yb)``. For each parameter tensor, ``coordinates`` random entries are perturbed by
    +-h; ``rel_error = ||g - fd|| / ||fd||`` over them (the pre-BN biases have fd = 0 up to
    rounding, so there ``abs_error = ||g - fd||`` is the number to read).
    """
    import torch

    from .models import MLP

    rng = np.random.default_rng(seed)
    x64, y = xb.to(torch.float64), yb
    models = {}
    for variant, (tm, tv) in VARIANTS.items():
        model = MLP(
            in_features,
            num_classes,
            norm="bn",
            through_mean=tm,
            through_var=tv,
            dtype=torch.float64,
            backend=backend,
        )
        model.load_state_dict(
            {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in state.items()}
        )
        model.train()
        models[variant] = model

    def loss_of(model: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x64), y)

    reference = models["full"]
    groups = _named_groups(reference)
    picks = {
        name: rng.choice(p.numel(), size=min(coordinates, p.numel()), replace=False)
        for name, p in groups
    }
    finite_differences = {}
    with torch.no_grad():
        for name, param in groups:
            flat = param.view(-1)
            values = []
            for index in picks[name]:
                original = flat[index].item()
                flat[index] = original + h
                plus = loss_of(reference).item()
                flat[index] = original - h
                minus = loss_of(reference).item()
                flat[index] = original
                values.append((plus - minus) / (2 * h))
            finite_differences[name] = np.array(values)
    table = []
    for name, _ in groups:
        row: dict[str, Any] = {
            "group": name,
            "fd_norm": float(np.linalg.norm(finite_differences[name])),
        }
        table.append(row)
    for variant, model in models.items():
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()
        for row, (name, param) in zip(table, _named_groups(model), strict=True):
            g = param.grad.view(-1)[torch.as_tensor(picks[name])].numpy()
            error = float(np.linalg.norm(g - finite_differences[name]))
            row[f"{variant}/abs_error"] = error
            # A pre-BN bias has a true gradient of 0: a relative error means nothing there.
            row[f"{variant}/rel_error"] = error / row["fd_norm"] if row["fd_norm"] > 1e-9 else None
            row[f"{variant}/grad_norm"] = float(np.linalg.norm(g))
    overall = {}
    fd_all = np.concatenate([finite_differences[name] for name, _ in groups])
    for variant in VARIANTS:
        abs_errors = np.array([row[f"{variant}/abs_error"] for row in table])
        overall[variant] = float(np.sqrt(np.sum(abs_errors**2)) / np.linalg.norm(fd_all))
    return {
        "h": h,
        "coordinates_per_tensor": coordinates,
        "table": table,
        "overall_rel_error": overall,
    }


# ------------------------------------------------------------------------------------ ablation


def _norms(model: Any) -> dict[str, float]:
    values: dict[str, float] = {}
    biases, weights = [], []
    for i, linear in enumerate(model.linears, start=1):
        b, w = linear.bias.detach().norm().item(), linear.weight.detach().norm().item()
        values[f"bias_norm_{i}"], values[f"weight_norm_{i}"] = b, w
        biases.append(b)
        weights.append(w)
    values["bias_norm"] = float(np.sqrt(np.sum(np.square(biases))))
    values["weight_norm"] = float(np.sqrt(np.sum(np.square(weights))))
    return values


def run(
    out: str | Path,
    *,
    data: str = "mnist1d",
    seed: int = 0,
    seeds: int | None = None,
    steps: int | None = None,
    lr: float = 0.1,
    init_std: float = 0.1,
    batch_size: int = 60,
    quick: bool = False,
    backend: str = "auto",
    progress: bool = True,
    plot: bool = True,
) -> dict[str, Any]:
    import torch

    from .models import MLP, TrainConfig, load_tensors, train

    settings = resolve_settings(DEFAULTS, QUICK, quick=quick, steps=steps, seeds=seeds)
    dataset, tensors = load_tensors(data)
    with Timer() as timer:
        minimal = minimal_case(seed=seed)
        runs, rows = [], []
        probe_state = None
        for variant, k, run_seed in seed_runs(VARIANTS, settings["seeds"], seed):
            tm, tv = VARIANTS[variant]
            model = MLP(
                dataset.num_features,
                dataset.num_classes,
                norm="bn",
                through_mean=tm,
                through_var=tv,
                init_std=init_std,
                seed=run_seed,
                backend=backend,
            )
            history = train(
                model,
                tensors,
                TrainConfig.from_settings(settings, lr=lr, batch_size=batch_size, seed=run_seed),
                on_eval=lambda step, m: _norms(m),
                desc=f"moments {variant} seed {run_seed}",
                show_progress=progress,
            )
            runs.append({"variant": variant, "seed": run_seed, "history": history})
            rows += [{"variant": variant, "seed": run_seed, **row} for row in history]
            if variant == "full" and k == 0:
                probe_state = {k2: v.detach().clone() for k2, v in model.state_dict().items()}
        # One point in parameter space for every variant: the trained full-gradient network.
        batch = np.random.default_rng(seed).choice(
            tensors["x_train"].shape[0], batch_size, replace=False
        )
        index = torch.as_tensor(batch)
        check = gradient_check(
            probe_state,
            tensors["x_train"][index],
            tensors["y_train"][index],
            in_features=dataset.num_features,
            num_classes=dataset.num_classes,
            coordinates=settings["fd_coordinates"],
            seed=seed,
            backend=backend,
        )

    curves: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    keys = ("test_accuracy", "test_loss", "train_loss", "bias_norm", "weight_norm")
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        curves[variant] = curves_over_seeds(mine, keys)
        last = [r["history"][-1] for r in mine]
        summary[variant] = {
            **{f"final_{key}": float(np.mean([row[key] for row in last])) for key in keys},
            "initial_weight_norm": float(np.mean([r["history"][0]["weight_norm"] for r in mine])),
            "gradient_rel_error": check["overall_rel_error"][variant],
        }
    record = {
        "experiment": "moments",
        "config": {
            "data": dataset.describe(),
            "lr": lr,
            "init_std": init_std,
            "batch_size": batch_size,
            "hidden": [100, 100, 100],
            "activation": "sigmoid",
            "seed": seed,
            "quick": quick,
            "backend": backend,
            **settings,
        },
        "variants": {
            k: {"through_mean": tm, "through_var": tv} for k, (tm, tv) in VARIANTS.items()
        },
        "minimal_case": minimal,
        "gradient_check": check,
        "summary": summary,
        "curves": curves,
        "runs": runs,
        "seconds": timer.seconds,
    }
    minimal_rows = []
    for key, value in minimal.items():
        if isinstance(value, dict):
            minimal_rows += [
                {"case": key, "step": i, "param": p, "loss": loss, "grad": g}
                for i, (p, loss, g) in enumerate(
                    zip(value["param"], value["loss"], value["grad"], strict=True)
                )
            ]
    out = write_records(
        out,
        record,
        {
            "curves.csv": rows,
            "gradient_check.csv": check["table"],
            "minimal_case.csv": minimal_rows,
        },
    )
    if plot:
        from .plots import plot_moments

        plot_moments(out)
    return record
