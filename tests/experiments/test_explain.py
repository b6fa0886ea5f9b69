"""``batchnorm explain``: its numbers against torch autograd on primitive ops, and its files."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from batchnorm.experiments import explain

torch = pytest.importorskip("torch")


def _autograd_dx(x, dy, gamma, beta, eps, *, detach_mean=False, detach_var=False):
    """dl/dx of l = sum(dy * BN(x)) by torch autograd on primitive ops (float64)."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    mean = xt.mean()
    mean_used = mean.detach() if detach_mean else mean
    var = ((xt - mean) ** 2).mean()
    var_used = var.detach() if detach_var else var
    y = gamma * (xt - mean_used) / torch.sqrt(var_used + eps) + beta
    (torch.tensor(dy, dtype=torch.float64) * y).sum().backward()
    return xt.grad.numpy()


def test_staged_example_matches_autograd_and_ablations_match_detached_graphs():
    r = explain.staged_example()
    x, dy = np.array(explain.EXAMPLE_X), np.array(explain.EXAMPLE_DY)
    args = (x, dy, explain.EXAMPLE_GAMMA, explain.EXAMPLE_BETA, explain.EXAMPLE_EPS)
    np.testing.assert_allclose(r["dl_dx"], _autograd_dx(*args), rtol=1e-12, atol=1e-12)
    assert abs(r["dl_dmean_vanishing"]) < 1e-12  # the term that multiplies sum(x - mu) = 0
    assert r["max_diff_staged_vs_fd"] < 1e-7
    for name, (tm, tv) in explain.ABLATIONS.items():
        expected = _autograd_dx(*args, detach_mean=not tm, detach_var=not tv)
        np.testing.assert_allclose(r["dl_dx_ablations"][name], expected, rtol=1e-12, atol=1e-12)
        if name != "full":
            assert r["max_diff_ablations_vs_fd"][name] > 0.1
    assert r["dl_dbeta"] == pytest.approx(dy.sum())


def test_two_sample_example_of_seed_000():
    r = explain.two_sample_example((1.0, 3.0))
    np.testing.assert_array_equal(r["centring"]["dl_dx_true"], [0.0, 0.0])
    np.testing.assert_array_equal(r["centring"]["dl_dx_mean_constant"], [1.0, 1.0])
    steps = r["batch_norm"]["steps"]
    assert np.max(np.abs(steps["true"]["dl_dx"])) < 1e-12
    pushed = steps["mean constant"]["dl_dx"]
    assert pushed[0] == pytest.approx(pushed[1]) and pushed[0] > 0.1  # same way, not zero
    # The wasted step: the inputs moved but the output did not.
    assert np.max(np.abs(steps["mean constant"]["x_after_step"] - r["x"])) > 0.01
    assert steps["mean constant"]["output_change"] < 1e-12


def test_backprop_matrices_properties():
    r = explain.backprop_matrices(m=6, seed=3)
    assert r["max_diff_full_vs_closed_form_jacobian"] < 1e-12
    full = r["matrices"]["full"]
    assert full["shift_leak"] < 1e-12 and full["scale_leak"] < 1e-5  # eps > 0 leaves a trace
    assert r["matrices"]["no mean grad"]["shift_leak"] > 0.1
    assert r["matrices"]["no var grad"]["scale_leak"] > 0.1
    np.testing.assert_allclose(np.array(full["M"]), np.array(full["M"]).T, atol=1e-14)


def test_graph_marks_the_triangle_and_labels_every_edge():
    dot = explain.graph_dot(explain.staged_example())
    edge = re.compile(r"^\s*\w+ -> \w+ \[")
    edges = [line for line in dot.splitlines() if edge.match(line) and "invis" not in line]
    assert len(edges) == 3 * 8 + 1
    assert all("label=" in e for e in edges)
    red = [e.split("[")[0].strip() for e in edges if "#d62728" in e]
    assert sorted(red) == ["mu -> xhat1", "x1 -> mu", "x1 -> xhat1"]


def test_main_writes_files(tmp_path, capsys):
    assert explain.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dl/dmu" in out and "two-sample example" in out and "-0.0e+00" not in out
    for name in ("explain.json", "explain.txt", "bn_graph.dot", "jacobian.png"):
        assert (tmp_path / name).stat().st_size > 0
    if shutil.which("dot"):
        assert (tmp_path / "bn_graph.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
