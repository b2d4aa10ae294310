"""Truth tests of the subspace substrate: training θ0 + P z, bases, overlaps, pruning."""

from __future__ import annotations

import math

import pytest
import torch

from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.spec import OptimizerSpec, TrainSpec
from basinprobe.runtime.substrate import pruning, subspace
from basinprobe.runtime.testing import make_context, regression_data
from basinprobe.runtime.train import train

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def sgd(lr: float, momentum: float = 0.0) -> OptimizerSpec:
    return OptimizerSpec(kind="sgd", lr=lr, momentum=momentum, nesterov=False, weight_decay=0.0, betas=(0.9, 0.999))


def linear_regression(n: int = 200, d_in: int = 5, seed: int = 0):
    """y = x·a + b + noise; a linear model (d_in weights + 1 bias) at a random θ0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    y = X @ torch.randn(d_in, generator=g, dtype=F64) + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=F64)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": d_in, "hidden": [], "out": 1})
    ctx = make_context(model, regression_data(X, y), mse)
    A = torch.cat([X, torch.ones(n, 1, dtype=F64)], dim=1)  # θ = (weights, bias) in parameter order
    return ctx, A, y


def heavy_ball(h_max: float, h_min: float) -> OptimizerSpec:
    """Polyak's optimal heavy-ball parameters for a quadratic with Hessian spectrum in [h_min, h_max]:
    lr = 4/(√h_max + √h_min)², momentum = ((√κ − 1)/(√κ + 1))², contraction (√κ − 1)/(√κ + 1) per step."""
    root = math.sqrt(h_max / h_min)
    return sgd(4 / (math.sqrt(h_max) + math.sqrt(h_min)) ** 2, ((root - 1) / (root + 1)) ** 2)


def test_linear_regression_trained_in_a_subspace_reaches_the_restricted_least_squares_solution():
    # L(θ) = (1/N)‖Aθ − y‖². In θ = θ0 + P z the minimum is z* = argmin ‖(AP) z − (y − Aθ0)‖²
    # (ordinary least squares in the columns AP), with Hessian in z: H_z = (2/N) Pᵀ AᵀA P.
    ctx, A, y = linear_regression()
    N, n = A.shape
    d, groups = 3, 2
    P = subspace.random_dense_basis(n, d, groups, torch.Generator().manual_seed(1), F64)
    theta0 = ctx.flat_params
    spectra = [torch.linalg.eigvalsh(2 / N * P[g].T @ A.T @ A @ P[g]) for g in range(groups)]
    opt = heavy_ball(max(float(s.max()) for s in spectra), min(float(s.min()) for s in spectra))
    run = subspace.train_in_subspace(ctx.forward, mse, theta0, subspace.DenseProjection(P), [d], A[:, :-1], y[:, None],
                                     opt, steps=400, batch_size=N, generator=torch.Generator().manual_seed(0))
    for g in range(groups):
        z_star = torch.linalg.lstsq(A @ P[g], (y - A @ theta0)[:, None]).solution[:, 0]
        torch.testing.assert_close(run.coordinates[0][g], z_star, rtol=0, atol=1e-10)
        torch.testing.assert_close(run.params[g, 0], theta0 + P[g] @ z_star, rtol=0, atol=1e-10)
    assert not run.diverged.any()


def test_batched_bases_and_dims_train_exactly_as_a_loop_of_single_runs():
    # Each model's loss depends on its own coordinates only, so ∇_Z Σ_m L_m = (∇_{z_m} L_m)_m,
    # and SGD/Adam act elementwise: the batched run is the loop, to rounding.
    ctx, A, y = linear_regression(n=64)
    n = ctx.n_params
    P = subspace.random_dense_basis(n, 4, 3, torch.Generator().manual_seed(2), F64)
    adam = OptimizerSpec("adam", 0.05, 0.0, False, 0.0, (0.9, 0.999))
    kwargs = dict(X=ctx.data.X_train, y=ctx.data.y_train, optimizer=adam, steps=30, batch_size=16)
    batched = subspace.train_in_subspace(ctx.forward, mse, ctx.flat_params, subspace.DenseProjection(P), [1, 2, 4],
                                         generator=torch.Generator().manual_seed(5), **kwargs)
    for g in range(3):
        for s, d in enumerate([1, 2, 4]):
            single = subspace.train_in_subspace(ctx.forward, mse, ctx.flat_params, subspace.DenseProjection(P[g:g + 1]),
                                                [d], generator=torch.Generator().manual_seed(5), **kwargs)
            torch.testing.assert_close(batched.params[g, s], single.params[0, 0], rtol=0, atol=1e-12)


def test_full_dimensional_orthonormal_subspace_training_equals_ordinary_training():
    # θ = θ0 + Q z with Q orthogonal (n x n): z ← z − lr Qᵀg gives θ ← θ − lr QQᵀg = θ − lr g,
    # and the momentum buffer rotates the same way; minibatches as runtime.train draws them.
    torch.manual_seed(3)
    X = torch.randn(100, 3, dtype=F64)
    y = torch.sin(X.sum(1, keepdim=True))
    model = make_mlp(**{"in": 3, "hidden": [5], "out": 1, "activation": "tanh"}).double()
    ctx = make_context(model, regression_data(X, y), mse)
    n = ctx.n_params
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=F64))
    opt = sgd(0.05, momentum=0.9)
    run = subspace.train_in_subspace(ctx.forward, mse, ctx.flat_params, subspace.DenseProjection(Q), [n], X, y, opt,
                                     steps=40, batch_size=32, generator=torch.Generator().manual_seed(7))
    trajectory = train(model, ctx.data, mse, TrainSpec(opt, 40, 32, (40,)), torch.Generator().manual_seed(7))
    torch.testing.assert_close(run.params[0, 0], trajectory[40], rtol=0, atol=1e-10)
    identity = subspace.train_in_subspace(ctx.forward, mse, ctx.flat_params, subspace.IdentityProjection(n), [n], X, y,
                                          opt, steps=40, batch_size=32, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(identity.params[0, 0], trajectory[40], rtol=0, atol=1e-10)


def test_sparse_projection_has_unit_columns_about_sqrt_n_nonzeros_each_and_matches_its_dense_form():
    n, d, groups = 400, 12, 2
    P = subspace.SparseProjection(n, d, groups, torch.Generator().manual_seed(0), F64)
    dense = P.dense()
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(groups, d, dtype=F64))
    nonzeros = (dense != 0).sum(dim=1)
    assert (nonzeros <= math.ceil(math.sqrt(n))).all() and (nonzeros >= 0.8 * math.sqrt(n)).all()
    z = torch.randn(groups, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(P(z, 7), torch.einsum("gnd,gd->gn", dense[:, :, :7], z))
    assert P.nbytes < dense.numel() * 8 / 5


def test_overlap_of_identical_spaces_is_one_and_of_orthogonal_spaces_is_zero():
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=F64))
    U, V = Q[:, :5], Q[:, 5:10]
    rotated = U @ torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0]  # another basis of the same space
    assert subspace.subspace_overlap(U, rotated) == pytest.approx(1.0, abs=1e-12)
    assert subspace.subspace_overlap(U, V) == pytest.approx(0.0, abs=1e-12)
    # Two spaces sharing 2 of 5 directions: ‖UᵀW‖² = 2, overlap 2/5.
    W = torch.cat([U[:, :2], V[:, :3]], dim=1)
    assert subspace.subspace_overlap(U, W) == pytest.approx(0.4, abs=1e-12)


def test_overlap_of_random_subspaces_is_dimension_over_ambient_dimension():
    # For U, V independent uniformly random k-dim subspaces of R^n, E‖UᵀV‖_F² = k·k/n, so E overlap = k/n.
    n, k, pairs = 40, 4, 400
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([subspace.subspace_overlap(torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0],
                                                     torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))[0])
                           for _ in range(pairs)])
    stderr = float(values.std() / math.sqrt(pairs))
    assert stderr < 0.005
    assert abs(float(values.mean()) - k / n) < 4 * stderr


def test_principal_directions_of_a_trajectory_span_its_displacements_largest_first():
    # Displacements θ_t − θ_0 = Σ_i a_i(t) e_i in a known 3-dim space, e_0 dominant:
    # the basis has exactly 3 directions, spans that space, and its first is ±e_0.
    n = 50
    E, _ = torch.linalg.qr(torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64))
    start = torch.randn(n, dtype=F64)
    trajectory = {0: start}
    for t in range(1, 8):
        trajectory[10 * t] = start + E @ torch.tensor([10.0 * t, math.sin(t), 0.1 * math.cos(t)], dtype=F64)
    basis = subspace.principal_directions(subspace.trajectory_displacements(trajectory), d=5)
    assert basis.shape == (n, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=F64))
    assert subspace.subspace_overlap(basis, E) == pytest.approx(1.0, abs=1e-10)
    assert abs(float(basis[:, 0] @ E[:, 0])) > 0.999


def test_minibatch_gradients_are_the_least_squares_gradients_of_the_drawn_batches():
    # ∇ (1/B)‖A_b θ − y_b‖² = (2/B) A_bᵀ (A_b θ − y_b), batches drawn as randperm(N)[:B] from the generator.
    ctx, A, y = linear_regression(n=50)
    theta = ctx.flat_params
    G = subspace.minibatch_gradients(ctx.forward, mse, theta, ctx.data.X_train, ctx.data.y_train, count=5,
                                     batch_size=8, generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    for j in range(5):
        idx = torch.randperm(50, generator=replay)[:8]
        expected = 2 / 8 * A[idx].T @ (A[idx] @ theta - y[idx])
        torch.testing.assert_close(G[:, j], expected)


def low_rank_mlp(rank: int = 2, d_in: int = 8, hidden: int = 16, d_out: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = make_mlp(**{"in": d_in, "hidden": [hidden], "out": d_out, "activation": "tanh"}).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.linear_layers:
            m, k = layer.weight.shape
            layer.weight.copy_(torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, k, generator=g,
                                                                                          dtype=F64) / k)
    return model


def test_svd_truncation_of_exactly_low_rank_layers_is_lossless_at_the_neuron_budget():
    # Layers 16x8 and 8x16 of rank 2. Keeping 6 of 16 units (keep 0.375) gives budgets 6·8 = 48 per
    # layer, and rank ⌊48/(16+8)⌋ = 2: the truncation reproduces every weight. At keep 0.25 (4 units,
    # budget 32) the rank is ⌊32/24⌋ = 1 < 2, and the truncation must change the weights.
    model = low_rank_mlp()
    layers = pruning.linear_chain(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert pruning.neuron_budgets(layers, 0.375) == [48, 48]
    assert pruning.svd_ranks(layers, [48, 48]) == [2, 2]
    pruned, spent = pruning.prune(params, layers, "subspace", 0.375)
    assert spent == 2 * 24 * 2
    for name in params:
        torch.testing.assert_close(pruned[name], params[name], rtol=0, atol=1e-12)
    lossy, _ = pruning.prune(params, layers, "subspace", 0.25)
    assert (lossy["0.weight"] - params["0.weight"]).abs().max() > 1e-3
    neurons, _ = pruning.prune(params, layers, "neuron", 0.375)
    assert int((neurons["0.weight"].abs().sum(1) > 0).sum()) == 6
    assert int((neurons["2.weight"].abs().sum(0) > 0).sum()) == 6


def test_magnitude_pruning_keeps_exactly_the_budgeted_largest_weights():
    model = low_rank_mlp()
    layers = pruning.linear_chain(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    pruned, spent = pruning.prune(params, layers, "magnitude", 0.5)   # 8 units: 8·8 = 64 per layer
    assert spent == 128
    for layer in layers:
        w, kept = params[layer.weight].abs().reshape(-1), pruned[layer.weight].reshape(-1)
        assert int((kept != 0).sum()) == 64
        assert float(w[kept == 0].max()) <= float(w[kept != 0].min())


def test_pruning_refuses_a_model_that_is_not_a_chain_of_linear_layers():
    with pytest.raises(ValueError, match="nn.Sequential"):
        pruning.linear_chain(torch.nn.Bilinear(2, 2, 2))


def test_svd_pruning_keeps_a_layer_whole_when_its_budget_covers_the_matrix():
    # keep 1.0: budgets 16·8 = 128 = m·n; rank-r factors would cost r·24 > 128 for r = 8, so the
    # matrix itself is kept (rank min(m, n) = 8) and the spend is m·n.
    model = low_rank_mlp(rank=8)
    layers = pruning.linear_chain(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert pruning.svd_ranks(layers, pruning.neuron_budgets(layers, 1.0)) == [8, 8]
    pruned, spent = pruning.prune(params, layers, "subspace", 1.0)
    assert spent == 2 * 128
    torch.testing.assert_close(pruned["0.weight"], params["0.weight"], rtol=0, atol=1e-12)
