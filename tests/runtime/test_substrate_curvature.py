"""Truth tests of the curvature engine: products, Lanczos, SLQ, trace estimators, dense path, artifacts."""

import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import eigsh

from basinprobe.registry import Dataset
from basinprobe.runtime.losses import cross_entropy, mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate.dense import dense_hessian, dense_operator
from basinprobe.runtime.substrate.hvp import curvature_operator
from basinprobe.runtime.substrate.lanczos import lanczos, lanczos_quadrature
from basinprobe.runtime.substrate.slq import density_grid, rademacher, slq, spectral_density, trace_function
from basinprobe.runtime.substrate.trace import hutchinson, hutchpp
from basinprobe.runtime.substrate.volume import (log_unit_ball_volume, monte_carlo_log_volume, ray_radii,
                                                 uniform_directions)
from basinprobe.runtime.testing import make_context, regression_data

F64 = torch.float64


def classifier_context(seed=0, hidden=(5,), n=48, d_in=4, classes=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": d_in, "hidden": list(hidden), "out": classes, "activation": "tanh"})
    return make_context(model, Dataset(X, y, X[:0], y[:0], task="classification", n_classes=classes),
                        cross_entropy, batch_size=16, trajectory=None)


def func_hessian(ctx):
    X, y = ctx.data.split("train")
    return torch.func.hessian(lambda t: ctx.loss_fn(ctx.forward(t, X), y))(ctx.flat_params)


def known_matrix(eigenvalues, seed=0):
    """Q diag(λ) Qᵀ with a random orthogonal Q."""
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=F64)) @ Q.T


class ReadsAValue(torch.nn.Module):
    """An MLP whose forward reads a tensor's value (.item()), which has no batched rule under vmap:
    its copies cannot be stacked."""

    def __init__(self):
        super().__init__()
        self.net = make_mlp(**{"in": 3, "hidden": [4], "out": 2, "activation": "tanh"})

    def forward(self, x):
        out = self.net(x)
        return out if out.abs().max().item() < 1e6 else out.clamp(-1e6, 1e6)


def unstackable_context():
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(30, 3, generator=g, dtype=F64), torch.randn(30, 2, generator=g, dtype=F64)
    torch.manual_seed(7)
    return make_context(ReadsAValue(), regression_data(X, y), mse)


# --- products -------------------------------------------------------------------------------

def test_hessian_products_equal_columns_of_torch_func_hessian_in_every_formulation():
    ctx = classifier_context()
    H = func_hessian(ctx)
    eye = torch.eye(ctx.n_params, dtype=F64)
    for op in (curvature_operator(ctx), curvature_operator(ctx, cache=False),
               curvature_operator(ctx, batch_size=10)):
        assert torch.allclose(op.matmat(eye), H, atol=1e-12)
        assert torch.allclose(op.matmat(eye, batched=True), H, atol=1e-12)
        assert op.count == 2 * ctx.n_params


def test_ggn_product_is_jacobian_sandwich_of_output_hessian():
    # G = Σ_a J_aᵀ (∇²_z ℓ) J_a, with J = ∂f(x_a)/∂θ and the loss's Hessian in the outputs
    ctx = classifier_context(seed=1)
    X, y = ctx.data.split("train")
    J = torch.func.jacrev(lambda t: ctx.forward(t, X))(ctx.flat_params)           # (N, C, n)
    z = ctx.forward(ctx.flat_params, X)
    H_out = torch.func.hessian(lambda out: cross_entropy(out, y))(z)               # (N, C, N, C)
    G = torch.einsum("aip,aibj,bjq->pq", J, H_out, J)
    op = curvature_operator(ctx, "ggn")
    eye = torch.eye(ctx.n_params, dtype=F64)
    assert torch.allclose(op.matmat(eye), G, atol=1e-12)
    assert torch.allclose(op.matmat(eye, batched=True), G, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD for a convex loss of the outputs


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    X = torch.randn(30, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    ctx = make_context(make_mlp(**{"in": 5, "hidden": [], "out": 2}), regression_data(X, X[:, :2] ** 2), mse)
    eye = torch.eye(ctx.n_params, dtype=F64)
    assert torch.allclose(curvature_operator(ctx, "ggn").matmat(eye), curvature_operator(ctx).matmat(eye), atol=1e-12)


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
@pytest.mark.parametrize("models", [1, 2])
def test_a_block_through_stacked_copies_of_the_model_is_the_looped_block(monkeypatch, operator, models):
    import basinprobe.runtime.substrate.hvp as hvp
    from basinprobe.runtime.substrate.curvature import stacked_operator

    ctxs = [classifier_context(seed=s) for s in range(models)]
    n, k = ctxs[0].n_params, 7
    V = torch.randn(models, n, k, generator=torch.Generator().manual_seed(9), dtype=F64)
    X, y = ctxs[0].data.split("train")   # stacked models share the first cell's data
    exact = torch.stack([torch.func.hessian(lambda t: cross_entropy(ctxs[0].forward(t, X), y))(c.flat_params)
                         for c in ctxs]) if operator == "hessian" else None

    def block(work):
        monkeypatch.setattr(hvp, "REPLICA_WORK", work)
        op = stacked_operator(ctxs, operator) if models > 1 else curvature_operator(ctxs[0], operator)
        if work:   # 3 copies: blocks of 3, 3 and 1 (padded); the loop of products must not be taken
            op.matvec = None
        out = op.matmat(V if models > 1 else V[0])
        assert op.count == k
        return out.reshape(models, n, k)

    copies, looped = block(3 * models * n * len(X)), block(0)
    assert torch.allclose(copies, looped, atol=1e-13)
    if exact is not None:
        assert torch.allclose(copies, exact @ V, atol=1e-12)


def test_a_block_for_a_model_that_cannot_be_stacked_is_looped():
    ctx = unstackable_context()
    op = curvature_operator(ctx)
    V = torch.randn(ctx.n_params, 5, generator=torch.Generator().manual_seed(8), dtype=F64)
    assert torch.allclose(op.matmat(V), func_hessian(ctx) @ V, atol=1e-12)
    assert torch.allclose(op.matmat(V[:, :3]), func_hessian(ctx) @ V[:, :3], atol=1e-12)
    assert op.count == 8


def test_scipy_linear_operator_gives_the_dense_top_eigenvalue():
    ctx = classifier_context(seed=3)
    op = curvature_operator(ctx)
    top = eigsh(op.as_linear_operator(), k=1, which="LA", tol=1e-12)[0][0]
    assert top == pytest.approx(float(torch.linalg.eigvalsh(func_hessian(ctx))[-1]), rel=1e-9)
    assert op.count > 0


def test_gradient_and_loss_of_operator_match_autograd_over_first_batches():
    ctx = classifier_context(seed=4)
    op = curvature_operator(ctx, batches=2)  # first 2 minibatches of batch_size 16
    X, y = ctx.data.split("train")
    theta = ctx.flat_params.clone().requires_grad_(True)
    loss = cross_entropy(ctx.forward(theta, X[:32]), y[:32])
    assert op.n_examples == 32
    assert op.loss_value == pytest.approx(float(loss.detach()), rel=1e-12)
    assert torch.allclose(op.gradient, torch.autograd.grad(loss, theta)[0], atol=1e-13)


# --- dense path -----------------------------------------------------------------------------

def test_dense_hessian_is_torch_func_hessian_also_for_mse_and_minibatches():
    # mse goes through the workaround for torch.func.grad's ZeroTensor error in forward-over-reverse
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(40, 2, generator=g, dtype=F64)
    torch.manual_seed(5)
    ctx = make_context(make_mlp(**{"in": 3, "hidden": [4], "out": 2, "activation": "tanh"}),
                       regression_data(X, y), mse)
    H = func_hessian(ctx)
    assert torch.allclose(dense_hessian(ctx, chunk_size=5), H, atol=1e-12)
    assert torch.allclose(dense_hessian(ctx, batch_size=7), H, atol=1e-12)
    assert torch.allclose(dense_operator(curvature_operator(ctx), chunk_size=4), H, atol=1e-12)


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
@pytest.mark.parametrize("replica_rows", [40 * 3, 40 * 64])   # 3 and 32 copies of the model
def test_dense_matrix_from_replicated_models_is_the_column_by_column_matrix(monkeypatch, replica_rows, operator):
    import basinprobe.runtime.substrate.dense as dense

    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(6)
    ctx = make_context(make_mlp(**{"in": 3, "hidden": [5], "out": 3, "activation": "tanh"}),
                       Dataset(X, y, X[:0], y[:0], task="classification", n_classes=3), cross_entropy)

    def matrix(rows):
        monkeypatch.setattr(dense, "REPLICA_ROWS", rows)
        op = curvature_operator(ctx, operator, batches=2, batch_size=16)     # two batches, 16/32 each
        if rows > 40:   # several copies: the stacked path must not fall back to the column path
            op.matmat = op.matvec = None
        return dense_operator(op), op.count

    (replicated, count), (by_column, _) = matrix(replica_rows), matrix(1)   # 1: one product a column
    assert count == ctx.n_params
    assert torch.allclose(replicated, by_column, atol=1e-13)
    if operator == "hessian":
        exact = torch.func.hessian(lambda t: ctx.loss_fn(ctx.forward(t, X[:32]), y[:32]))(ctx.flat_params)
        assert torch.allclose(replicated, exact, atol=1e-12)


def test_a_model_that_cannot_be_stacked_gets_its_dense_hessian_a_column_at_a_time():
    ctx = unstackable_context()
    with pytest.raises(RuntimeError):
        curvature_operator(ctx).replicated(4)
    assert torch.allclose(dense_operator(curvature_operator(ctx)), func_hessian(ctx), atol=1e-12)


def test_an_error_after_the_first_stacked_columns_propagates_rather_than_falling_back(monkeypatch):
    import basinprobe.runtime.substrate.dense as dense
    from basinprobe.runtime.substrate.curvature import CurvatureOperator

    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(20, 3, generator=g, dtype=F64), torch.randn(20, 2, generator=g, dtype=F64)
    torch.manual_seed(8)
    ctx = make_context(make_mlp(**{"in": 3, "hidden": [4], "out": 2, "activation": "tanh"}),
                       regression_data(X, y), mse)
    monkeypatch.setattr(dense, "REPLICA_ROWS", 20 * 4)   # 4 copies: 6 stacked products for 26 columns
    replicated = CurvatureOperator.replicated
    calls = []

    def failing_later(self, copies):
        stack = replicated(self, copies)
        product = stack.matvec

        def matvec(v):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory in the second stacked product")
            return product(v)

        stack.matvec = matvec
        return stack

    monkeypatch.setattr(CurvatureOperator, "replicated", failing_later)
    with pytest.raises(RuntimeError, match="second stacked product"):
        dense_operator(curvature_operator(ctx))


# --- Lanczos --------------------------------------------------------------------------------

def test_lanczos_top_and_bottom_eigenpairs_of_a_known_spectrum():
    eigenvalues = torch.linspace(-1.0, 3.0, 300, dtype=F64) ** 3
    A = known_matrix(eigenvalues)
    for which, expected in (("top", eigenvalues.flip(0)[:6]), ("bottom", eigenvalues[:6])):
        result = lanczos(lambda v: A @ v, 300, 6, which, tol=1e-10)
        assert result.converged
        assert torch.allclose(result.values, expected, rtol=1e-8)
        residual = A @ result.vectors - result.vectors * result.values
        assert residual.norm(dim=0).max() < 1e-4
        assert torch.allclose(result.vectors.T @ result.vectors, torch.eye(6, dtype=F64), atol=1e-10)


def test_thick_restart_bounds_the_basis_and_still_converges():
    eigenvalues = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0], dtype=F64), torch.linspace(0, 7, 396, dtype=F64)])
    A = known_matrix(eigenvalues, seed=1)
    result = lanczos(lambda v: A @ v, 400, 4, "top", tol=1e-10, max_basis=12)
    assert result.restarts > 0 and result.converged
    assert torch.allclose(result.values, eigenvalues[:4], rtol=1e-9)


def test_lanczos_stops_as_soon_as_the_requested_accuracy_is_reached():
    A = known_matrix(torch.cat([torch.tensor([5.0, 4.0, 3.0], dtype=F64), torch.rand(197, dtype=F64,
                               generator=torch.Generator().manual_seed(0))]))
    loose = lanczos(lambda v: A @ v, 200, 3, tol=1e-3)
    tight = lanczos(lambda v: A @ v, 200, 3, tol=1e-12)
    assert loose.matvecs < tight.matvecs < 200
    assert torch.allclose(loose.values, torch.tensor([5.0, 4.0, 3.0], dtype=F64), rtol=1e-3)
    assert (loose.errors <= 1e-3 * loose.values.abs()).all()


def test_lanczos_finds_every_copy_of_a_repeated_eigenvalue():
    # the Krylov space of one start vector sees each distinct eigenvalue once; a breakdown
    # must continue in a fresh direction to find the other copies
    eigenvalues = torch.tensor([5.0, 5.0, 5.0] + [1.0] * 47, dtype=F64)
    A = known_matrix(eigenvalues, seed=2)
    result = lanczos(lambda v: A @ v, 50, 4, "top", tol=1e-10)
    assert torch.allclose(result.values, torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=F64), atol=1e-9)


@pytest.mark.parametrize("which, k, expected", [
    ("top", 4, [0.982] * 4), ("top", 7, [0.982] * 5 + [0.709] * 2), ("bottom", 2, [0.414] * 2),
])
def test_lanczos_finds_copies_that_a_converged_run_missed(which, k, expected):
    # I5 (x) M: three distinct eigenvalues, each five times. One start vector's Krylov space
    # sees three values, which converge at once; the run must not report 0.709 as the second.
    # (The multi-output least-squares Hessian has this structure.)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64))
    A = torch.kron(torch.eye(5, dtype=F64), Q @ torch.diag(torch.tensor([0.982, 0.709, 0.414], dtype=F64)) @ Q.T)
    result = lanczos(lambda v: A @ v, 15, k, which, tol=1e-10)
    assert result.converged and torch.allclose(result.values, torch.tensor(expected, dtype=F64), atol=1e-9)
    assert torch.allclose(result.vectors.T @ result.vectors, torch.eye(k, dtype=F64), atol=1e-9)
    assert (A @ result.vectors - result.vectors * result.values).norm(dim=0).max() < 1e-8


def test_a_large_multi_output_least_squares_hessian_has_its_repeated_top_eigenvalues():
    # the audit's case at a size where method auto takes Lanczos: 1505 parameters, top 6 of
    # I5 (x) 2AᵀA/(5N), each eigenvalue five times
    g = torch.Generator().manual_seed(1)
    X = torch.cat([torch.randn(400, 300, generator=g, dtype=F64), torch.ones(400, 1, dtype=F64)], dim=1)
    M = 2 * X.T @ X / (400 * 5)
    exact = torch.linalg.eigvalsh(M).flip(0)
    result = lanczos(lambda v: (M @ v.view(5, 301).T).T.reshape(-1), 1505, 6, "top", tol=1e-8)
    assert torch.allclose(result.values, torch.cat([exact[:1].repeat(5), exact[1:2]]), rtol=1e-6)


def test_the_krylov_basis_stays_orthonormal_to_rounding_after_eigenvalues_converge():
    # Outliers converge within a few dozen steps; plain Lanczos then loses orthogonality along
    # their Ritz vectors (ghost copies). The recurrence plus one full pass must prevent it.
    from basinprobe.runtime.substrate.lanczos import _Krylov

    n, steps = 300, 150
    A = known_matrix(torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.linspace(0, 1, n - 3)]), seed=6)
    krylov = _Krylov(1, n, steps, F64, "cpu")
    krylov.start(torch.randn(1, n, generator=torch.Generator().manual_seed(6), dtype=F64))
    active, scale = torch.ones(1, dtype=torch.bool), torch.ones(1, dtype=F64)
    for _ in range(steps):
        krylov.accept(krylov.pending() @ A)
        krylov.advance(scale, active)
    V = krylov.V[0, :steps]
    assert (V @ V.T - torch.eye(steps, dtype=F64)).abs().max() < 1e-13
    theta = torch.linalg.eigvalsh(krylov.T[0, :steps, :steps])
    assert int((theta > 29.0).sum()) == 3  # no ghost copies of the outliers
    # T is the projection VᵀAV
    assert torch.allclose(krylov.T[0, :steps, :steps], V @ A @ V.T, atol=1e-12)


def test_lanczos_rows_take_each_operator_through_the_steps_it_takes_alone():
    # One restarts (max_basis 12), one breaks down (a repeated eigenvalue), one converges early
    # and is then sent zeros; each row must end exactly as lanczos() on its operator alone.
    from basinprobe.runtime.substrate.lanczos import lanczos_rows
    from basinprobe.runtime.substrate.lockstep import drive

    n = 60
    A = torch.stack([
        known_matrix(torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0]), torch.linspace(0, 7, n - 4)]), seed=1),
        known_matrix([5.0] * 3 + [1.0] * (n - 3), seed=2),
        known_matrix(torch.cat([torch.tensor([100.0, 50.0, 20.0, 10.0]), torch.linspace(0, 1, n - 4)]), seed=3),
    ])
    sent = []

    def apply(V):
        sent.append(V.clone())
        return torch.einsum("mij,mj->mi", A, V)

    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    together = drive(lanczos_rows(n, 4, generators=generators, tol=1e-10, max_basis=12), apply)
    alone = [lanczos(lambda v, a=a: a @ v, n, 4, tol=1e-10, max_basis=12, generator=torch.Generator().manual_seed(s))
             for s, a in enumerate(A)]
    for i, (row, single) in enumerate(zip(together, alone)):
        assert (row.matvecs, row.restarts, row.converged) == (single.matvecs, single.restarts, True)
        assert torch.allclose(row.values, single.values, rtol=1e-12)
        # each row is sent its own products and zeros otherwise (while others finish a pass)
        assert sum(not bool((V[i] == 0).all()) for V in sent) == row.matvecs
    for i in (0, 2):
        assert torch.allclose(together[i].vectors, alone[i].vectors, atol=1e-10)
    # a repeated eigenvalue's vectors are any basis of its eigenspace: compare the projectors on it
    U, W = together[1].vectors[:, :3], alone[1].vectors[:, :3]
    assert torch.allclose(U @ U.T, W @ W.T, atol=1e-9)
    assert together[0].restarts > 0
    assert torch.allclose(together[1].values, torch.tensor([5.0, 5.0, 5.0, 1.0], dtype=F64), atol=1e-9)
    assert together[2].matvecs < together[0].matvecs <= len(sent)


def test_lanczos_quadrature_is_exact_for_polynomials_of_degree_below_2m():
    A = known_matrix(torch.linspace(-2, 2, 60, dtype=F64), seed=3)
    v = torch.randn(60, generator=torch.Generator().manual_seed(3), dtype=F64)
    nodes, weights = lanczos_quadrature(lambda x: A @ x, v, steps=4)
    assert len(nodes) == 4 and float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for p in range(8):  # exact for degree <= 2m - 1 = 7
        exact = float(v @ torch.linalg.matrix_power(A, p) @ v / (v @ v))
        assert float((weights * nodes**p).sum()) == pytest.approx(exact, abs=1e-10)


# --- SLQ and trace estimators ---------------------------------------------------------------

def test_slq_log_determinant_is_within_three_standard_errors():
    eigenvalues = torch.logspace(-2, 1, 200, dtype=F64)
    A = known_matrix(eigenvalues, seed=4)
    q = slq(lambda V: V @ A, 200, probes=30, steps=25, generator=torch.Generator().manual_seed(4))
    estimate, stderr = trace_function(q, torch.log)
    exact = float(eigenvalues.log().sum())  # log det A = Σ log λ_i
    assert 0 < stderr < 0.1 * abs(exact)
    assert abs(estimate - exact) < 3 * stderr
    assert q.matvecs == 30 * 25


def test_slq_density_integrates_to_one_and_has_mean_trace_over_n():
    eigenvalues = torch.cat([torch.linspace(-1, 1, 150, dtype=F64), torch.tensor([4.0, 6.0], dtype=F64)])
    A = known_matrix(eigenvalues, seed=5)
    q = slq(lambda V: V @ A, 152, probes=10, steps=20, generator=torch.Generator().manual_seed(5))
    grid, sigma = density_grid(q.nodes, 400, 0.01)
    phi = spectral_density(q.nodes, q.weights, grid, sigma)
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-6)
    mean, mean_se = trace_function(q, lambda t: t)
    assert float(torch.trapezoid(grid * phi, grid)) == pytest.approx(mean / 152, abs=1e-6)
    assert abs(mean - float(eigenvalues.sum())) < 3 * mean_se


def test_hutchinson_and_hutchpp_are_within_three_standard_errors_and_hutchpp_is_tighter():
    eigenvalues = torch.cat([torch.tensor([50.0, 30.0, 20.0], dtype=F64), torch.rand(
        297, dtype=F64, generator=torch.Generator().manual_seed(6))])
    A = known_matrix(eigenvalues, seed=6)
    exact = float(eigenvalues.sum())
    plain = hutchinson(lambda V: A @ V, 300, 60, torch.Generator().manual_seed(6))
    plus = hutchpp(lambda V: A @ V, 300, 60, torch.Generator().manual_seed(6))
    for estimate in (plain, plus):
        assert abs(estimate.value - exact) < 3 * estimate.stderr
    assert plus.stderr < plain.stderr / 3
    assert plus.matvecs == 60


def test_hutchpp_is_exact_when_its_sketch_spans_the_space():
    A = known_matrix(torch.linspace(-3, 5, 10, dtype=F64), seed=7)
    estimate = hutchpp(lambda V: A @ V, 10, 30, torch.Generator().manual_seed(7))
    assert estimate.value == pytest.approx(float(torch.trace(A)), abs=1e-12)
    assert estimate.stderr == 0.0


# --- artifacts ------------------------------------------------------------------------------

def test_eigen_artifact_lanczos_and_dense_paths_agree_with_torch_func_hessian():
    ctx = classifier_context(seed=8, hidden=(6,))
    exact = torch.linalg.eigvalsh(func_hessian(ctx))
    dense = ctx.artifact("hessian.eigen", k=4, which="top", method="dense")
    krylov = ctx.artifact("hessian.eigen", k=4, which="top", method="lanczos", tol=1e-10)
    assert dense.method == "dense" and krylov.method == "lanczos"
    for result in (dense, krylov):
        assert torch.allclose(result.values, exact.flip(0)[:4], rtol=1e-8)
        assert result.vectors.shape == (ctx.n_params, 4)
    assert ctx.artifact("hessian.eigen", k=4, which="top", method="lanczos", tol=1e-10) is krylov  # cached
    bottom = ctx.artifact("hessian.eigen", k=3, which="bottom")  # auto: dense for a small model
    assert bottom.method == "dense" and torch.allclose(bottom.values, exact[:3], rtol=1e-10)


def test_eigen_artifact_at_a_checkpoint_measures_that_checkpoints_parameters():
    ctx = classifier_context(seed=9)
    init = ctx.flat_params.clone()
    trained = init + 0.3 * torch.randn(ctx.n_params, generator=torch.Generator().manual_seed(9), dtype=F64)
    from basinprobe.runtime.context import CellContext

    cell = CellContext(ctx.model, trained, ctx.data, cross_entropy, dtype=F64, trajectory={0: init, 10: trained},
                       checkpoint=10)
    X, y = ctx.data.split("train")
    at_init = torch.linalg.eigvalsh(torch.func.hessian(lambda t: cross_entropy(cell.forward(t, X), y))(init))
    result = cell.artifact("hessian.eigen", k=2, at=0, method="lanczos", tol=1e-10)
    assert torch.allclose(result.values, at_init.flip(0)[:2], rtol=1e-8)
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        cell.artifact("hessian.eigen", k=2, at=5)


def test_eigen_artifact_rejects_more_eigenpairs_than_parameters():
    ctx = classifier_context()
    with pytest.raises(ValueError, match="eigenpairs of a model with"):
        ctx.artifact("hessian.eigen", k=ctx.n_params + 1)


# --- volume ---------------------------------------------------------------------------------

def test_unit_ball_volumes():
    assert math.exp(log_unit_ball_volume(2)) == pytest.approx(math.pi)
    assert math.exp(log_unit_ball_volume(3)) == pytest.approx(4 * math.pi / 3)


def test_ray_radii_of_a_quadratic_are_where_half_u_lambda_u_r2_reaches_epsilon():
    lam = torch.tensor([0.5, 2.0, 8.0], dtype=F64)
    U = uniform_directions(50, 3, torch.Generator().manual_seed(10), F64, "cpu")

    def losses(W):
        return 0.5 * (W**2 * lam).sum(dim=1)

    rays = ray_radii(losses, torch.zeros(3, dtype=F64), U, [0.01, 0.1], radius=10.0, base_loss=0.0)
    curvature = (U**2 * lam).sum(dim=1)
    for j, eps in enumerate([0.01, 0.1]):
        assert torch.allclose(rays.radii[:, j], torch.sqrt(2 * eps / curvature), rtol=1e-8)  # r = √(2ε/uᵀΛu)
    assert not rays.capped.any()


def test_monte_carlo_log_volume_of_a_ball_is_exact():
    log_v, stderr, ess = monte_carlo_log_volume(torch.full((20,), math.log(2.0), dtype=F64), 5)
    assert log_v == pytest.approx(log_unit_ball_volume(5) + 5 * math.log(2.0))
    assert stderr == 0.0 and ess == pytest.approx(20.0)
    assert np.isfinite(monte_carlo_log_volume(torch.tensor([0.0, -3.0], dtype=F64), 100000)[0])


def test_compiled_hvp_path_gives_the_products_of_the_cached_graph(monkeypatch):
    # execution.compile routes one model's products through the functional jvp(grad) HVP under
    # torch.compile; the compiler itself is replaced by the identity here (it takes ~40 s on CPU),
    # so this checks the compiled path's products, single and in blocks, against the eager ones.
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    ctx = classifier_context(seed=2)
    eager = curvature_operator(ctx, batch_size=16)
    ctx.compile = True
    compiled = curvature_operator(ctx, batch_size=16)
    assert compiled._compiled is not None
    V = torch.randn(ctx.n_params, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(compiled.matvec(V[:, 0]), eager.matvec(V[:, 0]), atol=1e-13)
    assert torch.allclose(compiled.matmat(V, batched=True), eager.matmat(V), atol=1e-13)
    assert torch.allclose(compiled.matmat(V, batched=False), eager.matmat(V), atol=1e-13)


def test_stacked_quadrature_and_slq_equal_the_one_operator_runs_also_with_early_breakdown():
    # Three operators at once; the second has only 3 distinct eigenvalues, so its Krylov space is
    # invariant after 3 steps and its rule stops there (fewer nodes), as lanczos_quadrature does.
    from basinprobe.runtime.substrate.lanczos import quadrature_rows
    from basinprobe.runtime.substrate.lockstep import drive
    from basinprobe.runtime.substrate.slq import slq_stacked

    n = 12
    A = torch.stack([known_matrix(torch.linspace(-1, 3, n), seed=1),
                     known_matrix([0.5] * 4 + [2.0] * 4 + [-1.0] * 4, seed=2),
                     known_matrix(torch.logspace(-3, 1, n), seed=3)])
    V0 = torch.randn(3, n, generator=torch.Generator().manual_seed(4), dtype=F64)
    sent = []

    def apply(V):
        sent.append(V.clone())
        return torch.einsum("mij,mj->mi", A, V)

    rules = drive(quadrature_rows(V0, 8), apply)
    for (theta, tau), a, v in zip(rules, A, V0):
        theta1, tau1 = lanczos_quadrature(lambda x, a=a: a @ x, v, 8)
        assert len(theta) == len(theta1)
        assert torch.allclose(theta, theta1, atol=1e-12) and torch.allclose(tau, tau1, atol=1e-12)
    assert len(rules[1][0]) == 3
    assert len(sent) == 8 and all(bool((V[1] == 0).all()) for V in sent[3:])  # a stopped row is sent zeros
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    stacked = slq_stacked(lambda V: torch.einsum("mij,mpj->mpi", A, V), n, 4, 8, gens)
    for q, a, s in zip(stacked, A, range(3)):
        alone = slq(lambda V, a=a: V @ a, n, 4, 8, torch.Generator().manual_seed(s))
        assert q.matvecs == alone.matvecs
        assert torch.allclose(q.nodes, alone.nodes, atol=1e-12) and torch.allclose(q.weights, alone.weights, atol=1e-12)
        # each probe's rule is the one Lanczos quadrature gives for that probe vector alone
        probe = rademacher(n, 4, torch.Generator().manual_seed(s))[2]
        theta1, tau1 = lanczos_quadrature(lambda x, a=a: a @ x, probe, 8)
        assert torch.allclose(alone.nodes[2, : len(theta1)], theta1, atol=1e-12)
        assert torch.allclose(alone.weights[2, : len(tau1)], tau1, atol=1e-12)


def test_auto_method_forms_the_matrix_for_a_whole_spectrum_but_counts_products_for_extremes():
    from basinprobe.runtime.substrate.curvature import DENSE_THRESHOLD, choose_method

    assert choose_method("auto", DENSE_THRESHOLD, 20) == "dense"
    assert choose_method("auto", DENSE_THRESHOLD + 1, 20) == "lanczos"
    assert choose_method("auto", 50, 60) == "dense"                        # more pairs than parameters
    # only k extreme pairs: Lanczos (~4k + 30 products) unless the n columns are fewer than 10k + 100
    assert choose_method("auto", 1000, 5, extremes_only=True) == "lanczos"
    assert choose_method("auto", 140, 5, extremes_only=True) == "dense"
    assert choose_method("lanczos", 10, 5, extremes_only=True) == "lanczos"  # a named method is kept
    with pytest.raises(ValueError, match="method must be"):
        choose_method("arpack", 10)
