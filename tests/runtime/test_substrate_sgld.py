"""Truth tests of the batched Langevin substrate and the MCMC diagnostics.

The quadratic case: a linear model y = x·w (no bias) under the mean squared
error has L_n(w) = L_n(w*) + ½(w − w*)ᵀH(w − w*) exactly, with H = 2XᵀX/n. Its
localized tempered posterior is Gaussian with precision P = nβH + γI, so

    MALA (exact):        Cov(w) = P⁻¹
    SGLD (unadjusted):   Cov(w) = (P(I − εP/4))⁻¹     (w ← w − (ε/2)Pw + √ε ξ is an AR(1)
                                                       with variance ε/(1 − (1 − εp/2)²) = 1/(p(1 − εp/4)))
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate import sgld
from basinprobe.runtime.substrate.diagnostics import effective_sample_size, split_rhat
from basinprobe.runtime.testing import make_context, regression_data


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Quadratic case: data covariance eigenvalues s, so H = 2XᵀX/n has eigenvalues h = 2s.
SPECTRUM = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05, 0.025], dtype=torch.float64)
NBETA, GAMMA = 10.0, 1.0


def quadratic_posterior(n: int = 64, seed: int = 0, device: str = "cpu"):
    """A linear model at its least-squares minimum, data with XᵀX/n = R·diag(SPECTRUM)·Rᵀ exactly."""
    d = len(SPECTRUM)
    g = torch.Generator().manual_seed(seed)
    Z = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))[0] * math.sqrt(n)
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    X = Z @ torch.diag(SPECTRUM.sqrt()) @ R.T
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = make_mlp(**{"in": d, "hidden": [], "out": 1, "bias": False}).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.lstsq(X, y[:, None]).solution.T)
    ctx = make_context(model, regression_data(X, y), mse, device=device)
    post = sgld.LocalPosterior(ctx.forward, ctx.loss_fn, ctx.data.X_train, ctx.data.y_train, ctx.flat_params, NBETA, GAMMA)
    H = 2 * X.T @ X / n
    return post, H, R


def whitened_covariance_errors(samples: torch.Tensor, center: torch.Tensor, covariance: torch.Tensor):
    """z = C^(-1/2)(w − w*) has identity covariance if C is the chains' covariance; return
    E[z zᵀ] − I and each entry's standard error from the effective sample size of z_i z_j."""
    evals, evecs = torch.linalg.eigh(covariance)
    whiten = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    z = ((samples - center) @ whiten.T).numpy()            # (chains, draws, d)
    d = z.shape[-1]
    error, stderr = np.zeros((d, d)), np.zeros((d, d))
    for i in range(d):
        for j in range(i, d):
            prod = z[..., i] * z[..., j]
            error[i, j] = prod.mean() - (i == j)
            stderr[i, j] = prod.std(ddof=1) / math.sqrt(effective_sample_size(prod, rank_normalize=False))
    upper = np.triu_indices(d)
    return error[upper], stderr[upper]


def test_mala_sample_covariance_is_the_inverse_localized_precision():
    post, H, _ = quadratic_posterior()
    P = NBETA * H + GAMMA * torch.eye(len(H), dtype=torch.float64)
    trace = sgld.sample(post, step_size=0.08, chains=64, draws=400, sampler="mala", seed=3, keep_samples=True)
    samples = trace.samples[:, 100:]
    error, stderr = whitened_covariance_errors(samples, post.center, torch.linalg.inv(P))
    assert np.all(np.abs(error) < 4.5 * stderr), (error, stderr)
    # The test can fail: the sampling error is well below the γ-effect it resolves.
    assert stderr.max() < 0.1


def test_sgld_sample_covariance_matches_the_discretized_langevin_closed_form():
    post, H, _ = quadratic_posterior()
    P = NBETA * H + GAMMA * torch.eye(len(H), dtype=torch.float64)
    p_max = float(torch.linalg.eigvalsh(P)[-1])
    eps = 1.0 / p_max                                   # ε·p_max = 1: a 33% variance bias in the stiffest direction
    trace = sgld.sample(post, step_size=eps, chains=64, draws=400, sampler="sgld", seed=4, keep_samples=True)
    samples = trace.samples[:, 100:]
    ula = torch.linalg.inv(P @ (torch.eye(len(P), dtype=torch.float64) - eps * P / 4))
    error, stderr = whitened_covariance_errors(samples, post.center, ula)
    assert np.all(np.abs(error) < 4.5 * stderr), (error, stderr)
    # Against the exact posterior covariance the stiffest direction's 1/(1 − 1/4) excess shows.
    error_exact, stderr_exact = whitened_covariance_errors(samples, post.center, torch.linalg.inv(P))
    assert np.max(np.abs(error_exact) / stderr_exact) > 6


@pytest.mark.parametrize("large_state", [False, True])
def test_minibatch_sgld_step_is_the_full_batch_step_when_every_minibatch_has_the_full_gradient(
        monkeypatch, large_state):
    """A loss that does not depend on the rows gives every minibatch the full-batch gradient, so
    the minibatch sampler's fused update (noise folded in, per-tensor gradient, lent thread)
    must retrace the full-batch sampler's chains, noise for noise."""
    if large_state:
        monkeypatch.setattr(sgld, "LARGE_STATE_NUMBERS", 0)
        torch.set_num_threads(2)   # the module's fixture restores the count afterwards
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 3, generator=g, dtype=torch.float64)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.zeros(40, 3, dtype=torch.float64)

    def forward(params, x):   # the same outputs for every row
        flat = params if isinstance(params, torch.Tensor) else torch.cat([params["a"], params["b"]])
        return (flat @ M).expand(len(x), 3)

    center = torch.randn(6, generator=g, dtype=torch.float64)
    post = sgld.LocalPosterior(forward, mse, X, y, center, NBETA, GAMMA,
                               param_shapes={"a": torch.Size([4]), "b": torch.Size([2])})
    kwargs = dict(step_size=0.05, chains=3, draws=30, seed=2, keep_samples=True)
    full = sgld.sample(post, **kwargs)
    minibatch = sgld.sample(post, batch_size=8, **kwargs)
    torch.testing.assert_close(minibatch.samples, full.samples, rtol=1e-10, atol=1e-12)
    # A minibatch gradient is the state's before the step, the full-batch one the state's after it.
    torch.testing.assert_close(minibatch.grad_norm_sq[:, 1:], full.grad_norm_sq[:, :-1], rtol=1e-10, atol=1e-12)
    at_center = (NBETA * post.grad_at_centers()[0]).square().sum()
    torch.testing.assert_close(minibatch.grad_norm_sq[:, 0], at_center.expand(3), rtol=1e-10, atol=1e-12)


def test_llc_of_quadratic_from_mala_chains_is_half_the_sum_of_tempered_eigenvalue_ratios():
    post, H, _ = quadratic_posterior()
    h = torch.linalg.eigvalsh(H)
    # λ = ½ Σ nβh_i/(nβh_i + γ) = ½(20/21 + 10/11 + 5/6 + 2/3 + 1/2 + 1/3) = 2.0974
    truth = 0.5 * float((NBETA * h / (NBETA * h + GAMMA)).sum())
    assert truth == pytest.approx(0.5 * (20 / 21 + 10 / 11 + 5 / 6 + 2 / 3 + 1 / 2 + 1 / 3), rel=1e-12)
    trace = sgld.sample(post, step_size=0.08, chains=128, draws=150, sampler="mala", seed=5)
    per_chain = sgld.llc_per_chain(trace, burn_in=50)
    estimate, stderr = float(per_chain.mean()), float(per_chain.std()) / math.sqrt(128)
    assert abs(estimate - truth) < 4 * stderr
    assert 4 * stderr < 0.5 * (len(h) / 2 - truth)     # resolves the γ-effect: d/2 = 3 is rejected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chains_on_cuda_sample_the_same_posterior():
    post, H, _ = quadratic_posterior(device="cuda")
    h = torch.linalg.eigvalsh(H)
    truth = 0.5 * float((NBETA * h / (NBETA * h + GAMMA)).sum())
    trace = sgld.sample(post, step_size=0.08, chains=128, draws=150, sampler="mala", seed=5)
    per_chain = sgld.llc_per_chain(trace, burn_in=50)
    assert abs(float(per_chain.mean()) - truth) < 4 * float(per_chain.std()) / math.sqrt(128)


def test_chains_draw_independent_noise():
    post, _, _ = quadratic_posterior()
    trace = sgld.sample(post, step_size=0.01, chains=2, draws=300, seed=6, keep_samples=True)
    steps = torch.diff(trace.samples, dim=1)            # dominated by √ε·ξ
    a, b = steps[0].reshape(-1), steps[1].reshape(-1)
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(correlation) < 4 / math.sqrt(len(a))


def test_same_seed_gives_bit_identical_chains():
    post, _, _ = quadratic_posterior()
    runs = [sgld.sample(post, step_size=0.02, chains=3, draws=50, batch_size=16, seed=7) for _ in range(2)]
    assert torch.equal(runs[0].loss, runs[1].loss) and torch.equal(runs[0].distance, runs[1].distance)
    other = sgld.sample(post, step_size=0.02, chains=3, draws=50, batch_size=16, seed=8)
    assert not torch.equal(runs[0].loss, other.loss)


@pytest.mark.parametrize("sampler", ["sgld", "mala"])
def test_noise_drawn_ahead_on_a_helper_thread_is_the_noise_drawn_in_line(monkeypatch, sampler):
    post, _, _ = quadratic_posterior()
    batch = 16 if sampler == "sgld" else None
    runs = []
    for prefetch in (True, False):
        monkeypatch.setattr(sgld, "PREFETCH_NOISE", prefetch)
        runs.append(sgld.sample(post, step_size=0.02, chains=3, draws=40, thin=2, batch_size=batch, seed=[5],
                                sampler=sampler, keep_samples=True))
    assert torch.equal(runs[0].samples, runs[1].samples) and torch.equal(runs[0].loss, runs[1].loss)


def small_mlp_posterior(param_shapes: bool):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.tanh(X[:, :1]) + 0.1 * torch.randn(64, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    ctx = make_context(make_mlp(**{"in": 5, "hidden": [7], "out": 1}).double(), regression_data(X, y), mse)
    shapes = dict(zip(ctx.param_names, ctx.param_shapes)) if param_shapes else None
    return sgld.LocalPosterior(ctx.forward, ctx.loss_fn, ctx.data.X_train, ctx.data.y_train, ctx.flat_params,
                               NBETA, GAMMA, param_shapes=shapes)


@pytest.mark.parametrize("localization", [GAMMA, 0.0])
def test_gradient_per_parameter_tensor_gives_the_same_chains_as_the_flat_gradient(monkeypatch, localization):
    monkeypatch.setattr(sgld, "LARGE_STATE_NUMBERS", 0)   # every state counts as large
    runs = []
    for shapes in (True, False):
        post = small_mlp_posterior(shapes)
        post.localization = localization
        runs.append(sgld.sample(post, step_size=1e-3, chains=4, draws=30, batch_size=8, seed=3, keep_samples=True,
                                draw_loss="minibatch"))
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert torch.equal(runs[0].loss, runs[1].loss) and torch.equal(runs[0].grad_norm_sq, runs[1].grad_norm_sq)
    per_tensor, flat = small_mlp_posterior(True), small_mlp_posterior(False)
    w = per_tensor.center + 0.1 * torch.randn(3, per_tensor.d, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64)
    pieces = per_tensor.loss_and_grad(w, per_tensor=True)[1]
    assert [p.shape[1] for p in pieces] == [35, 7, 7, 1]
    assert torch.equal(torch.cat(pieces, dim=1), flat.loss_and_grad(w)[1])


def test_a_draw_measured_on_the_side_is_the_draw_measured_in_line(monkeypatch):
    monkeypatch.setattr(sgld, "LARGE_STATE_NUMBERS", 0)
    runs = []
    for alongside in (True, False):
        monkeypatch.setattr(sgld, "MEASURE_ALONGSIDE", alongside)
        runs.append(sgld.sample(small_mlp_posterior(True), step_size=1e-3, chains=4, draws=20, thin=2, batch_size=8,
                                seed=1, draw_loss="minibatch"))
    for name in ("loss", "distance", "grad_norm_sq"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    assert torch.all(runs[0].distance > 0) and torch.all(runs[0].grad_norm_sq > 0)


@pytest.mark.parametrize("batch_size, draw_loss, lent", [(8, "minibatch", True), (8, "full", False),
                                                       (40, "minibatch", False), (None, "full", False)])
def test_small_minibatch_steps_lend_an_intra_op_thread_to_the_noise_thread_and_give_it_back(
        monkeypatch, batch_size, draw_loss, lent):
    monkeypatch.setattr(sgld, "LARGE_STATE_NUMBERS", 0)
    torch.set_num_threads(2)   # the module's fixture restores the count afterwards
    seen = []

    class Recorder:
        def advance(self, n=1):
            seen.append(torch.get_num_threads())

    sgld.sample(small_mlp_posterior(True), step_size=1e-3, chains=4, draws=5, batch_size=batch_size, seed=0,
                draw_loss=draw_loss, progress=Recorder())
    assert seen == [1 if lent else 2] * 5
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(sgld, "PREFETCH_NOISE", False)   # drawn in line: no thread to lend to
    seen.clear()
    sgld.sample(small_mlp_posterior(True), step_size=1e-3, chains=4, draws=5, batch_size=8, seed=0,
                draw_loss="minibatch", progress=Recorder())
    assert seen == [2] * 5


def test_chunked_and_minibatch_gradients_equal_the_full_batch_gradient(monkeypatch):
    post, _, _ = quadratic_posterior(n=60)
    w = post.center + 0.1 * torch.randn(5, post.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grad = post.loss_and_grad(w)
    every_row = torch.arange(post.n).expand(5, post.n)
    loss_rows, grad_rows = post.loss_and_grad(w, every_row)
    monkeypatch.setattr(sgld, "CHAIN_ROWS_PER_CHUNK", 5 * 7)   # 7 rows per chunk, a ragged last chunk
    loss_chunked, grad_chunked = post.loss_and_grad(w)
    for other_loss, other_grad in [(loss_rows, grad_rows), (loss_chunked, grad_chunked)]:
        torch.testing.assert_close(other_loss, loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(other_grad, grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(post.loss(w), loss, rtol=1e-12, atol=1e-14)


def test_chain_leaving_the_energy_bound_is_flagged_parked_and_masked():
    post, _, _ = quadratic_posterior()
    init = post.center.expand(4, post.d).clone()
    init[2] += 1e3                                      # nβ·(L − L*) ≈ 10·½·δᵀHδ ≫ 100·d
    trace = sgld.sample(post, step_size=0.01, chains=4, draws=20, seed=9, init=init)
    assert trace.diverged.tolist() == [False, False, True, False]
    assert trace.diverged_at.tolist() == [-1, -1, 0, -1]
    assert torch.isnan(trace.loss[2]).all() and torch.isfinite(trace.loss[[0, 1, 3]]).all()
    assert torch.isnan(sgld.llc_per_chain(trace, 5)[2])


def test_a_step_beyond_the_stability_limit_diverges_every_chain():
    post, H, _ = quadratic_posterior()
    p_max = NBETA * float(torch.linalg.eigvalsh(H)[-1]) + GAMMA
    trace = sgld.sample(post, step_size=8 / p_max, chains=4, draws=200, seed=10)   # |1 − εp/2| = 3
    assert trace.diverged.all()


def test_calibration_picks_the_largest_grid_step_reaching_the_target_acceptance():
    post, H, _ = quadratic_posterior()
    h_max = float(torch.linalg.eigvalsh(H)[-1])
    cal = sgld.calibrate_step_size(post, top_eigenvalue=h_max, sampler="sgld", chains=4, seed=11,
                                   target_acceptance=0.95, grid_size=10)
    p_max = NBETA * h_max + GAMMA
    assert cal.grid[0] == pytest.approx(2 / p_max, rel=1e-6) and cal.grid[1] == pytest.approx(cal.grid[0] / 2)
    k = next(j for j in range(10) if cal.acceptance[j] >= 0.95 and cal.diverged_fraction[j] == 0)
    assert all(cal.acceptance[j] < 0.95 or cal.diverged_fraction[j] > 0 for j in range(k))
    # Interpolated between grid point k and the next larger one, where 1 − acceptance = 0.05:
    # log(1 − a) is linear in log ε between them.
    lo, hi = math.log(1 - cal.acceptance[k]), math.log(1 - cal.acceptance[k - 1])
    t = math.log(cal.step_size / cal.grid[k]) / math.log(2)
    assert 0 <= t <= 1 and lo + t * (hi - lo) == pytest.approx(math.log(0.05))
    # Acceptance rises as the step shrinks (up to the noise of short chains).
    assert cal.acceptance[-1] > 0.999 and cal.acceptance[0] < cal.acceptance[k]


def test_split_rhat_of_chains_from_one_distribution_is_one():
    draws = np.random.default_rng(0).standard_normal((4, 2000))
    assert abs(split_rhat(draws) - 1) < 0.01
    assert abs(split_rhat(draws, rank_normalize=False) - 1) < 0.01


def test_split_rhat_flags_chains_stuck_at_different_levels_or_trending():
    rng = np.random.default_rng(1)
    shifted = rng.standard_normal((4, 500)) + np.array([[0.0], [0.0], [0.0], [2.0]])
    trending = rng.standard_normal((4, 500)) + np.linspace(0, 3, 500)   # caught by the split
    assert split_rhat(shifted) > 1.1 and split_rhat(trending) > 1.1


def test_ess_of_an_ar1_chain_is_n_times_one_minus_phi_over_one_plus_phi():
    rng = np.random.default_rng(2)
    phi, chains, n = 0.8, 4, 20000
    x = np.zeros((chains, n))
    noise = rng.standard_normal((chains, n))
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    truth = chains * n * (1 - phi) / (1 + phi)          # 80000 · 0.2/1.8 = 8889
    # Geyer's estimator has a relative sd of ~ sqrt(2τ·2/(m·n)) ≈ 3% here; 4 sd:
    for rank_normalize in (True, False):
        assert effective_sample_size(x, rank_normalize) == pytest.approx(truth, rel=0.12)


def test_ess_of_independent_draws_is_the_number_of_draws():
    draws = np.random.default_rng(3).standard_normal((4, 2000))
    assert effective_sample_size(draws, rank_normalize=False) == pytest.approx(8000, rel=0.1)


def test_chains_of_a_cell_do_not_depend_on_the_cells_sampled_with_it():
    post, _, _ = quadratic_posterior()
    other = post.center + 0.05                          # a second cell: same data, another w*
    ctx_forward = make_context(make_mlp(**{"in": post.d, "hidden": [], "out": 1, "bias": False}).double(),
                               regression_data(post.X, post.y), mse).forward
    alone = sgld.LocalPosterior(ctx_forward, mse, post.X, post.y, post.center, NBETA, GAMMA)
    pair = sgld.LocalPosterior(ctx_forward, mse, post.X, post.y, torch.stack([other, post.center]), NBETA, GAMMA)
    for kwargs in ({"sampler": "mala", "step_size": 0.05}, {"sampler": "sgld", "step_size": 0.02, "batch_size": 16}):
        single = sgld.sample(alone, chains=3, draws=40, seed=21, **kwargs)
        both = sgld.sample(pair, chains=3, draws=40, seed=[20, 21],
                           **{**kwargs, "step_size": torch.tensor([0.5, 1.0], dtype=torch.float64) * kwargs["step_size"]})
        second = both.cell(1, 3)
        torch.testing.assert_close(second.loss, single.loss, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(second.distance, single.distance, rtol=1e-10, atol=1e-13)
        assert second.step_size.tolist() == [kwargs["step_size"]] * 3
        assert torch.equal(second.loss_at_center, single.loss_at_center)
        assert not torch.allclose(both.cell(0, 3).loss, single.loss)
