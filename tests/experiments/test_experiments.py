"""The experiments' claims, each against an oracle computed here, not read back from the code."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from batchnorm.experiments import landscape, moments, reparam  # noqa: E402
from batchnorm.experiments.common import read_json, torch_threads  # noqa: E402
from batchnorm.experiments.models import (  # noqa: E402
    MLP,
    batches,
    population_statistics,
)

# ------------------------------------------------------------------------------ ioffe (slow)


@pytest.mark.slow
def test_ioffe_quick_bn_beats_plain_by_015(tmp_path):
    from batchnorm.experiments import ioffe

    with torch_threads(1):
        ioffe.run(tmp_path, quick=True, progress=False, plot=False)
    record = read_json(tmp_path / "records.json")
    assert record["config"]["data"]["name"] == "mnist1d"
    final = {}
    for variant in ("bn", "plain"):
        runs = [r for r in record["runs"] if r["variant"] == variant]
        assert len(runs) == 3 and len({r["seed"] for r in runs}) == 3
        final[variant] = np.mean([r["history"][-1]["test_accuracy"] for r in runs])
    assert final["bn"] - final["plain"] >= 0.15, final
    assert (tmp_path / "curves.csv").exists()


# ------------------------------------------------------------------- moments: section 2 case


def test_minimal_case_mean_as_constant_drifts_and_true_gradient_does_not():
    r = moments.minimal_case(steps=30, m=8, lr=0.1, seed=3)
    t = np.asarray(r["targets"])
    constant = r["shift/moment as constant"]
    b = np.asarray(constant["param"])
    increments = np.diff(b)
    # dl/db with E[x] held fixed = sum_i dl/dx_hat_i = 2 (mean(x_hat) - mean(t)) = -2 mean(t).
    expected = 2 * r["lr"] * t.mean()
    assert abs(expected) > 1e-3
    np.testing.assert_allclose(increments, expected, rtol=1e-9)
    loss = np.asarray(constant["loss"])
    assert np.max(np.abs(loss - loss[0])) <= 1e-9
    true = r["shift/true gradient"]
    assert np.max(np.abs(true["grad"])) <= 1e-12
    assert np.max(np.abs(true["param"])) <= 1e-12  # b never moves from 0
    # The scale analogue: c drifts while the loss stays; the true gradient leaves c alone.
    scale = r["scale/moment as constant"]
    assert scale["param"][-1] > 1.5 and scale["max_loss_change"] <= 1e-9
    assert r["scale/true gradient"]["max_abs_grad"] <= 1e-12


# --------------------------------------------------------------- moments: the module's gradients


def _state_and_batch(seed=0, n=60, features=12, classes=4):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, features)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, classes, size=n))
    model = MLP(features, classes, hidden=(100, 100, 100), norm="bn", seed=seed)
    # Move off the symmetric start so every gradient is non-trivial.
    with torch.no_grad():
        for bn in model.batchnorms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.state_dict(), x, y


def test_gradient_check_only_the_full_gradient_matches_finite_differences():
    state, x, y = _state_and_batch()
    check = moments.gradient_check(state, x, y, in_features=12, num_classes=4, coordinates=4)
    errors = check["overall_rel_error"]
    assert errors["full"] < 1e-6
    for variant in ("no mean grad", "no var grad", "neither"):
        assert errors[variant] > 1e-2, (variant, errors)
    bias_rows = [row for row in check["table"] if "pre-BN" in row["group"]]
    for row in bias_rows:
        assert row["fd_norm"] < 1e-8  # the true gradient of a pre-BN bias is 0
        assert row["no mean grad/abs_error"] > 1e-4  # the constant-mean gradient invents one


def test_pre_bn_bias_drifts_only_without_the_mean_gradient():
    _, x, y = _state_and_batch(seed=1)
    norms = {}
    for name, through_mean in (("full", True), ("no mean grad", False)):
        model = MLP(12, 4, norm="bn", through_mean=through_mean, seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(20):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        norms[name] = float(sum(lin.bias.detach().norm() ** 2 for lin in model.linears) ** 0.5)
    assert norms["full"] < 1e-4
    assert norms["no mean grad"] > 1e-2


# --------------------------------------------------------------------------- Algorithm 2


def test_population_statistics_follow_algorithm_2():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(300, 6)) * 3 + 1, dtype=torch.float64)
    model = MLP(6, 3, hidden=(5,), norm="bn", seed=0, dtype=torch.float64)
    population_statistics(model, x, batch_size=20, num_batches=7, rng=np.random.default_rng(42))
    stream = batches(300, 20, np.random.default_rng(42))
    with torch.no_grad():
        z = [model.linears[0](x[torch.as_tensor(next(stream))]) for _ in range(7)]
    expected_mean = torch.stack([b.mean(0) for b in z]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in z]).mean(0)  # m/(m-1) E[var_B]
    bn = model.batchnorms[0]
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-12, atol=1e-12)


def test_model_and_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        MLP(4, 2, norm="layer")
    with pytest.raises(ValueError, match="init_std"):
        MLP(4, 2, init_std=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(10, 11, np.random.default_rng(0)))


# ------------------------------------------------------------------------------- landscape


def test_probe_matches_a_manual_step_and_restores_parameters():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(30, 5)), dtype=torch.float64)
    y = torch.tensor(rng.integers(0, 3, size=30))
    model = MLP(5, 3, hidden=(7,), norm="bn", seed=0, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    lr, eta = 0.3, 2.0
    result = landscape.probe(model, x, y, lr=lr, etas=np.array([eta]))
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= eta * lr * g
    moved = torch.nn.functional.cross_entropy(model(x), y)
    moved_grads = torch.autograd.grad(moved, list(model.parameters()))
    change = float(sum(((a - b) ** 2).sum() for a, b in zip(moved_grads, grads, strict=True)))
    grad_norm = float(sum((g**2).sum() for g in grads)) ** 0.5
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert result["loss_min"] == pytest.approx(moved.item(), rel=1e-12)
    assert result["grad_change_max"] == pytest.approx(change**0.5, rel=1e-10)
    assert result["beta"] == pytest.approx(change**0.5 / (eta * lr * grad_norm), rel=1e-10)


# --------------------------------------------------------------------------------- reparam


@pytest.mark.parametrize("whiten", [False, True])
def test_reparam_identity_against_torch_batch_norm(whiten):
    """torch's own batch_norm with population stats vs gamma x^T w / ||w||_S + beta (float64)."""
    rng = np.random.default_rng(5)
    n, d, k, eps = 1500, 12, 5, 1e-12
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) + 2 * np.eye(d)) + 4.0
    x -= x.mean(axis=0)
    if whiten:
        values, vectors = np.linalg.eigh(x.T @ x / n)
        x = x @ vectors @ np.diag(values**-0.5) @ vectors.T
    w = rng.normal(size=(d, k)) * 7.0
    gamma, beta = rng.uniform(0.5, 2, size=k), rng.normal(size=k)
    z = torch.tensor(x @ w)
    y = torch.nn.functional.batch_norm(
        z,
        z.mean(0),
        z.var(0, unbiased=False),
        torch.tensor(gamma),
        torch.tensor(beta),
        training=False,
        eps=eps,
    ).numpy()
    s = x.T @ x / n
    expected = x @ (gamma * w / np.sqrt(np.diag(w.T @ s @ w))) + beta
    # float64 throughout: measured 5e-15 (1.8e-13 whitened); 1.2e-11 against weight norm.
    assert np.max(np.abs(y - expected)) <= 1e-10
    if whiten:  # S = I: batch norm is weight normalisation
        weight_norm = x @ (gamma * w / np.linalg.norm(w, axis=0)) + beta
        assert np.max(np.abs(y - weight_norm)) <= 1e-9
    ours = reparam.identity_check(n, d, k, seed=5, whiten=whiten)
    assert ours["max_abs_error"] <= 1e-10 and ours["max_abs_population_mean"] <= 1e-12
    if not whiten:
        assert ours["max_abs_diff_to_weight_norm"] > 1e-2  # the S geometry matters


def test_reparam_gradient_is_orthogonal_to_w_only_with_the_variance_gradient():
    r = reparam.gradient_orthogonality(seed=2)["variants"]
    assert r["full"]["max_abs_cosine_w_grad"] < 1e-5  # eps = 1e-5 leaves a trace
    assert r["no var grad"]["max_abs_cosine_w_grad"] > 0.05
    assert r["neither"]["max_abs_cosine_w_grad"] > 0.05


def test_reparam_run_writes_records(tmp_path):
    record = reparam.run(tmp_path, quick=True)
    assert record["summary"]["passed"]
    for name in ("records.json", "identity.csv", "orthogonality.csv", "reparam.png"):
        assert (tmp_path / name).stat().st_size > 0


# ------------------------------------------------------------------------------- precise


def test_precise_run_writes_records_and_the_lifecycle_table(tmp_path):
    from batchnorm.experiments import precise

    with torch_threads(1):
        record = precise.run(
            tmp_path, data="digits", steps=40, seeds=2, quick=True, progress=False, plot=True
        )
    assert read_json(tmp_path / "records.json")["experiment"] == "precise"
    assert (tmp_path / "precise.png").exists() and (tmp_path / "lifecycle.csv").exists()
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        steps = [row["step"] for row in run["history"]]
        assert steps[0] == 0 and steps[-1] == 40
        for row in run["history"]:
            assert 0 <= row["ema"] <= 1 and 0 <= row["precise"] <= 1
            assert row["gap"] == pytest.approx(row["precise"] - row["ema"])
    table = {(r["case"], r["layer"]): r for r in record["lifecycle"]}
    # The facts the table shows, each against its oracle: PyTorch's layer counts a
    # checkpointed batch twice and updates per micro-batch; ours matches the exact layer.
    assert table["checkpointing", "torch.nn"]["num_batches_tracked"] == 8
    assert table["accumulation", "torch.nn"]["num_batches_tracked"] == 16
    for case in ("checkpointing", "accumulation"):
        ours = table[case, "batchnorm"]
        assert ours["num_batches_tracked"] == ours["exact_num_batches_tracked"] == 4
        assert ours["running_var_error"] <= 1e-12
        assert table[case, "torch.nn"]["running_var_error"] > 1e-3


def test_precise_statistics_fix_a_lagging_average():
    """The mechanism the experiment shows, on a frozen network whose EMA is stale: PreciseBN
    brings the running statistics to the exact ones of the final weights."""
    from batchnorm.torch import BatchNorm1d, recompute_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNorm1d(3)).double()
    with torch.no_grad():
        model[0].weight.mul_(5)  # the weights moved; the running statistics did not
    x = torch.randn(200, 4, dtype=torch.float64)
    recompute_stats(model, x.split(50))
    h = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, h.var(0), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- small-batch


def test_padding_moves_plain_batch_norm_and_not_the_masked_form():
    from batchnorm.experiments.small_batch import padding_drift

    rows = padding_drift(max_pad=16, step=8)
    assert [r["padding"] for r in rows] == [0, 8, 16]
    assert rows[0]["plain_drift"] == 0 and rows[-1]["plain_drift"] > 0.1
    assert all(r["masked_drift"] == 0 for r in rows)


def test_small_batch_run_writes_records(tmp_path, monkeypatch):
    from batchnorm.experiments import small_batch

    tiny = {"sizes": (2, 8), "seeds": 2, "samples": 64, "ghost_batch": 16}
    monkeypatch.setattr(small_batch, "QUICK", tiny)
    with torch_threads(1):
        record = small_batch.run(tmp_path, data="digits", quick=True, progress=False)
    assert read_json(tmp_path / "records.json")["experiment"] == "small-batch"
    assert (tmp_path / "small_batch.png").exists() and (tmp_path / "padding.csv").exists()
    assert record["sizes"] == [2, 8]
    for norm in ("bn", "renorm", "ghost", "group"):
        spread = record["curves"][norm]
        assert len(spread["mean"]) == 2
        assert all(lo <= m <= hi for lo, m, hi in
                   zip(spread["min"], spread["mean"], spread["max"], strict=True))  # fmt: skip
    acc = record["summary"]["accuracy"]
    assert record["summary"]["bn_drop"] == pytest.approx(acc["bn"]["8"] - acc["bn"]["2"])
