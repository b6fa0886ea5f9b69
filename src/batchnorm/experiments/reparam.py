"""The reparameterisation view of batch norm (Kohler et al. 2019), checked numerically.

With population statistics and zero-mean input x, the variance of x^T w is w^T S w where
S = E[x x^T]; so::

    BN(x^T w) = gamma * x^T w / sqrt(w^T S w + eps) + beta  =  x^T w_tilde + beta,
    w_tilde   = gamma * w / ||w||_S,         ||w||_S = sqrt(w^T S w + eps)

(``seeds/003`` writes it without eps; we keep eps in both sides so the comparison is exact up to
rounding, and report separately how much eps itself moves the output.) Batch norm of a linear
unit is the unit reparameterised by *direction* (in the S geometry) and *length* gamma; with
whitened input (S = I) it is exactly weight normalisation.

A consequence the ``moments`` experiment sees: the loss does not depend on the length of w, so
its true gradient is orthogonal to w (w^T dl/dw = 0). Dropping the gradient through the
variance breaks that; the check below measures both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..reference import backward, batch_norm_infer, batch_norm_train, batch_stats
from .common import write_records

__all__ = ["identity_check", "gradient_orthogonality", "run", "CONFIGS"]

#: (n examples, d inputs, k units) of the checks the report shows.
CONFIGS = ((256, 4, 3), (2000, 20, 8), (5000, 64, 16))


def _zero_mean_data(n: int, d: int, rng: np.random.Generator, whiten: bool) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)  # correlated features
    x = rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) * 3.0
    x = x - x.mean(axis=0)  # the identity needs zero-mean input
    if whiten:
        # S = x^T x / n = I after this (symmetric inverse square root of S).
        values, vectors = np.linalg.eigh(x.T @ x / n)
        x = x @ vectors @ np.diag(values**-0.5) @ vectors.T
    return x


def identity_check(
    n: int = 2000,
    d: int = 20,
    k: int = 8,
    *,
    seed: int = 0,
    eps: float = 1e-12,
    whiten: bool = False,
) -> dict[str, Any]:
    """max |BN(x^T W) - x^T W_tilde - beta| over all n x k outputs, in float64."""
    rng = np.random.default_rng(seed)
    x = _zero_mean_data(n, d, rng, whiten)
    w = rng.normal(size=(d, k)) * rng.uniform(0.1, 10.0, size=k)  # lengths should not matter
    gamma, beta = rng.uniform(0.5, 2.0, size=k), rng.normal(size=k)
    z = x @ w
    population = batch_stats(z, axis=1)  # the whole data set is the population here
    bn = batch_norm_infer(z, population.mean, population.var, gamma, beta, axis=1, eps=eps)
    s = x.T @ x / n
    norm_s = np.sqrt(np.einsum("dk,de,ek->k", w, s, w) + eps)
    reparam = x @ (gamma * w / norm_s) + beta
    weight_norm = x @ (gamma * w / np.linalg.norm(w, axis=0)) + beta
    bn_no_eps_effect = np.max(
        np.abs(
            bn - batch_norm_infer(z, population.mean, population.var, gamma, beta, eps=eps * 1e-3)
        )
    )
    scale = float(np.max(np.abs(bn)))
    return {
        "n": n,
        "d": d,
        "k": k,
        "seed": seed,
        "eps": eps,
        "whitened": whiten,
        "max_abs_error": float(np.max(np.abs(bn - reparam))),
        "max_rel_error": float(np.max(np.abs(bn - reparam)) / scale),
        "max_abs_diff_to_weight_norm": float(np.max(np.abs(bn - weight_norm))),
        "eps_effect": float(bn_no_eps_effect),
        "max_abs_population_mean": float(np.max(np.abs(population.mean))),
        "sample": {"bn": bn[:200, 0], "reparam": reparam[:200, 0]},
    }


def gradient_orthogonality(
    n: int = 256, d: int = 10, k: int = 6, *, seed: int = 0, eps: float = 1e-5
) -> dict[str, Any]:
    """|w_j^T dl/dw_j| / (||w_j|| ||dl/dw_j||) for a random loss, per gradient variant.

    The layer is z = x W, y = BN(z) in training mode; l = sum(dl/dy * y) for a random dl/dy.
    """
    rng = np.random.default_rng(seed)
    x = _zero_mean_data(n, d, rng, whiten=False)
    w = rng.normal(size=(d, k))
    dy = rng.normal(size=(n, k))
    _, saved = batch_norm_train(x @ w, eps=eps)
    result: dict[str, Any] = {"n": n, "d": d, "k": k, "seed": seed, "eps": eps, "variants": {}}
    for name, tm, tv in (
        ("full", True, True),
        ("no mean grad", False, True),
        ("no var grad", True, False),
        ("neither", False, False),
    ):
        dz = backward(dy, saved, through_mean=tm, through_var=tv).dx
        dw = x.T @ dz
        cosine = np.abs(np.sum(w * dw, axis=0)) / (
            np.linalg.norm(w, axis=0) * np.linalg.norm(dw, axis=0)
        )
        result["variants"][name] = {"max_abs_cosine_w_grad": float(np.max(cosine))}
    return result


def run(
    out: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    configs: Sequence[tuple[int, int, int]] = CONFIGS,
    plot: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    rows = []
    checks = []
    for index, (n, d, k) in enumerate(configs[:2] if quick else configs):
        for whiten in (False, True):
            check = identity_check(n, d, k, seed=seed + index, whiten=whiten)
            checks.append(check)
            rows.append(
                {
                    key: check[key]
                    for key in (
                        "n",
                        "d",
                        "k",
                        "whitened",
                        "max_abs_error",
                        "max_rel_error",
                        "max_abs_diff_to_weight_norm",
                        "eps_effect",
                        "eps",
                    )
                }
            )
    orth = gradient_orthogonality(seed=seed)
    record = {
        "experiment": "reparam",
        "config": {"seed": seed, "quick": quick, "dtype": "float64"},
        "checks": rows,
        "sample": checks[1 if len(checks) > 1 else 0]["sample"],
        "orthogonality": orth,
        "summary": {
            "max_abs_error": max(r["max_abs_error"] for r in rows),
            "tolerance": 1e-6,
            "passed": max(r["max_abs_error"] for r in rows) <= 1e-6,
        },
    }
    write_records(
        out,
        record,
        {
            "identity.csv": rows,
            "orthogonality.csv": [{"variant": k, **v} for k, v in orth["variants"].items()],
        },
    )
    if plot:
        from .plots import plot_reparam

        plot_reparam(out)
    return record
