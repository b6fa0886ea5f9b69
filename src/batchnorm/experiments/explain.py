"""``batchnorm explain``: the backward of batch norm, stage by stage, on numbers you can check.

It answers the question of ``seeds/000`` and ``seeds/004`` ("why take the gradient of the mean
and variance?") with the reference implementation only:

1. a three-example batch (the computation graph of ``seeds/003``) with every staged derivative
   of the paper's page-4 chain rule printed, checked against the compact backward and against
   float64 finite differences, and next to what the moments-as-constants gradient would be;
2. the two-sample example of ``seeds/000``: with dl/dy = (1, 1) the true input gradient is 0;
   with the mean treated as a constant both inputs are pushed the same way, and after that step
   the layer's output is exactly what it was (the step was wasted);
3. the computation graph as Graphviz DOT, each edge labelled with its local derivative, the
   "triangle" of ``seeds/002`` marked (x_1 -> x_hat_1 directly and through mu), rendered to
   SVG/PNG when ``dot`` is installed;
4. the matrix backprop multiplies dl/dy by (the Jacobian), with and without each moment's
   gradient, as a heatmap (drawn by ``plots.plot_explain`` from the records).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._args import non_negative_int, out_dir
from ..reference import (
    backward,
    batch_norm_train,
    jacobian,
    staged_backward,
)
from .common import write_json

__all__ = [
    "staged_example",
    "two_sample_example",
    "backprop_matrices",
    "graph_dot",
    "render_dot",
    "format_staged",
    "format_two_sample",
    "run",
    "main",
]

#: The three-example batch of ``seeds/003``'s computation graph (one channel).
EXAMPLE_X = (1.0, 2.0, 6.0)
EXAMPLE_DY = (0.5, -1.0, 2.0)
EXAMPLE_GAMMA = 2.0
EXAMPLE_BETA = 0.5
EXAMPLE_EPS = 1e-5

ABLATIONS = {
    "full": (True, True),
    "no mean grad": (False, True),
    "no var grad": (True, False),
    "neither": (False, False),
}


def _column(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)  # (m, C=1)


def _loss_gradient_fd(x: np.ndarray, dy: np.ndarray, gamma, beta, eps: float, h: float = 1e-6):
    """Central finite differences of l(x) = sum(dy * BN(x)) in float64: the independent oracle."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        y_plus, _ = batch_norm_train(plus, gamma, beta, eps=eps)
        y_minus, _ = batch_norm_train(minus, gamma, beta, eps=eps)
        grad[index] = np.sum(dy * (y_plus - y_minus)) / (2 * h)
    return grad


def staged_example(
    x: Sequence[float] = EXAMPLE_X,
    dy: Sequence[float] = EXAMPLE_DY,
    *,
    gamma: float = EXAMPLE_GAMMA,
    beta: float = EXAMPLE_BETA,
    eps: float = EXAMPLE_EPS,
) -> dict[str, Any]:
    """Every quantity of the paper's chain rule for one channel, plus the checks that tie it."""
    xs, dys = _column(x), _column(dy)
    g, b = np.array([gamma]), np.array([beta])
    y, saved = batch_norm_train(xs, g, b, eps=eps)
    staged = staged_backward(dys, xs, g, eps=eps)
    compact = backward(dys, saved)
    fd = _loss_gradient_fd(xs, dys, g, b, eps)
    ablated = {
        name: backward(dys, saved, through_mean=tm, through_var=tv).dx[:, 0]
        for name, (tm, tv) in ABLATIONS.items()
    }
    return {
        "m": len(x),
        "x": xs[:, 0],
        "dl_dy": dys[:, 0],
        "gamma": gamma,
        "beta": beta,
        "eps": eps,
        "mean": staged.mean[0],
        "var": staged.var[0],
        "invstd": staged.invstd[0],
        "x_hat": staged.x_hat[:, 0],
        "y": y[:, 0],
        "dl_dxhat": staged.dl_dxhat[:, 0],
        "dl_dvar": staged.dl_dvar[0],
        "dl_dmean_direct": staged.dl_dmean_direct[0],
        "dl_dmean_vanishing": staged.dl_dmean_vanishing[0],
        "dl_dmean": staged.dl_dmean[0],
        "dl_dx": staged.dl_dx[:, 0],
        "dl_dgamma": staged.dl_dgamma[0],
        "dl_dbeta": staged.dl_dbeta[0],
        "dl_dx_compact": compact.dx[:, 0],
        "dl_dx_finite_differences": fd[:, 0],
        "max_diff_staged_vs_compact": float(np.max(np.abs(staged.dl_dx - compact.dx))),
        "max_diff_staged_vs_fd": float(np.max(np.abs(staged.dl_dx - fd))),
        "dl_dx_ablations": ablated,
        "max_diff_ablations_vs_fd": {
            k: float(np.max(np.abs(v - fd[:, 0]))) for k, v in ablated.items()
        },
    }


def two_sample_example(
    x: Sequence[float] = (1.0, 3.0), *, lr: float = 0.1, eps: float = EXAMPLE_EPS
) -> dict[str, Any]:
    """``seeds/000``: y_i = x_i - mean with dl/dy = (1, 1); then the same on full batch norm."""
    xs = np.asarray(x, dtype=np.float64)
    dl_dy = np.ones_like(xs)
    m = xs.size
    # Centring only, the seed's algebra: dl/dmean = -sum(dl/dy); dl/dx_i = dl/dy_i + dl/dmean/m.
    dl_dmean = -np.sum(dl_dy)
    centring = {
        "dl_dmean": dl_dmean,
        "dl_dx_true": dl_dy + dl_dmean / m,
        "dl_dx_mean_constant": dl_dy.copy(),
    }
    # Full batch norm through the reference; one SGD step on x with each gradient.
    column = _column(xs)
    y, saved = batch_norm_train(column, eps=eps)
    steps = {}
    for name, through_mean in (("true", True), ("mean constant", False)):
        dx = backward(_column(dl_dy), saved, through_mean=through_mean).dx
        x_new = column - lr * dx
        y_new, _ = batch_norm_train(x_new, eps=eps)
        steps[name] = {
            "dl_dx": dx[:, 0],
            "x_after_step": x_new[:, 0],
            "y_after_step": y_new[:, 0],
            "output_change": float(np.max(np.abs(y_new - y))),
        }
    return {
        "x": xs,
        "dl_dy": dl_dy,
        "lr": lr,
        "centring": centring,
        "batch_norm": {"y": y[:, 0], "steps": steps},
    }


def backprop_matrices(m: int = 8, seed: int = 0, *, eps: float = EXAMPLE_EPS) -> dict[str, Any]:
    """The matrix ``M`` with dl/dx = M dl/dy, for each ablation, on one channel of m values.

    For the true gradient ``M`` is the Jacobian (symmetric, so no transpose question); it is
    checked against the closed form ``reference.jacobian``. ``shift_leak`` = max_i |sum_l M_li|
    measures how much a backward step moves the batch mean (which the forward ignores), and
    ``scale_leak`` = max_i |sum_l x_hat_l M_li| how much it rescales the batch.
    """
    rng = np.random.default_rng(seed)
    x = _column(3.0 + 2.0 * rng.normal(size=m))
    _, saved = batch_norm_train(x, eps=eps)
    x_hat = ((x - saved.mean) * saved.invstd)[:, 0]
    eye = np.eye(m)
    result: dict[str, Any] = {"m": m, "x": x[:, 0], "x_hat": x_hat, "matrices": {}}
    for name, (tm, tv) in ABLATIONS.items():
        columns = [
            backward(_column(eye[i]), saved, through_mean=tm, through_var=tv).dx[:, 0]
            for i in range(m)
        ]
        matrix = np.stack(columns, axis=1)  # column i = dl/dx for dl/dy = e_i
        result["matrices"][name] = {
            "M": matrix,
            "shift_leak": float(np.max(np.abs(matrix.sum(axis=0)))),
            "scale_leak": float(np.max(np.abs(x_hat @ matrix))),
        }
    closed_form = jacobian(x, eps=eps)[0]
    result["max_diff_full_vs_closed_form_jacobian"] = float(
        np.max(np.abs(result["matrices"]["full"]["M"] - closed_form))
    )
    return result


# ------------------------------------------------------------------------------------- text


def _vec(values: Sequence[float], width: int = 9) -> str:
    return "[" + ", ".join(f"{v:{width}.5f}" for v in values) + "]"


def format_staged(r: dict[str, Any]) -> str:
    m = r["m"]
    lines = [
        f"Batch norm backward, stage by stage (Ioffe & Szegedy 2015, page 4); one channel, m = {m}",
        f"  x        = {_vec(r['x'])}      gamma = {r['gamma']}, beta = {r['beta']}, "
        f"eps = {r['eps']:g}",
        f"  dl/dy    = {_vec(r['dl_dy'])}      (whatever the layers above send back)",
        "forward",
        f"  mu_B     = {r['mean']:.6f}                          = (1/m) sum_i x_i",
        f"  sigma^2  = {r['var']:.6f}                          = (1/m) sum_i (x_i - mu_B)^2",
        f"  invstd   = {r['invstd']:.6f}                          = 1/sqrt(sigma^2 + eps)",
        f"  x_hat    = {_vec(r['x_hat'])}      = (x_i - mu_B) * invstd",
        f"  y        = {_vec(r['y'])}      = gamma * x_hat_i + beta",
        "backward (the chain rule on the graph; every line is one edge family)",
        f"  dl/dx_hat = {_vec(r['dl_dxhat'])}     = dl/dy_i * gamma",
        f"  dl/dvar   = {r['dl_dvar']:.6f}       = sum_i dl/dx_hat_i (x_i - mu_B) (-1/2) "
        "(sigma^2 + eps)^(-3/2)",
        f"  dl/dmu    = {r['dl_dmean']:.6f}       = sum_i dl/dx_hat_i (-invstd)  "
        f"[{r['dl_dmean_direct']:.6f}]",
        f"                                 + dl/dvar * sum_i -2 (x_i - mu_B) / m  "
        f"[{r['dl_dmean_vanishing'] + 0.0:.1e}: zero, because sum_i (x_i - mu_B) = 0]",
        f"  dl/dx     = {_vec(r['dl_dx'])}     = dl/dx_hat_i invstd + dl/dvar 2(x_i - mu_B)/m "
        "+ dl/dmu / m",
        f"  dl/dgamma = {r['dl_dgamma']:.6f}       = sum_i dl/dy_i x_hat_i",
        f"  dl/dbeta  = {r['dl_dbeta']:.6f}       = sum_i dl/dy_i",
        "checks",
        f"  compact form gamma*invstd/m (m dy - sum_dy - x_hat sum_dy_xhat): max |diff| = "
        f"{r['max_diff_staged_vs_compact']:.1e}",
        f"  float64 central finite differences of l = sum_i dl/dy_i y_i:      max |diff| = "
        f"{r['max_diff_staged_vs_fd']:.1e}",
        "if the moments were treated as constants (what the questions propose)",
    ]
    for name, dx in r["dl_dx_ablations"].items():
        if name == "full":
            continue
        lines.append(
            f"  {name:<13} dl/dx = {_vec(dx)}   wrong by up to "
            f"{r['max_diff_ablations_vs_fd'][name]:.3f}"
        )
    return "\n".join(lines)


def format_two_sample(r: dict[str, Any]) -> str:
    c, steps = r["centring"], r["batch_norm"]["steps"]
    x1, x2 = r["x"]
    lines = [
        f"The two-sample example (“why take the gradient of the batch mean?”): "
        f"x = ({x1:g}, {x2:g}), y_i = x_i - mean, "
        "dl/dy = (1, 1)",
        f"  with the mean's gradient:  dl/dmean = -(dl/dy_1 + dl/dy_2) = {c['dl_dmean']:g};  "
        f"dl/dx = dl/dy + dl/dmean/2 = {_vec(c['dl_dx_true'], 4)}",
        f"  mean as a constant:        dl/dx = dl/dy = {_vec(c['dl_dx_mean_constant'], 4)}  "
        "-> both inputs pushed the same way",
        f"Full batch norm (reference), one SGD step on x with lr = {r['lr']}:",
    ]
    for name, s in steps.items():
        lines.append(
            f"  {name:<14} dl/dx = {_vec(s['dl_dx'], 8)}  x -> {_vec(s['x_after_step'], 8)}  "
            f"output change {s['output_change']:.1e}"
        )
    lines.append(
        "  The mean-as-constant step moves both inputs, yet the output does not change: the "
        "next mean absorbs it. Only the true gradient (0 here) says so."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ graph


def graph_dot(r: dict[str, Any]) -> str:
    """Graphviz DOT of batch norm on ``r``'s batch; edges carry their local derivatives."""
    m = r["m"]
    invstd, mean, var, eps = r["invstd"], r["mean"], r["var"], r["eps"]
    red = 'color="#d62728", fontcolor="#d62728", penwidth=2.4'
    lines = [
        "digraph batchnorm {",
        "  rankdir=LR; splines=true; nodesep=0.35; ranksep=1.3;",
        '  node [shape=circle, fontname="Helvetica", fontsize=12, style=filled, '
        'fillcolor="#f4f4f4", color="#555555"];',
        '  edge [fontname="Helvetica", fontsize=9, color="#777777", fontcolor="#333333"];',
        '  mu [label="μ_B", fillcolor="#dbe9f6"]; var [label="σ²_B", fillcolor="#dbe9f6"];',
        '  gamma [label="γ", fillcolor="#fdf0d5"]; beta [label="β", fillcolor="#fdf0d5"];',
    ]
    for i in range(m):
        n = i + 1
        lines.append(
            f'  x{n} [label="x{n}\\n{r["x"][i]:g}"]; '
            f'xhat{n} [label="x̂{n}\\n{r["x_hat"][i]:.3f}"]; '
            f'y{n} [label="y{n}\\n{r["y"][i]:.3f}", fillcolor="#e3f1e0"];'
        )
    for i in range(m):
        n, centred = i + 1, r["x"][i] - mean
        style = red if i == 0 else ""
        sep = ", " if style else ""
        lines += [
            f'  x{n} -> mu [label="1/m = {1 / m:.3f}"{sep}{style}];',
            f'  x{n} -> var [label="2(x{n}-μ)/m = {2 * centred / m:.3f}"];',
            f'  x{n} -> xhat{n} [label="1/√(σ²+ε) = {invstd:.3f}"{sep}{style}];',
            f'  mu -> xhat{n} [label="-1/√(σ²+ε) = {-invstd:.3f}"'
            f"{sep if i == 0 else ''}{style if i == 0 else ''}];",
            f'  var -> xhat{n} [label="-(x{n}-μ)(σ²+ε)^(-3/2)/2 = '
            f'{-0.5 * centred * (var + eps) ** -1.5:.3f}"];',
            f'  xhat{n} -> y{n} [label="γ = {r["gamma"]:g}"];',
            f'  gamma -> y{n} [label="x̂{n} = {r["x_hat"][i]:.3f}", style=dashed];',
            f'  beta -> y{n} [label="1", style=dashed];',
        ]
    lines += [
        '  mu -> var [label="-2 Σ(x_i-μ)/m = 0", style=dotted];',
        '  triangle [shape=note, fillcolor="#fde2e2", color="#d62728", fontsize=10, '
        'label="the triangle (red): x1 -> x̂1 directly (+1/√(σ²+ε))\\nand x1 -> μ -> x̂1 '
        "(1/m · -1/√(σ²+ε)). Shift every x_j by δ:\\nthe m paths through μ add up to "
        "-δ/√(σ²+ε) and cancel the direct +δ/√(σ²+ε).\\nSo each row of the Jacobian sums to 0 "
        '— not a bug: BN ignores shifts."];',
        "  triangle -> mu [style=invis];",
        "  { rank=same; mu; var; }",
        "  { rank=same; " + " -> ".join(f"x{i + 1}" for i in range(m)) + " [style=invis]; }",
        "  { rank=same; " + " -> ".join(f"xhat{i + 1}" for i in range(m)) + " [style=invis]; }",
        "  { rank=same; " + " -> ".join(f"y{i + 1}" for i in range(m)) + " [style=invis]; }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_dot(dot_path: str | Path, formats: Sequence[str] = ("svg", "png")) -> list[Path]:
    """Render with Graphviz ``dot`` if installed; returns the files written (maybe none)."""
    dot = shutil.which("dot")
    if dot is None:
        return []
    dot_path = Path(dot_path)
    written = []
    for fmt in formats:
        target = dot_path.with_suffix(f".{fmt}")
        try:
            subprocess.run(
                [dot, f"-T{fmt}", str(dot_path), "-o", str(target)],
                check=True,
                capture_output=True,
                timeout=60,
            )
        except (subprocess.SubprocessError, OSError):
            continue
        if target.exists() and target.stat().st_size > 0:
            written.append(target)
    return written


# -------------------------------------------------------------------------------------- run


def run(
    out: str | Path | None, *, seed: int = 0, quiet: bool = False, plot: bool = True
) -> dict[str, Any]:
    """Compute, print and (when ``out`` is given) write records, DOT and figures."""
    staged = staged_example()
    two = two_sample_example()
    matrices = backprop_matrices(seed=seed)
    text = format_staged(staged) + "\n\n" + format_two_sample(two) + "\n"
    if not quiet:
        print(text)
    record: dict[str, Any] = {
        "staged": staged,
        "two_sample": two,
        "backprop_matrices": matrices,
        "files": {},
    }
    if out is None:
        return record
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.txt").write_text(text)
    dot_path = out / "bn_graph.dot"
    dot_path.write_text(graph_dot(staged))
    rendered = render_dot(dot_path)
    record["files"] = {
        "text": "explain.txt",
        "dot": dot_path.name,
        "rendered": [p.name for p in rendered],
    }
    if not rendered:
        record["files"]["note"] = "Graphviz 'dot' not found: the graph was written as DOT only"
    write_json(out / "explain.json", record)
    if plot:
        from .plots import plot_explain

        record["files"]["figures"] = [p.name for p in plot_explain(out)]
        write_json(out / "explain.json", record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchnorm explain",
        description="Print the batch-norm backward stage by stage; write the graph and Jacobian.",
    )
    parser.add_argument(
        "--out",
        type=out_dir,
        default=None,
        help="directory for explain.json, bn_graph.dot/.svg/.png, jacobian.png "
        "(default: print only)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the Jacobian's batch"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    record = run(args.out, seed=args.seed, plot=not args.no_plot)
    if args.out:
        files = record["files"]
        print(
            f"wrote {args.out}/: explain.json, {files['text']}, {files['dot']}"
            + "".join(f", {f}" for f in files.get("rendered", []) + files.get("figures", []))
        )
        if "note" in files:
            print(files["note"], file=sys.stderr)
    return 0
