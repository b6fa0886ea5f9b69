"""``batchnorm verify``: check the reference against its oracles on fresh random data.

Each check returns a row (name, max error, tolerance, passed). The oracles are float64
directional finite differences, the paper's staged derivation, the closed-form Jacobian and,
when PyTorch is installed, ``torch.nn.functional.batch_norm``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import reference as ref
from ._args import non_negative_int
from ._xp import to_channel_rows

__all__ = ["Check", "run_checks", "format_table", "main"]


@dataclass(frozen=True)
class Check:
    name: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance


def _max_rel(a, b, scale: float | None = None) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = scale if scale is not None else max(float(np.max(np.abs(b))), 1e-300)
    return float(np.max(np.abs(a - b)) / denom)


def _directional_fd(loss: Callable[[np.ndarray], float], a: np.ndarray, v: np.ndarray) -> float:
    """(L(a + h v) - L(a - h v)) / 2h: the derivative of L along v, float64."""
    h = 1e-6
    return (loss(a + h * v) - loss(a - h * v)) / (2 * h)


def _check_gradients(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> list[Check]:
    x = rng.normal(size=shape) * 2 + 1
    c = shape[axis]
    gamma, beta, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
    eps = 1e-3
    _, saved = ref.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
    grads = ref.backward(dy, saved)
    label = f"{shape} axis={axis}"
    rows = []
    for name, arg, analytic in (
        ("dx", 0, grads.dx),
        ("dgamma", 1, grads.dgamma),
        ("dbeta", 2, grads.dbeta),
    ):
        args = [x, gamma, beta]

        def loss(a, arg=arg, args=args):
            call = list(args)
            call[arg] = a
            y, _ = ref.batch_norm_train(call[0], call[1], call[2], axis=axis, eps=eps)
            return float(np.sum(y * dy))

        errs = []
        for _ in range(4):
            v = rng.normal(size=args[arg].shape)
            fd = _directional_fd(loss, args[arg], v)
            exact = float(np.sum(analytic * v))
            errs.append(abs(fd - exact) / max(abs(fd), 1.0))
        rows.append(Check(f"{name} vs finite differences {label}", max(errs), 1e-7))
    staged = ref.staged_backward(dy, x, gamma, axis=axis, eps=eps)
    term = float(np.max(np.abs(staged.dl_dxhat))) * float(np.max(staged.invstd))
    rows.append(
        Check(f"staged == compact dx {label}", _max_rel(staged.dl_dx, grads.dx, term), 1e-12)
    )
    vanish = float(np.max(np.abs(staged.dl_dmean_vanishing)))
    rows.append(
        Check(
            f"vanishing dl/dmean term {label}",
            vanish / (float(np.max(np.abs(staged.dl_dmean_direct))) + 1.0),
            1e-12,
            "dl/dvar * sum(-2(x - mean))/m, zero since sum(x - mean) = 0",
        )
    )
    return rows


def _check_jacobian(rng: np.random.Generator) -> list[Check]:
    x = rng.normal(size=(6, 3, 2)) * 3 + 2
    gamma = rng.normal(size=3)
    jac = ref.jacobian(x, gamma, eps=1e-3)
    dy = rng.normal(size=x.shape)
    _, saved = ref.batch_norm_train(x, gamma, axis=1, eps=1e-3)
    dx_rows = to_channel_rows(ref.backward(dy, saved).dx, 1, np)
    dy_rows = to_channel_rows(dy, 1, np)
    via_jac = np.einsum("cij,ci->cj", jac, dy_rows)
    scale = float(np.max(np.abs(jac)))
    jac0 = ref.jacobian(x, gamma, eps=0.0)
    x_hat0 = (to_channel_rows(x, 1, np) - saved.mean[:, None]) / np.sqrt(saved.var)[:, None]
    return [
        Check("Jacobian^T dy == backward dx", _max_rel(via_jac, dx_rows), 1e-12),
        Check(
            "Jacobian rows sum to 0",
            float(np.max(np.abs(jac.sum(-1)))) / scale,
            1e-12,
            "the 'triangle' cancels for a uniform shift",
        ),
        Check(
            "Jacobian symmetric", float(np.max(np.abs(jac - jac.transpose(0, 2, 1)))) / scale, 1e-14
        ),
        Check(
            "x_hat in Jacobian null space (eps=0)",
            float(np.max(np.abs(np.einsum("cij,cj->ci", jac0, x_hat0)))) / scale,
            1e-12,
        ),
    ]


def _check_moments_as_constants(rng: np.random.Generator) -> list[Check]:
    """With a moment frozen the gradient must move away from the true one (error > 1e-2).

    Freezing the mean drops gamma*invstd*mean(dy), freezing the variance
    gamma*invstd*x_hat*mean(dy*x_hat): dy is made with both means near 1 (not left to chance
    near 0, which failed one seed in 60), so each gap is of order 1 whatever the seed."""
    x = rng.normal(size=(8, 2)) * 2 + 3
    _, saved = ref.batch_norm_train(x)
    x_hat = (x - saved.mean) * saved.invstd
    dy = 1.0 + x_hat + 0.3 * rng.normal(size=(8, 2))
    true_dx = ref.backward(dy, saved).dx
    rows = []
    for label, kwargs in (("mean", {"through_mean": False}), ("var", {"through_var": False})):
        dx = ref.backward(dy, saved, **kwargs).dx
        gap = _max_rel(dx, true_dx)
        rows.append(
            Check(
                f"{label} as constant differs from true dx (1/gap)",
                1.0 / gap if gap > 0 else float("inf"),
                1e2,
                f"relative gap {gap:.3g}",
            )
        )
    return rows


def _check_numerics(rng: np.random.Generator) -> list[Check]:
    x = (1e4 + rng.normal(size=(8192, 4))).astype(np.float32)
    true_var = x.astype(np.float64).var(axis=0)
    _, saved = ref.batch_norm_train(x)
    err = float(np.max(np.abs(saved.var - true_var) / true_var))
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
    g, b = rng.normal(size=4), rng.normal(size=4)
    xi = rng.normal(size=(5, 4, 3))
    y = ref.batch_norm_infer(xi, rm, rv, g, b)
    scale, shift = ref.fold(rm, rv, g, b)
    folded = xi * scale[None, :, None] + shift[None, :, None]
    return [
        Check("variance at x = 1e4 + N(0,1), float32", err, 1e-3, "two-pass centred"),
        Check("inference == fold(scale, shift)", _max_rel(y, folded), 1e-12),
    ]


def _check_running(rng: np.random.Generator) -> list[Check]:
    batches = [rng.normal(size=(6, 3)) + i for i in range(4)]
    rm, rv, tracked = np.zeros(3), np.ones(3), 0
    exp_m, exp_v = np.zeros(3), np.ones(3)
    for x in batches:
        _, s = ref.batch_norm_train(x)
        rm, rv, tracked = ref.update_running_stats(rm, rv, tracked, s.mean, s.var, s.count)
        exp_m = 0.9 * exp_m + 0.1 * x.mean(0)
        exp_v = 0.9 * exp_v + 0.1 * x.var(0, ddof=1)
    return [
        Check(
            "running stats, 4 steps, momentum 0.1 unbiased",
            max(_max_rel(rm, exp_m), _max_rel(rv, exp_v)),
            1e-13,
        )
    ]


def _check_torch_peer(rng: np.random.Generator) -> list[Check]:
    try:
        import torch
    except ImportError:
        return []
    x = rng.normal(size=(4, 3, 5, 5))
    g, b, dy = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    xt = torch.tensor(x, requires_grad=True)
    gt, bt = torch.tensor(g, requires_grad=True), torch.tensor(b, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    yt.backward(torch.tensor(dy))
    y, saved = ref.batch_norm_train(torch.tensor(x), torch.tensor(g), torch.tensor(b))
    grads = ref.backward(torch.tensor(dy), saved)
    err = max(
        _max_rel(y.numpy(), yt.detach().numpy()),
        _max_rel(grads.dx.numpy(), xt.grad),
        _max_rel(grads.dgamma.numpy(), gt.grad),
        _max_rel(grads.dbeta.numpy(), bt.grad),
    )
    return [Check("torch tensors == torch.nn.functional.batch_norm", err, 1e-10)]


def run_checks(seed: int | None = None) -> list[Check]:
    """Run every check on fresh random data (``seed=None``) or reproducibly."""
    rng = np.random.default_rng(seed)
    rows: list[Check] = []
    for shape, axis in (((16, 4), 1), ((4, 3, 5, 5), 1), ((3, 4, 4, 3), -1), ((2, 2), 1)):
        rows += _check_gradients(rng, shape, axis)
    rows += _check_jacobian(rng)
    rows += _check_moments_as_constants(rng)
    rows += _check_numerics(rng)
    rows += _check_running(rng)
    rows += _check_torch_peer(rng)
    return rows


def format_table(rows: Sequence[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'check':<{width}}  {'max error':>10}  {'tolerance':>9}  result", "-" * (width + 32)]
    for r in rows:
        verdict = "pass" if r.passed else "FAIL"
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<{width}}  {r.error:>10.2e}  {r.tolerance:>9.0e}  {verdict}{note}")
    failed = sum(not r.passed for r in rows)
    lines.append(f"\n{len(rows) - failed}/{len(rows)} checks passed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchnorm verify", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seed", type=non_negative_int, default=None, help="seed (default: fresh data)"
    )
    args = parser.parse_args(argv)
    rows = run_checks(args.seed)
    print(format_table(rows))
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
