"""Truth tests of the ``lottery_subspace`` probe against closed forms.

Linear regression L(θ) = (1/N)‖Aθ − y‖² is a quadratic with Hessian H = (2/N)AᵀA and
minimum θ*. Writing H = Σ h_i v_i v_iᵀ (h_0 ≥ h_1 ≥ ...) and θ0 = θ* − Σ_{i<k} c_i v_i:

    L(θ0) − L* = ½ Σ_{i<k} h_i c_i²,
    the best point of θ0 + span(v_0..v_{d−1}) removes the first d terms, so
    (L(θ0) − L_d) / (L(θ0) − L*) = Σ_{i<d} h_i c_i² / Σ_{i<k} h_i c_i²,

and the gradient at θ0, g = H(θ0 − θ*) = −Σ_{i<k} h_i c_i v_i, lies in the top-k eigenspace,
with ‖V_jᵀg‖²/‖g‖² = Σ_{i<j} h_i² c_i² / Σ_{i<k} h_i² c_i² in the top-j space.
"""

from __future__ import annotations

import functools
import math
import warnings

import jsonschema
import numpy as np
import pytest
import torch

from basinprobe.probes.lottery_subspace import LotterySubspace
from basinprobe.registry import ProbeError
from basinprobe.runtime import open_results
from basinprobe.runtime.context import CellContext
from basinprobe.runtime.datasets import digits
from basinprobe.runtime.execute import check_result
from basinprobe.runtime.losses import cross_entropy, mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.spec import OptimizerSpec, TrainSpec
from basinprobe.runtime.testing import make_context, regression_data
from basinprobe.runtime.train import train

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run(ctx, **params):
    probe = LotterySubspace()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return check_result(probe.run(ctx, probe.resolve(params)), "sub", ["checkpoint"])


def quadratic(weights, k: int, n: int = 200, d_in: int = 5, seed: int = 0):
    """Linear regression whose θ0 differs from the least-squares θ* by c_i along the top-k Hessian
    eigenvectors v_i only, with h_i c_i² proportional to ``weights``. Returns ctx, h, c, L*."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    y = X @ torch.randn(d_in, generator=g, dtype=F64) + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=F64)
    A = torch.cat([X, torch.ones(n, 1, dtype=F64)], dim=1)
    theta_star = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    h, V = torch.linalg.eigh(2 / n * A.T @ A)
    h, V = h.flip(0), V.flip(1)
    c = torch.sqrt(torch.tensor(weights, dtype=F64) / h[:k])
    theta0 = theta_star - V[:, :k] @ c
    model = make_mlp(**{"in": d_in, "hidden": [], "out": 1}).double()
    with torch.no_grad():
        model[0].weight.copy_(theta0[:d_in][None])
        model[0].bias.copy_(theta0[d_in:])
    loss_star = float(((A @ theta_star - y) ** 2).mean())
    return make_context(model, regression_data(X, y), mse), h, c, loss_star


def heavy_ball(h):
    """Polyak's heavy-ball parameters for the spectrum [h_min, h_max] (converges as (√κ−1)/(√κ+1) per step)."""
    root = math.sqrt(float(h.max() / h.min()))
    return {"optimizer": "sgd", "lr": 4 / (math.sqrt(float(h.max())) + math.sqrt(float(h.min()))) ** 2,
            "momentum": ((root - 1) / (root + 1)) ** 2}


def test_hessian_basis_reaches_the_minimum_exactly_from_dim_k_and_dim90_is_where_the_closed_form_says():
    # h_i c_i² ∝ (0.5, 0.3, 0.2): reduced fractions 0.5, 0.8, 1.0 at d = 1, 2, 3, so with
    # threshold 0.9 dim90 = 3 = k, and with threshold 0.75 dim90 = 2.
    k = 3
    ctx, h, c, loss_star = quadratic([0.5, 0.3, 0.2], k)
    params = dict(dims=[1, 2, 3, 4], bases=["hessian", "random"], repeats=2, steps=60, batch_size="full",
                  **heavy_ball(h))
    ds = run(ctx, **params)
    gap = 0.5 * float((h[:k] * c**2).sum())
    assert float(ds.anchor_loss) == pytest.approx(loss_star + gap, rel=1e-10)
    assert float(ds.full_loss) == pytest.approx(loss_star, rel=1e-10)
    hessian = ds.loss.sel(basis="hessian").isel(repeat=0)
    for d in (1, 2, 3, 4):
        expected = loss_star + 0.5 * float((h[d:k] * c[d:] ** 2).sum()) if d < k else loss_star
        assert float(hessian.sel(subspace_dim=d)) == pytest.approx(expected, rel=1e-9)
    assert float(ds.dim90.sel(basis="hessian")) == 3
    assert float(run(ctx, **params, threshold=0.75).dim90.sel(basis="hessian")) == 2
    # A random subspace of dim < k cannot contain the 3-dim displacement θ* − θ0.
    random_low = ds.loss.sel(basis="random", subspace_dim=[1, 2])
    assert (random_low > loss_star + 0.01 * gap).all()


def test_gradient_overlap_is_one_when_the_gradient_lies_in_the_top_eigenspace_of_a_quadratic():
    k = 3
    ctx, h, c, _ = quadratic([0.5, 0.3, 0.2], k)
    ds = run(ctx, dims=[1], steps=1, repeats=1, gradient_overlap={"k": k})
    assert float(ds.gradient_overlap) == pytest.approx(1.0, abs=1e-10)
    # In the top-2 space: Σ_{i<2} h_i² c_i² / Σ_{i<3} h_i² c_i².
    w = (h[:k] * c) ** 2
    ds = run(ctx, dims=[1], steps=1, repeats=1, gradient_overlap={"k": 2})
    assert float(ds.gradient_overlap) == pytest.approx(float(w[:2].sum() / w.sum()), rel=1e-10)
    assert ds.gradient_overlap.attrs["k"] == 2


@pytest.fixture(scope="module")
def trained_digits():
    """A 64-32-10 ReLU MLP trained on digits with SGD, 11 checkpoints (10 trajectory directions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = digits().to("cpu", F64)
    model = make_mlp(**{"in": 64, "hidden": [32], "out": 10, "activation": "relu"}).double()
    opt = OptimizerSpec("sgd", 0.1, 0.9, False, 0.0, (0.9, 0.999))
    trajectory = train(model, data, cross_entropy, TrainSpec(opt, 150, 128, tuple(range(0, 151, 15))),
                       torch.Generator().manual_seed(0))
    torch.set_num_threads(threads)
    return CellContext(model, trajectory[150], data, cross_entropy, dtype=F64, trajectory=trajectory,
                       checkpoint=150, batch_size=128)


def test_on_digits_random_accuracy_rises_with_dim_and_the_trajectory_basis_needs_a_far_smaller_dim(trained_digits):
    ds = run(trained_digits, dims=[1, 2, 8, 32, 128], bases=["random", "trajectory"], repeats=2, steps=150,
             optimizer="sgd", lr=0.1, momentum=0.9)
    random = ds.accuracy.sel(basis="random").mean("repeat").values
    # Near chance (0.1) up to dim 8, then rising: 8 < 32 < 128 (measured 0.08, 0.19, 0.62).
    assert (np.diff(random[2:]) > 0).all() and random[-1] > random[2] + 0.3, random
    assert float(ds.full_accuracy) > 0.95
    # Measured: the first trajectory direction (≈ θ_T − θ_0) already reaches 97% (dim90 = 1);
    # random needs more than 128 directions (0.72 at 128 with these 150 steps).
    assert float(ds.dim90.sel(basis="trajectory")) <= 2
    assert np.isnan(float(ds.dim90.sel(basis="random")))
    assert np.isnan(ds.loss.sel(basis="trajectory", subspace_dim=[32, 128])).all()


def test_subspace_overlap_with_itself_is_one_and_stability_is_stored_per_checkpoint(trained_digits):
    ds = run(trained_digits, dims=[1], steps=1, repeats=1, stability={"k": [1, 10]})
    overlap = ds.subspace_overlap
    assert overlap.dims == ("checkpoint_b", "k")
    assert list(ds.checkpoint_b.values) == list(range(0, 151, 15))
    np.testing.assert_allclose(overlap.sel(checkpoint_b=150).values, 1.0, atol=1e-8)
    assert ((overlap.values >= -1e-12) & (overlap.values <= 1 + 1e-9)).all()
    # Late checkpoints share most of the top-10 space; the initialization's is far from it.
    assert float(overlap.sel(checkpoint_b=135, k=10)) > 0.5
    assert float(overlap.sel(checkpoint_b=0, k=10)) < float(overlap.sel(checkpoint_b=135, k=10))


def low_rank_regression(rank: int = 2):
    """A tanh MLP 8-16-8 whose two weight matrices have rank 2, and targets it does not fit exactly."""
    torch.manual_seed(0)
    model = make_mlp(**{"in": 8, "hidden": [16], "out": 8, "activation": "tanh"}).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.linear_layers:
            m, k = layer.weight.shape
            layer.weight.copy_(torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, k, generator=g,
                                                                                          dtype=F64) / math.sqrt(k))
    X = torch.randn(100, 8, generator=g, dtype=F64)
    return make_context(model, regression_data(X, model(X).detach() + 0.1 * torch.randn(100, 8, generator=g,
                                                                                         dtype=F64)), mse)


def test_subspace_pruning_of_an_exactly_low_rank_network_loses_nothing_down_to_its_rank_while_neuron_pruning_does():
    # Budgets at keep f: ⌊16f + ½⌋ units u, u·8 weights per layer, SVD rank ⌊8u/24⌋:
    # f = 0.375 -> 6 units, rank 2 (lossless); f = 0.25 -> 4 units, rank 1 (lossy).
    ctx = low_rank_regression()
    ds = run(ctx, dims=[1], steps=1, repeats=1, prune={"keep": [0.25, 0.375, 0.5, 1.0]})
    unpruned = float(ctx.loss())
    loss = ds.prune_loss
    for f in (0.375, 0.5, 1.0):
        assert float(loss.sel(pruning="subspace", keep=f)) == pytest.approx(unpruned, rel=1e-10)
    assert float(loss.sel(pruning="subspace", keep=0.25)) > 1.05 * unpruned
    for f in (0.375, 0.5):
        assert float(loss.sel(pruning="neuron", keep=f)) > 1.05 * unpruned
    assert float(loss.sel(pruning="neuron", keep=1.0)) == pytest.approx(unpruned, rel=1e-12)
    assert int(ds.prune_params.sel(pruning="neuron", keep=0.375)) == 2 * 6 * 8
    assert int(ds.prune_params.sel(pruning="subspace", keep=0.375)) == 2 * 2 * 24
    assert "prune_accuracy" not in ds  # regression


def test_stored_variables_have_their_contracted_dims():
    ctx, h, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    ds = run(ctx, dims=[1, 2], bases=["random", "gradient"], repeats=3, steps=5, batch_size=16, stability={"k": 2},
             gradient_overlap={}, prune={"keep": [0.5]})
    assert ds.loss.dims == ("basis", "subspace_dim", "repeat")
    assert list(ds.basis.values) == ["random", "gradient"]
    assert ds.dim90.dims == ("basis",)
    assert ds.full_loss.dims == () and ds.gradient_overlap.dims == ()
    assert ds.subspace_overlap.dims == ("checkpoint_b",)
    assert ds.prune_loss.dims == ("pruning", "keep")
    assert list(ds.pruning.values) == ["magnitude", "neuron", "subspace"]
    for name, var in ds.data_vars.items():
        assert var.attrs.get("description"), name
    assert ds.attrs["projection_random"] == "dense" and ds.attrs["projection_gradient"] == "dense"
    # The gradient basis is deterministic: the same in every repeat.
    gradient = ds.loss.sel(basis="gradient")
    assert (gradient == gradient.isel(repeat=0)).all()
    assert ds.attrs["gradient_batches"] == 4


def test_sparse_projection_is_chosen_when_the_dense_one_exceeds_the_memory_budget():
    ctx, _, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    ds = run(ctx, dims=[2], repeats=2, steps=3, max_dense_mb=1e-5)
    assert ds.attrs["projection_random"] == "sparse"
    with pytest.raises(ProbeError, match="projection: sparse"):
        run(ctx, dims=[2], repeats=2, steps=3, max_dense_mb=1e-5, projection="dense")


def test_same_seed_gives_the_same_result_bit_for_bit():
    ctx, _, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    a = run(ctx, dims=[1, 3], bases=["random", "gradient"], repeats=2, steps=10)
    b = run(ctx, dims=[1, 3], bases=["random", "gradient"], repeats=2, steps=10)
    np.testing.assert_array_equal(a.loss.values, b.loss.values)


@pytest.mark.parametrize("params", [
    {"threshold": 0}, {"threshold": 1.5}, {"prune": {"keep": [0.0]}}, {"prune": {"keep": [1.2]}},
    {"dims": []}, {"bases": ["lucky"]}, {"lr": 0}, {"stability": {"k": 0}}, {"prune": {"methods": ["neuron"]}},
    {"repeat": 3},
])
def test_schema_rejects_bad_parameters(params):
    jsonschema.Draft7Validator.check_schema(LotterySubspace.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(LotterySubspace.schema).validate(params)


def test_a_dim_larger_than_the_parameter_count_is_refused():
    ctx, _, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    with pytest.raises(ProbeError, match="larger than the model's 6 parameters"):
        run(ctx, dims=[2, 7])


def test_trajectory_basis_without_stored_checkpoints_names_the_train_block():
    ctx, _, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    with pytest.raises(ProbeError, match="`train:` block"):
        run(ctx, dims=[1], bases=["trajectory"])


def test_threshold_and_keep_outside_the_unit_interval_are_refused_by_the_probe_too():
    ctx, _, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    with pytest.raises(ProbeError, match="threshold"):
        run(ctx, dims=[1], threshold=1.5)
    with pytest.raises(ProbeError, match="keep"):
        run(ctx, dims=[1], prune={"keep": [0.5, 1.5]})


SPEC = """
version: 1
name: lottery
seed: 0
dtype: float64
model: {kind: mlp, with: {in: 4, hidden: [8], out: 3, activation: tanh}}
data: {kind: gaussian_mixture, with: {n: 120, in: 4, classes: 3}, batch_size: 32}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}, steps: 60, checkpoints: {every: 20}}
probes:
  - name: sub
    probe: lottery_subspace
    at: [20, 60]
    with: {dims: [1, 4, 16], bases: [random, trajectory, hessian], repeats: 2, steps: 40, optimizer: sgd, lr: 0.1,
           momentum: 0.9, stability: {k: 3}, gradient_overlap: {}, prune: {keep: [0.5, 1.0]}}
output: out.zarr
"""


def test_end_to_end_through_a_spec_with_training_checkpoints(cli, write_spec, tmp_path):
    spec = write_spec(SPEC)
    code, _, err = cli("run", spec, "-o", tmp_path / "out.zarr", "-q")
    assert code == 0, err
    tree = open_results(tmp_path / "out.zarr")
    assert not tree["sub"].attrs["failed"]
    ds = tree["sub"].to_dataset()
    assert ds.loss.dims == ("checkpoint", "basis", "subspace_dim", "repeat")
    assert list(ds.checkpoint.values) == [20, 60]
    overlap = ds.subspace_overlap
    assert overlap.dims == ("checkpoint", "checkpoint_b")
    for step in (20, 60):
        assert float(overlap.sel(checkpoint=step, checkpoint_b=step)) == pytest.approx(1.0, abs=1e-8)
    # anchor: init trains from θ0 in both cells, and the trajectory basis is the whole run's: same result
    # (the minibatch order is seeded per cell, so the losses agree to the optimum the run reaches).
    assert float(ds.anchor_loss.sel(checkpoint=20)) == float(ds.anchor_loss.sel(checkpoint=60))
    assert np.isnan(ds.loss.sel(basis="trajectory", subspace_dim=16)).all()  # 4 checkpoints: 3 directions
    assert ds.prune_accuracy.dims == ("checkpoint", "pruning", "keep")
    code, out, _ = cli("query", tmp_path / "out.zarr", "sub/dim90")
    assert code == 0 and "trajectory" in out


STABILITY_SPEC = """
version: 1
name: stability
seed: 0
dtype: float64
model: {kind: mlp, with: {in: 4, hidden: [8], out: 3, activation: tanh}}
data: {kind: gaussian_mixture, with: {n: 120, in: 4, classes: 3}, batch_size: 32}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}, steps: 60, checkpoints: {every: 10}}
probes:
  - name: sub
    probe: lottery_subspace
    at: AT
    with: {dims: [1], bases: [random], repeats: 1, steps: 2, stability: {k: 3}, eigensolver: lanczos}
output: OUT
"""


def test_stability_computes_each_checkpoints_eigenspace_once_per_run_and_a_lone_cell_agrees(
        cli, write_spec, tmp_path, monkeypatch):
    # 7 checkpoints, 7 cells: each cell compares its eigenspace with all 7. A checkpoint's
    # eigenspace is seeded from the run and shared by the run's cells, so the run computes 7
    # (one per cell, its own) + 7 (one per checkpoint), not 7 x 7; and a cell run alone, which
    # shares nothing, stores exactly what it stores beside the others.
    from basinprobe.runtime import artifacts

    calls = []
    produce = artifacts.producer("hessian.eigen")
    monkeypatch.setitem(artifacts.PRODUCERS, "hessian.eigen",
                        functools.wraps(produce)(lambda ctx, **kw: calls.append(kw.get("at")) or produce(ctx, **kw)))
    spec = write_spec(STABILITY_SPEC.replace("AT", "all").replace("OUT", str(tmp_path / "all.zarr")))
    code, _, err = cli("run", spec, "-q")
    assert code == 0, err
    assert len(calls) == 14 and sorted(c for c in calls if c is not None) == [0, 10, 20, 30, 40, 50, 60]
    monkeypatch.setitem(artifacts.PRODUCERS, "hessian.eigen", produce)
    alone = write_spec(STABILITY_SPEC.replace("AT", "[40]").replace("OUT", str(tmp_path / "alone.zarr")), "alone.yaml")
    code, _, err = cli("run", alone, "-q")
    assert code == 0, err
    together = open_results(tmp_path / "all.zarr")["sub"]["subspace_overlap"].sel(checkpoint=40)
    lone = open_results(tmp_path / "alone.zarr")["sub"]["subspace_overlap"].sel(checkpoint=40)
    assert np.array_equal(together.values, lone.values)
    assert float(together.sel(checkpoint_b=40)) == pytest.approx(1.0, abs=1e-12)
    assert float(together.sel(checkpoint_b=0)) < 0.99  # the eigenspace moves over training


def test_validate_refuses_a_threshold_outside_the_unit_interval(cli, write_spec):
    spec = write_spec(SPEC.replace("steps: 40,", "steps: 40, threshold: 1.5,"))
    code, _, err = cli("validate", spec)
    assert code == 2 and "threshold" in err


@pytest.mark.cuda
def test_on_cuda_the_probe_gives_the_cpu_result():
    ctx, h, _, _ = quadratic([0.5, 0.3, 0.2], 3)
    params = dict(dims=[1, 3], bases=["random", "hessian", "gradient"], repeats=2, steps=20, batch_size=32,
                  projection="sparse", prune={"keep": [0.5]}, gradient_overlap={})
    cpu = run(ctx, **params)
    model = make_mlp(**{"in": 5, "hidden": [], "out": 1}).double()
    torch.nn.utils.vector_to_parameters(ctx.flat_params, model.parameters())
    cuda = run(make_context(model, ctx.data, mse, device="cuda"), **params)
    for name in ("loss", "full_loss", "gradient_overlap", "prune_loss"):
        np.testing.assert_allclose(cuda[name].values, cpu[name].values, rtol=1e-8, atol=1e-10)
