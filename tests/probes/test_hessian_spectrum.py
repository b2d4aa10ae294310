"""Truth tests of the ``hessian_spectrum`` probe: linear regression (H = (2/N)·AᵀA exactly),
a small MLP against the dense ``eigh`` of ``torch.func.hessian``, the saddle of a deep linear
network at the origin, batched cells, and bad input."""

import math

import numpy as np
import pytest
import torch

from basinprobe.probes.hessian_spectrum import HessianSpectrum
from basinprobe.registry import Dataset, ProbeError
from basinprobe.runtime.losses import cross_entropy, mse
from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.testing import make_context, regression_data

F64 = torch.float64


def run(ctx, **params):
    probe = HessianSpectrum()
    return probe.run(ctx, probe.resolve(params))


def regression_context(d=30, N=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, d, dtype=F64)
    y = X @ torch.randn(d, generator=g, dtype=F64) + 0.1 * torch.randn(N, generator=g, dtype=F64)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": d, "hidden": [], "out": 1})
    return make_context(model, regression_data(X, y), mse), X


def regression_hessian(X):
    """L(w, b) = (1/N) Σ (wᵀx_i + b − y_i)²  ⇒  H = (2/N) AᵀA with A = [X, 1] (parameters: weight, bias)."""
    A = torch.cat([X, torch.ones(len(X), 1, dtype=F64)], dim=1)
    return 2.0 / len(X) * A.T @ A


def mlp_context(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": 4, "hidden": [8], "out": 3, "activation": "tanh"})  # 67 parameters
    return make_context(model, Dataset(X, y, X[:0], y[:0], task="classification", n_classes=3), cross_entropy)


def func_hessian(ctx):
    X, y = ctx.data.split("train")
    return torch.func.hessian(lambda t: ctx.loss_fn(ctx.forward(t, X), y))(ctx.flat_params)


# --- linear regression ---------------------------------------------------------------------------

def test_linear_regression_spectrum_and_trace_are_those_of_two_over_n_xtx_on_the_dense_path():
    ctx, X = regression_context()
    lam = torch.linalg.eigvalsh(regression_hessian(X))
    ds = run(ctx, top_k=5, bottom_k=3)
    assert ds.attrs["path"] == "dense"
    np.testing.assert_allclose(ds.top_eigenvalues.values, lam.flip(0)[:5].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.bottom_eigenvalues.values, lam[:3].numpy(), rtol=1e-6)
    assert float(ds.trace) == pytest.approx(float(lam.sum()), rel=1e-6)
    assert float(ds.trace_stderr) == 0.0
    assert float(ds.negative_fraction) == 0.0  # H = (2/N)AᵀA is positive semi-definite
    assert int(ds.hvp_count) == 1 + ctx.n_params
    assert list(ds.top_eigenvalues.k_top.values) == [1, 2, 3, 4, 5]


def test_linear_regression_on_the_lanczos_path_matches_the_eigendecomposition():
    ctx, X = regression_context()
    H = regression_hessian(X)
    lam = torch.linalg.eigvalsh(H)
    n = ctx.n_params
    # Hutch++ with a sketch of trace_samples/3 ≥ n columns spans the space: its trace is exact
    ds = run(ctx, top_k=5, bottom_k=3, method="lanczos", tol=1e-8, trace_samples=3 * n, density=True,
             grid=400, probes=12)
    assert ds.attrs["path"] == "lanczos" and ds.attrs["converged"]
    np.testing.assert_allclose(ds.top_eigenvalues.values, lam.flip(0)[:5].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.bottom_eigenvalues.values, lam[:3].numpy(), rtol=1e-6)
    assert float(ds.trace) == pytest.approx(float(lam.sum()), rel=1e-6)
    # every product went through the cell's shared Hessian operator, and each was counted
    op = ctx.artifact("hessian.operator")
    assert int(ds.hvp_count) == op.count
    # The SLQ density is a probability density: ∫φ = 1, and its mean is the SLQ estimate of tr(H)/n,
    # whose standard error over P Rademacher probes is √(2(‖H‖_F² − Σ H_ii²)/P)/n (Hutchinson's variance).
    t, phi = ds.grid_eigenvalue.values, ds.density.values
    # the grid stops 4σ beyond the extreme nodes, which leaves out at most 2·P(Z > 4) = 6.3e-5
    assert np.trapezoid(phi, t) == pytest.approx(1.0, abs=1e-4)
    mean = np.trapezoid(t * phi, t)
    stderr = math.sqrt(2 * (float((H * H).sum()) - float((H.diagonal() ** 2).sum())) / 12) / n
    assert abs(mean - float(lam.sum()) / n) < 3 * stderr


def test_hutchpp_trace_of_linear_regression_is_within_three_standard_errors():
    ctx, X = regression_context(seed=1)
    truth = float(torch.trace(regression_hessian(X)))
    ds = run(ctx, top_k=2, method="lanczos", trace_samples=30, density=False)
    assert float(ds.trace_stderr) > 0
    assert abs(float(ds.trace) - truth) < 3 * float(ds.trace_stderr)


# --- a small MLP against the dense Hessian -----------------------------------------------------

def test_mlp_lanczos_top_10_and_bottom_5_match_dense_eigh_of_torch_func_hessian():
    ctx = mlp_context()
    lam = torch.linalg.eigvalsh(func_hessian(ctx))
    scale = float(lam.abs().max())
    ds = run(ctx, top_k=10, bottom_k=5, method="lanczos", tol=1e-7, steps=40, probes=16)
    assert ds.attrs["converged"]
    np.testing.assert_allclose(ds.top_eigenvalues.values, lam.flip(0)[:10].numpy(), rtol=1e-5, atol=1e-9 * scale)
    np.testing.assert_allclose(ds.bottom_eigenvalues.values, lam[:5].numpy(), rtol=1e-5, atol=1e-9 * scale)
    assert lam[0] < 0  # at initialization this point is not a minimum
    # saddle index: dense count against SLQ (40 < 67 steps, so quadrature error too)
    dense_fraction = float((lam < -1e-10 * scale).double().mean())  # 3 exact zeros round to ±1e-17
    error = 3 * float(ds.negative_fraction_stderr) + float(ds.negative_fraction_bound)
    assert 0 < error < 0.2
    assert abs(float(ds.negative_fraction) - dense_fraction) < error


def test_mlp_dense_path_equals_torch_func_hessian_and_ggn_is_positive_semidefinite():
    ctx = mlp_context(seed=1)
    lam = torch.linalg.eigvalsh(func_hessian(ctx))
    ds = run(ctx, top_k=3, bottom_k=3, method="dense")
    np.testing.assert_allclose(ds.top_eigenvalues.values, lam.flip(0)[:3].numpy(), rtol=1e-10)
    np.testing.assert_allclose(ds.bottom_eigenvalues.values, lam[:3].numpy(), rtol=1e-10)
    # the output bias shifts all logits, so the spectrum holds exact zeros, ±1e-17 after rounding:
    # those are not counted as negative
    assert float(ds.negative_fraction) == float((lam < -1e-10 * lam.abs().max()).double().mean())
    ggn = run(ctx, top_k=3, bottom_k=3, operator="ggn", method="dense")
    assert float(ggn.bottom_eigenvalues.min()) > -1e-12  # Jᵀ(∇²_z ℓ)J with a convex ℓ
    assert float(ggn.negative_fraction) == 0.0
    assert ggn.attrs["operator"] == "ggn"


# --- a known saddle ----------------------------------------------------------------------------

def test_saddle_index_of_a_deep_linear_network_at_the_origin():
    # f(x) = W₂W₁x (3 → 4 → 2), mse = mean over N·2 entries. At W = 0 the gradient vanishes and
    #   L(W) = L(0) − 2 tr(W₂ W₁ C) + O(‖W‖⁴),   C = (1/2N) Σ_i x_i y_iᵀ  (3 × 2).
    # For each hidden unit a the term −2 W₁[a,:] C W₂[:,a] couples u ∈ R³ and v ∈ R² through
    # [[0, −2C], [−2Cᵀ, 0]], whose eigenvalues are ±2σ_j(C) (j = 1, 2) and one 0. Over the 4 units:
    # 8 negative, 8 positive, 4 zero of 20: the saddle index is 8/20 = 0.4.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 3, generator=g, dtype=F64)
    Y = X @ torch.randn(3, 2, generator=g, dtype=F64)
    model = make_deep_linear(widths=[3, 4, 2])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ctx = make_context(model, regression_data(X, Y), mse)
    sigma = torch.linalg.svdvals(X.T @ Y / (2 * len(X)))
    ds = run(ctx, top_k=4, bottom_k=4, method="dense")
    assert float(ds.negative_fraction) == pytest.approx(0.4)
    np.testing.assert_allclose(ds.top_eigenvalues.values, [2 * float(sigma[0])] * 4, rtol=1e-10)
    np.testing.assert_allclose(ds.bottom_eigenvalues.values, [-2 * float(sigma[0])] * 4, rtol=1e-10)
    assert float(ds.gradient_norm) == 0.0
    slq = run(ctx, top_k=0, method="lanczos", probes=24, trace_samples=3 * 20)
    assert float(slq.negative_fraction_stderr) > 0
    assert abs(float(slq.negative_fraction) - 0.4) < 3 * float(slq.negative_fraction_stderr) + \
        float(slq.negative_fraction_bound)
    assert float(slq.trace) == pytest.approx(0.0, abs=1e-12)  # ±2σ pairs and zeros


# --- batched cells -----------------------------------------------------------------------------

def seed_contexts(seeds, hidden=8, device="cpu"):
    """Cells that share architecture and data and differ in their parameters (the model's seed)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (64,), generator=g)
    data = Dataset(X, y, X[:0], y[:0], task="classification", n_classes=3)
    contexts = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_mlp(**{"in": 4, "hidden": [hidden], "out": 3, "activation": "tanh"})
        contexts.append(make_context(model, data, cross_entropy, seed=100 + seed, device=device))
    return contexts


@pytest.mark.parametrize("params", [
    {"top_k": 4, "bottom_k": 2, "method": "dense"},
    {"top_k": 4, "bottom_k": 3, "method": "lanczos", "steps": 20, "probes": 4, "trace_samples": 12, "tol": 1e-6},
    {"top_k": 3, "operator": "ggn", "method": "lanczos", "steps": 10, "probes": 3, "trace_samples": 9},
    {"top_k": 2, "operator": "ggn", "method": "dense", "density": False},
], ids=["dense", "lanczos", "ggn-lanczos", "ggn-dense"])
def test_batched_cells_equal_the_per_cell_run(params):
    probe = HessianSpectrum()
    params = probe.resolve(params)
    seeds = [0, 1, 2]
    alone = [probe.run(ctx, params) for ctx in seed_contexts(seeds)]
    together = probe.run_batched(seed_contexts(seeds), params)
    assert len(together) == len(seeds)
    for a, b in zip(alone, together):
        assert set(a.data_vars) == set(b.data_vars)
        assert a.attrs == pytest.approx(b.attrs)
        assert int(a.hvp_count) == int(b.hvp_count)
        for name in a.data_vars:
            np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-9, atol=1e-12, err_msg=name)
    # and the cells are really different
    assert not np.allclose(alone[0].top_eigenvalues.values, alone[1].top_eigenvalues.values)


@pytest.mark.cuda
def test_on_cuda_the_lanczos_path_gives_the_cpu_result_per_cell_and_batched():
    # on CUDA the SLQ probes' and Hutch++'s blocks go through one batched backward pass
    probe = HessianSpectrum()
    params = probe.resolve({"top_k": 4, "bottom_k": 3, "method": "lanczos", "steps": 20, "probes": 4,
                            "trace_samples": 12, "tol": 1e-6})
    cpu = [probe.run(ctx, params) for ctx in seed_contexts([0, 1])]
    alone = [probe.run(ctx, params) for ctx in seed_contexts([0, 1], device="cuda")]
    together = probe.run_batched(seed_contexts([0, 1], device="cuda"), params)
    for reference, a, b in zip(cpu, alone, together):
        assert int(a.hvp_count) == int(reference.hvp_count) == int(b.hvp_count)
        for name in reference.data_vars:
            np.testing.assert_allclose(a[name].values, reference[name].values, rtol=1e-7, atol=1e-10, err_msg=name)
            np.testing.assert_allclose(b[name].values, reference[name].values, rtol=1e-7, atol=1e-10, err_msg=name)


SEED_SWEEP = """
version: 1
name: batched-hessian
seed: 0
device: cpu
dtype: float64
model: {kind: mlp, with: {in: 4, hidden: [6], out: 3, activation: tanh}}
data: {kind: gaussian_mixture, with: {n: 60, in: 4, classes: 3}, batch_size: 60}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1}, steps: 10, checkpoints: {at: [0, 10]}}
sweep: {seed: [0, 1, 2]}
probes:
  - {name: hess, probe: hessian_spectrum, with: {top_k: 3, bottom_k: 2, method: lanczos, probes: 3, steps: 12}}
output: OUT
"""


def test_a_seed_sweep_with_batch_cells_stores_what_the_unbatched_run_stores(write_spec, tmp_path, monkeypatch):
    from basinprobe.runtime import open_results
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.spec import load_spec

    plain = load_spec(write_spec(SEED_SWEEP.replace("OUT", str(tmp_path / "plain.zarr")), "plain.yaml"))
    batched = load_spec(write_spec(SEED_SWEEP.replace("OUT", str(tmp_path / "batched.zarr"))
                                   + "execution: {batch_cells: true}\n", "batched.yaml"))
    with pytest.warns(RuntimeWarning):  # untrained cells are not near a minimum
        assert run_spec(plain).ok
        # the batched run must not fall back to per-cell runs (the runtime does so on any error)
        single = []
        monkeypatch.setattr(HessianSpectrum, "run", lambda self, ctx, params: single.append(ctx) or 1 / 0)
        assert run_spec(batched).ok
    assert not single
    a, b = open_results(tmp_path / "plain.zarr")["hess"], open_results(tmp_path / "batched.zarr")["hess"]
    assert a["top_eigenvalues"].dims == ("seed", "checkpoint", "k_top")
    for name in a.data_vars:
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-9, atol=1e-12, err_msg=name)


# --- bad input ---------------------------------------------------------------------------------

def test_top_k_above_the_parameter_count_is_clamped_to_the_dense_spectrum_with_a_warning():
    ctx, X = regression_context(d=4)
    lam = torch.linalg.eigvalsh(regression_hessian(X))
    with pytest.warns(RuntimeWarning, match="exceed the 5 parameters"):
        ds = run(ctx, top_k=50, bottom_k=7, method="lanczos")
    assert ds.attrs["path"] == "dense"
    np.testing.assert_allclose(ds.top_eigenvalues.values, lam.flip(0).numpy(), rtol=1e-10)
    assert ds.sizes["k_bottom"] == 5


def test_non_finite_parameters_fail_with_a_message_not_a_nan():
    ctx, _ = regression_context(d=3)
    flat = ctx.flat_params.clone()
    flat[0] = math.nan
    model = make_mlp(**{"in": 3, "hidden": [], "out": 1})
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    bad = make_context(model, ctx.data, mse)
    for method in ("dense", "lanczos"):
        with pytest.raises(ProbeError, match="not finite"):
            run(bad, method=method, top_k=2)


def test_an_empty_split_fails_with_a_message():
    ctx, _ = regression_context(d=3)
    with pytest.raises(ProbeError, match="split is empty"):
        run(ctx, data={"split": "test"})


def test_a_point_away_from_a_minimum_is_flagged_in_attrs():
    ctx, _ = regression_context(d=3)  # the untrained regression: the gradient is far from zero
    with pytest.warns(RuntimeWarning, match="not near a minimum"):
        ds = run(ctx, top_k=2)
    assert ds.attrs["near_minimum"] is False
    assert float(ds.gradient_norm) > 0.1


def test_dims_avoid_the_keywords_of_sel():
    ctx, _ = regression_context(d=3)
    ds = run(ctx, top_k=2, bottom_k=2)
    assert not {"method", "tolerance", "drop", "indexers"} & set(ds.dims)
    for name, var in ds.data_vars.items():
        assert var.attrs.get("description"), name
