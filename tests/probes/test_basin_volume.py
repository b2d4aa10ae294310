"""Truth tests of the ``basin_volume`` probe: quadratic losses with known spectra, a loss flatter
than its quadratic model, and bad input.

The quadratic losses are linear regressions L(w) = (1/N)‖Xw − y‖² with y = Xw*, so
L(w) − L(w*) = ½ δᵀHδ exactly, H = (2/N)XᵀX, and the sublevel set {L − L(w*) ≤ ε} is the
ellipsoid with semi-axes a_i = √(2ε/λ_i) along H's eigenvectors. Choosing N = d rows
X = √(N/2)·diag(√λ)·Qᵀ makes H = Q diag(λ) Qᵀ for any λ we like.
"""

import math

import numpy as np
import pytest
import torch

from basinprobe.probes.basin_volume import BasinVolume
from basinprobe.registry import ProbeError
from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.testing import make_context, regression_data

F64 = torch.float64


def log_ball(d):
    """log V_d(1) = (d/2) log π − log Γ(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def linear_model(w):
    model = make_mlp(**{"in": len(w), "hidden": [], "out": 1, "bias": False})
    with torch.no_grad():
        model[0].weight.copy_(torch.as_tensor(w, dtype=F64)[None])
    return model


def quadratic_context(eigenvalues, w_star, seed=0, loss_fn=mse, offset=None):
    """The regression whose loss is ½ (w − w*)ᵀ Q diag(λ) Qᵀ (w − w*) (+ L(w*) = 0)."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    d = len(lam)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    X = math.sqrt(d / 2) * torch.diag(lam.sqrt()) @ Q.T
    w_star = torch.as_tensor(w_star, dtype=F64)
    y = X @ w_star if offset is None else X @ w_star + offset
    return make_context(linear_model(w_star), regression_data(X, y), loss_fn, seed=seed)


def run(ctx, **params):
    probe = BasinVolume()
    return probe.run(ctx, probe.resolve(params))


W_STAR = [3.0, -2.0, 1.0, 2.5, -1.5, 2.0]


def test_quadratic_log_volume_of_an_ellipsoid_matches_the_closed_form_with_both_estimators():
    # All semi-axes a_i = √(2ε/λ_i) ≤ √(0.2/0.5) = 0.63 lie inside the ball (R = ‖w*‖ = 5.6), so
    # log V = log V_d(1) + (d/2) log 2ε − ½ Σ log λ_i, with no cap.
    lam = [0.5, 0.8, 1.0, 2.0, 3.0, 4.0]
    eps, d = 0.1, 6
    truth = log_ball(d) + 0.5 * d * math.log(2 * eps) - 0.5 * sum(map(math.log, lam))
    ds = run(quadratic_context(lam, W_STAR), epsilon=eps, directions=2000)
    assert float(ds.radius) == pytest.approx(math.sqrt(sum(w * w for w in W_STAR)))
    hess = ds.log_volume.sel(estimator="hessian")
    mc, mc_se = ds.log_volume.sel(estimator="monte_carlo"), ds.log_volume_stderr.sel(estimator="monte_carlo")
    assert float(hess) == pytest.approx(truth, rel=1e-10)
    assert float(ds.log_volume_stderr.sel(estimator="hessian")) == 0.0
    assert 0 < float(mc_se) < 0.1
    assert abs(float(mc) - truth) < 3 * float(mc_se)
    assert int(ds.effective_dim) == d
    assert ds.attrs["near_minimum"]


def test_ray_radii_quantiles_of_an_isotropic_quadratic_are_all_the_semi_axis():
    # H = λI: every ray leaves the level set at r = √(2ε/λ) = √(2·0.02/2) = 0.1414.
    ds = run(quadratic_context([2.0] * 5, W_STAR[:5]), epsilon=[0.02, 0.08], directions=64,
             estimators=["monte_carlo"])
    np.testing.assert_allclose(ds.radius_quantiles.sel(epsilon=0.02).values, math.sqrt(0.02), rtol=1e-8)
    np.testing.assert_allclose(ds.radius_quantiles.sel(epsilon=0.08).values, math.sqrt(0.08), rtol=1e-8)
    # ... so the Monte-Carlo estimate is the ball's volume exactly: log V_5 + 5 log r
    expected = [log_ball(5) + 5 * math.log(math.sqrt(e)) for e in (0.02, 0.08)]
    np.testing.assert_allclose(ds.log_volume.sel(estimator="monte_carlo").values, expected, rtol=1e-7)
    assert ds.log_volume.dims == ("estimator", "epsilon")
    assert ds.radius_quantiles.dims == ("epsilon", "q")


def test_with_zero_eigenvalues_both_estimators_cap_the_flat_directions_at_R():
    # d = 4: two stiff directions with λ = 2 (semi-axis a = √(2ε/λ) = 0.3 for ε = 0.09) and two
    # exactly flat ones, in the ball R = 1. The set is {|x_s| ≤ a} ∩ {|x| ≤ R}; with ρ = |x_s|
    #   V = V_2(1)·∫_0^a 2πρ (R² − ρ²) dρ = π²a²(R² − a²/2)      (exact)
    # The quadratic estimate takes (stiff disc) x (flat R-disc): π a² · π R² = π²a²R², i.e.
    # log V_hess − log V = −log(1 − a²/2R²) = 0.046. (One 4-d ellipsoid with semi-axes (a, a, R, R)
    # would give V_4(1) a²R² = π²a²R²/2: off by log 2.)
    a, R = 0.3, 1.0
    exact = math.log(math.pi**2 * a * a * (R * R - a * a / 2))
    ds = run(quadratic_context([2.0, 2.0, 0.0, 0.0], [0.5, -0.5, 0.5, 0.5], seed=3), epsilon=0.09, radius=R,
             directions=4000)
    hess = float(ds.log_volume.sel(estimator="hessian"))
    mc = float(ds.log_volume.sel(estimator="monte_carlo"))
    mc_se = float(ds.log_volume_stderr.sel(estimator="monte_carlo"))
    assert hess == pytest.approx(math.log(math.pi**2 * a * a * R * R), rel=1e-9)
    assert hess - exact == pytest.approx(-math.log(1 - a * a / (2 * R * R)), rel=1e-6)
    assert mc_se < 0.06
    assert abs(mc - exact) < 3 * mc_se
    assert float(ds.effective_dim) == 2
    assert 0 < float(ds.capped_fraction) < 1  # rays close to the flat plane reach R
    assert float(ds.radius_quantiles.max()) == pytest.approx(R)


def test_slq_quadratic_estimate_matches_the_closed_form_within_its_stderr():
    lam = [0.5, 0.8, 1.0, 2.0, 3.0, 4.0]
    eps, d = 0.1, 6
    truth = log_ball(d) + 0.5 * d * math.log(2 * eps) - 0.5 * sum(map(math.log, lam))
    ds = run(quadratic_context(lam, W_STAR, seed=1), epsilon=eps, estimators=["hessian"], spectrum="slq",
             probes=16)
    value, se = float(ds.log_volume.sel(estimator="hessian")), float(ds.log_volume_stderr.sel(estimator="hessian"))
    assert se > 0
    assert abs(value - truth) < 3 * se
    assert ds.attrs["spectrum"] == "slq"


def test_loss_flatter_than_its_quadratic_model_has_a_larger_monte_carlo_volume():
    # ℓ(z, y) = mean log cosh(z − y): the same Hessian at the minimum as ½ mean (z − y)², but
    # log cosh s < s²/2 for s ≠ 0, so every ray goes further than in the quadratic model:
    # along one eigen-direction log cosh s = ε gives s = arccosh(e^ε) (1.66 for ε = 1) > √(2ε) (1.41).
    def log_cosh(outputs, targets):
        return torch.log(torch.cosh(outputs - targets.reshape(outputs.shape))).mean()

    lam = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    # mean log cosh has Hessian (1/N) Xᵀ X (half of MSE's), so scale X to keep H = Q diag(λ) Qᵀ
    ctx = quadratic_context([2 * v for v in lam], W_STAR, seed=2, loss_fn=log_cosh)
    eps, d = 0.5, 6
    quadratic = log_ball(d) + 0.5 * d * math.log(2 * eps) - 0.5 * sum(map(math.log, lam))
    ds = run(ctx, epsilon=eps, radius=50.0, directions=1000)
    hess = float(ds.log_volume.sel(estimator="hessian"))
    mc = float(ds.log_volume.sel(estimator="monte_carlo"))
    mc_se = float(ds.log_volume_stderr.sel(estimator="monte_carlo"))
    assert hess == pytest.approx(quadratic, rel=1e-8)
    assert mc - 3 * mc_se > hess + 0.2


def test_dense_and_slq_hessian_estimates_agree_on_a_small_mlp():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = make_mlp(**{"in": 3, "hidden": [6], "out": 1, "activation": "tanh"})
    ctx = make_context(model, regression_data(X, torch.sin(X.sum(1))), mse)
    dense = run(ctx, epsilon=0.05, estimators=["hessian"], spectrum="dense")
    slq = run(ctx, epsilon=0.05, estimators=["hessian"], spectrum="slq", probes=16)
    value, se = float(slq.log_volume.squeeze()), float(slq.log_volume_stderr.squeeze())
    assert abs(value - float(dense.log_volume.squeeze())) < 3 * se + 1e-9
    assert abs(float(slq.effective_dim) - float(dense.effective_dim)) < 3 * float(slq.effective_dim_stderr) + 1e-9


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params, match", [({"epsilon": 0.0}, "epsilon"), ({"epsilon": [0.1, -1.0]}, "epsilon"),
                                           ({"epsilon": math.nan}, "epsilon"), ({"radius": 0.0}, "radius"),
                                           ({"radius": -1.0}, "radius")])
def test_non_positive_epsilon_or_radius_is_refused(params, match):
    with pytest.raises(ProbeError, match=match):
        run(quadratic_context([1.0, 2.0], [1.0, 1.0]), **params)


def test_schema_rejects_non_positive_epsilon_and_radius():
    import jsonschema

    validator = jsonschema.Draft202012Validator(BasinVolume.schema)
    for bad in ({"epsilon": 0}, {"epsilon": [-0.1]}, {"radius": 0}, {"estimators": ["method"]}):
        assert list(validator.iter_errors(bad)), bad
    assert not list(validator.iter_errors({"epsilon": [0.01, 0.1], "radius": 2.0}))


def test_a_point_away_from_the_minimum_is_flagged_in_attrs_with_a_warning():
    # y = X w* + 1: w* is far from the least-squares solution, so the gradient step is large.
    ctx = quadratic_context([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], offset=1.0)
    with pytest.warns(RuntimeWarning, match="not near a minimum"):
        ds = run(ctx, epsilon=0.01, directions=32)
    assert ds.attrs["near_minimum"] is False
    assert float(ds.gradient_norm) > 0.1
    assert any("not near a minimum" in w for w in ctx.warnings)


def test_all_zero_parameters_need_an_explicit_radius():
    with pytest.raises(ProbeError, match="radius"):
        run(quadratic_context([1.0, 2.0], [0.0, 0.0]))


def test_non_finite_parameters_fail_with_a_message():
    ctx = quadratic_context([1.0, 2.0], [1.0, math.nan])
    with pytest.raises(ProbeError, match="not finite"):
        run(ctx)


def test_all_zero_parameters_with_radius_given_measure_the_ball_around_the_origin():
    ds = run(quadratic_context([2.0, 2.0], [0.0, 0.0]), epsilon=0.01, radius=1.0, directions=16)
    # isotropic: r = √(2·0.01/2) = 0.1, V = π r²
    np.testing.assert_allclose(ds.log_volume.values, math.log(math.pi * 0.01), rtol=1e-7)


def test_a_monte_carlo_estimate_carried_by_few_directions_is_flagged():
    # d = 30 with λ spread over four decades: r(u)^d varies over many orders of magnitude, so
    # a handful of the 64 directions carry E[r^d]; the probe says so instead of trusting the stderr.
    lam = torch.logspace(-2, 2, 30, dtype=F64).tolist()
    ctx = quadratic_context(lam, [1.0] * 30, seed=4)
    with pytest.warns(RuntimeWarning, match="effective sample"):
        ds = run(ctx, epsilon=0.01, radius=100.0, directions=64)
    assert float(ds.effective_sample_size) < 10
