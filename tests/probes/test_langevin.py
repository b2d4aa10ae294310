"""Truth tests of the ``langevin`` probe: the local learning coefficient against closed forms.

Each estimate is checked against its truth within the tolerance the issue sets
(10% regular, 15% singular), and the reported standard error must be small
enough for that check to be able to fail (3·stderr below the tolerance), or,
where the sampler is exact, within a few reported standard errors.
"""

from __future__ import annotations

import functools
import math
import warnings

import jsonschema
import numpy as np
import pytest
import torch

from basinprobe.probes.langevin import Langevin
from basinprobe.registry import ProbeError
from basinprobe.runtime.execute import check_result
from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.testing import fit, make_context, regression_data


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def run(ctx, **params):
    probe = Langevin()
    return probe.run(ctx, probe.resolve(params))


def run_with_warnings(ctx, **params):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = run(ctx, **params)
    return ds, [str(w.message) for w in caught]


def linear_regression(n: int = 500, d_in: int = 9, seed: int = 0, at_minimum: bool = True):
    """y = x·a + b + noise with standard normal x; the model sits at the least-squares solution."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d_in, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": d_in, "hidden": [], "out": 1}).double()
    if at_minimum:
        A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
        with torch.no_grad():
            model[0].weight.copy_(solution[:d_in][None])
            model[0].bias.copy_(solution[d_in:])
    return make_context(model, regression_data(X, y), mse)


def aoyagi_watanabe(M: int, H: int, N: int, r: int) -> float:
    """RLCT of reduced-rank regression y = B·A·x, A: H×M, B: N×H, true rank r
    (Aoyagi & Watanabe 2005, "Stochastic complexities of reduced rank regression in
    Bayesian estimation", Neural Networks 18(7), Main Theorem):

    Case 1  N + r ≤ M + H,  M + r ≤ N + H,  H + r ≤ M + N:
              λ = [2(H + r)(M + N) − (M − N)² − (H + r)²] / 8        if M + H + N + r is even
              λ = [2(H + r)(M + N) − (M − N)² − (H + r)² + 1] / 8    if it is odd
    Case 2  M + H < N + r:   λ = [HM − Hr + Nr] / 2
    Case 3  N + H < M + r:   λ = [HN − Hr + Mr] / 2
    Case 4  M + N < H + r:   λ = MN / 2
    """
    if N + r <= M + H and M + r <= N + H and H + r <= M + N:
        s = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
        return (s if (M + H + N + r) % 2 == 0 else s + 1) / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return M * N / 2


def test_aoyagi_watanabe_formula_by_hand():
    # (4,2,3,1): case 1, sum 10 even: [2·3·7 − 1 − 9]/8 = 32/8 = 4
    assert aoyagi_watanabe(4, 2, 3, 1) == 4.0
    # (2,2,5,1): M + H = 4 < N + r = 6, case 2: [4 − 2 + 5]/2 = 3.5
    assert aoyagi_watanabe(2, 2, 5, 1) == 3.5
    # Full rank r = H ≤ min(M, N) is regular: λ = (H(M + N) − H²)/2 = dim of rank-H matrices / 2
    assert aoyagi_watanabe(5, 2, 5, 2) == (2 * 10 - 4) / 2
    assert aoyagi_watanabe(3, 2, 5, 2) == (2 * 8 - 4) / 2


def reduced_rank_regression(M: int, H: int, N: int, r: int, n: int = 500, seed: int = 0):
    """A two-layer linear network x ↦ B·A·x trained by gradient descent from a small
    initialization on data from a rank-r teacher (singular values 1..2, noise 0.1)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, M, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(N, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(M, r, generator=g, dtype=torch.float64))[0]
    teacher = U @ torch.diag(torch.linspace(1.0, 2.0, r, dtype=torch.float64)) @ V.T
    Y = X @ teacher.T + 0.1 * torch.randn(n, N, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = make_deep_linear([M, H, N]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3000):
        optimizer.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        optimizer.step()
    return make_context(model, regression_data(X, Y), mse, seed=seed)


def test_llc_of_linear_regression_is_half_the_dimension():
    ctx = linear_regression()
    ds = run(ctx)                                   # defaults: 8 chains, 400 draws, step_size auto
    d = ctx.n_params                                # 9 weights + 1 bias
    llc, stderr = float(ds.llc), float(ds.llc_stderr)
    assert abs(llc - d / 2) < 0.10 * d / 2
    assert 3 * stderr < 0.10 * d / 2
    assert ds.diverged.sum() == 0 and float(ds.rhat) < 1.1
    assert bool(ds.mixed) and abs(float(ds.llc_drift)) < 4 * float(ds.llc_drift_stderr) + 0.1 * llc


def test_chains_still_relaxing_from_w_star_are_marked_unmixed_and_warned_about():
    # with no burn-in and a step far below the calibrated one, the chains climb from L(w*) toward
    # their stationary level through the whole run: the second half's llc is higher
    ctx = linear_regression()
    ds, caught = run_with_warnings(ctx, step_size=1e-5, burn_in=0, draws=200)
    # split R-hat sees the trend within the chains; llc_drift says how large it is in llc units
    assert not bool(ds.mixed) and float(ds.rhat) > 1.1 and float(ds.llc_drift) > 2 * float(ds.llc_drift_stderr)
    assert any(w.startswith("R-hat of the loss is") and w.endswith("or a larger step_size than 1e-05") for w in caught)
    long = run(ctx)   # the default calibrated step and burn-in: stationary, and far higher
    assert bool(long.mixed) and float(long.llc) > 4 * float(ds.llc)


def test_llc_of_linear_regression_with_minibatches_or_rmsprop_is_half_the_dimension():
    ctx = linear_regression(seed=1)
    d = ctx.n_params
    for params in ({"batch_size": 100, "chains": 32, "draws": 500}, {"batch_size": 100, "draw_loss": "full"},
                   {"sampler": "sgld_rmsprop", "chains": 16, "draws": 800}):
        ds = run(ctx, **params)
        llc, stderr = float(ds.llc), float(ds.llc_stderr)
        assert abs(llc - d / 2) < 0.10 * d / 2, params
        assert 3 * stderr < 0.10 * d / 2, params


def quadratic_context(n: int = 64):
    """Linear model (no bias) at its least-squares minimum with XᵀX/n = R·diag(s)·Rᵀ exactly,
    so L_n(w) − L_n(w*) = ½(w − w*)ᵀH(w − w*) with H = 2XᵀX/n, eigenvalues h = 2s."""
    s = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05, 0.025], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    Z = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0] * math.sqrt(n)
    R = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=torch.float64))[0]
    X = Z @ torch.diag(s.sqrt()) @ R.T
    y = X @ torch.randn(len(s), generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    model = make_mlp(**{"in": len(s), "hidden": [], "out": 1, "bias": False}).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.lstsq(X, y[:, None]).solution.T)
    return make_context(model, regression_data(X, y), mse), 2 * s


def test_llc_of_quadratic_loss_is_half_the_sum_of_tempered_eigenvalue_ratios():
    ctx, h = quadratic_context()
    nbeta, gamma = 10.0, 1.0
    # λ = ½ Σ nβh_i/(nβh_i + γ), nβh = (20, 10, 5, 2, 1, 0.5):
    #   ½(20/21 + 10/11 + 5/6 + 2/3 + 1/2 + 1/3) = 2.0974, well below d/2 = 3
    truth = 0.5 * float((nbeta * h / (nbeta * h + gamma)).sum())
    assert truth == pytest.approx(2.0974, abs=1e-4)
    ds = run(ctx, sampler="mala", chains=32, draws=300, nbeta=nbeta, localization=gamma)
    llc, stderr = float(ds.llc), float(ds.llc_stderr)
    assert abs(llc - truth) < 4 * stderr            # MALA is exact: only sampling error
    assert 4 * stderr < 0.5 * (3 - truth)
    assert float(ds.nbeta) == nbeta
    assert ds.acceptance.dims == ("chain",) and bool(((ds.acceptance > 0.5) & (ds.acceptance <= 1)).all())


@pytest.mark.parametrize("shape, sampler", [((4, 2, 3, 1), "mala"), ((2, 2, 5, 1), "mala"), ((2, 2, 5, 1), "sgld")],
                         ids=["case1-4x2x3-rank1-mala", "case2-2x2x5-rank1-mala", "case2-2x2x5-rank1-sgld"])
def test_llc_of_reduced_rank_regression_matches_aoyagi_watanabe(shape, sampler):
    M, H, N, r = shape
    ctx = reduced_rank_regression(M, H, N, r)
    truth, half_dim = aoyagi_watanabe(M, H, N, r), H * (M + N) / 2     # 4.0 vs 7.0; 3.5 vs 7.0
    # Singular directions mix slowly (their extent is set by γ), hence 1000 draws.
    ds = run(ctx, sampler=sampler, chains=16, draws=1000)
    llc, stderr = float(ds.llc), float(ds.llc_stderr)
    assert abs(llc - truth) < 0.15 * truth
    assert 3 * stderr < 0.15 * truth
    assert llc + 4 * stderr < 0.75 * half_dim        # clearly singular: far below the regular d/2


def test_huge_step_size_fails_the_cell_with_a_message_naming_the_step():
    ctx = linear_regression()
    with pytest.raises(ProbeError, match=r"all 4 chains diverged at step_size 10.*smaller step_size"):
        run(ctx, chains=4, draws=20, step_size=10.0)


def hyperbola_context(n: int = 200):
    """x ↦ b·a·x fitted to y ≈ x: the minima a·b = c form a hyperbola whose normal curvature
    2(a² + b²)E[x²] grows as chains diffuse along it, so a step stable at w* = (√c, √c)
    becomes unstable for the chains that wander far."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = X + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    c = float((X * y).sum() / (X * X).sum())
    model = make_deep_linear([1, 1, 1]).double()
    with torch.no_grad():
        model[0].weight.fill_(math.sqrt(c))
        model[2].weight.fill_(math.sqrt(c))
    return make_context(model, regression_data(X, y), mse)


def test_chains_that_diverge_are_flagged_excluded_and_warned_about():
    ctx = hyperbola_context()
    nbeta = 200 / math.log(200)
    ds, messages = run_with_warnings(ctx, chains=16, draws=300, step_size=0.9 / nbeta, localization=0.1)
    diverged = ds.diverged.values
    assert 0 < diverged.sum() < 16
    assert np.isfinite(float(ds.llc)) and np.isfinite(float(ds.llc_stderr))
    assert np.isnan(ds.llc_chain.values[diverged]).all() and np.isfinite(ds.llc_chain.values[~diverged]).all()
    assert float(ds.llc) == pytest.approx(float(ds.llc_chain.values[~diverged].mean()))
    assert np.isnan(ds.loss_trace.values[diverged, -1]).all()
    assert any(f"{diverged.sum()} of 16 chains diverged" in m and "smaller step_size" in m for m in messages)
    check_result(ds, "llc", [])                      # the runtime accepts the NaN entries: each says what it means


# Short chains keep these tests quick; they are not meant to mix.
@pytest.mark.filterwarnings("ignore:R-hat of the loss")
def test_same_seed_gives_the_same_result_bit_for_bit():
    ctx = linear_regression(n=200)
    results = [run(make_context(ctx.model, ctx.data, mse, seed=seed), chains=4, draws=60, batch_size=50)
               for seed in (0, 0, 1)]
    for name in ("llc", "llc_stderr", "loss_trace", "distance_trace", "step_size", "calibration_acceptance"):
        assert np.array_equal(results[0][name].values, results[1][name].values), name
    assert not np.array_equal(results[0].loss_trace.values, results[2].loss_trace.values)


@pytest.mark.filterwarnings("ignore:R-hat of the loss")
def test_stored_variables_have_their_contracted_dims_and_attrs():
    ds = run(linear_regression(n=200), chains=3, draws=40, burn_in=10, thin=2)
    dims = {
        "llc": (), "llc_stderr": (), "llc_chain": ("chain",), "loss_trace": ("chain", "draw"),
        "distance_trace": ("chain", "draw"), "rhat": (), "ess": (), "step_size": (), "nbeta": (),
        "diverged": ("chain",), "acceptance": ("chain",), "loss_at_wstar": (), "grad_norm_at_wstar": (),
        "llc_drift": (), "llc_drift_stderr": (), "mixed": (),
        "calibration_step_size": ("calibration",), "calibration_acceptance": ("calibration",),
    }
    for name, expected in dims.items():
        assert ds[name].dims == expected, name
        assert ds[name].attrs["description"], name
    assert ds.loss_trace.shape == (3, 40) and ds.loss_trace.attrs["burn_in"] == 10
    assert float(ds.nbeta) == pytest.approx(200 / math.log(200))
    assert ds.attrs["step_size_method"] == "auto" and ds.attrs["sampler"] == "sgld"
    # The loss at w* is the full training loss, the floor the excess energy is measured from.
    assert float(ds.loss_at_wstar) == pytest.approx(float(linear_regression(n=200).loss()), rel=1e-12)
    # The step lies between the largest grid step that reached the target and the next larger one.
    ok = (ds.calibration_acceptance >= ds.attrs["target_acceptance"]) & (ds.calibration_diverged == 0)
    k = int(np.argmax(ok.values))
    assert ds.calibration_step_size[k] <= ds.step_size <= ds.calibration_step_size[max(k - 1, 0)]
    for value in ds.attrs.values():
        assert isinstance(value, (str, int, float, bool, list))


def test_a_model_far_from_a_minimum_warns_and_reports_its_gradient_norm():
    ctx = linear_regression(n=200, at_minimum=False)
    ds, messages = run_with_warnings(ctx, chains=4, draws=40, step_size=1e-4)
    flat = ctx.flat_params.clone().requires_grad_()
    expected = float(torch.autograd.grad(ctx.loss(flat), flat)[0].norm())
    assert ds.attrs["grad_norm_at_wstar"] == pytest.approx(expected, rel=1e-10) and expected > 0.1
    assert float(ds.grad_norm_at_wstar) == ds.attrs["grad_norm_at_wstar"]
    assert any("far from a local minimum" in m for m in messages)


SCHEMA_REJECTS = [
    {"chains": 0}, {"chains": -3}, {"draws": 0}, {"step_size": 0}, {"step_size": -0.1}, {"nbeta": 0},
    {"nbeta": -1.0}, {"burn_in": -1}, {"thin": 0}, {"localization": -1}, {"batch_size": 0},
    {"sampler": "hmc"}, {"target_acceptance": 1.0}, {"steps": 10},
]


@pytest.mark.parametrize("params", SCHEMA_REJECTS, ids=[str(p) for p in SCHEMA_REJECTS])
def test_schema_rejects_non_positive_and_unknown_parameters(params):
    validator = jsonschema.Draft202012Validator(Langevin.schema)
    assert not validator.is_valid(params)
    jsonschema.Draft7Validator.check_schema(Langevin.schema)


@pytest.mark.parametrize("params, message", [
    ({"draws": 10, "burn_in": 10}, r"burn_in \(10\) must be smaller than draws \(10\)"),
    ({"batch_size": 1000}, r"batch_size 1000 is larger than the training set \(200 examples\)"),
    ({"step_size": float("nan")}, r"step_size must be a positive finite number"),
    ({"nbeta": float("inf")}, r"nbeta must be a positive finite number"),
    ({"sampler": "mala", "batch_size": 50}, r"mala needs full-batch gradients"),
])
def test_bad_input_is_refused_with_what_to_change(params, message):
    with pytest.raises(ProbeError, match=message):
        run(linear_regression(n=200), **params)


@functools.lru_cache(maxsize=None)
def _tanh_network_data_and_minima(seeds: tuple, n: int):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, :1]) * X[:, 1:] + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = make_mlp(**{"in": 2, "hidden": [4], "out": 1, "activation": "tanh"}).double()
        fit(model, X, y, mse, steps=300, lr=0.03)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return X, y, states


def trained_tanh_networks(seeds=(0, 1, 2), n: int = 120):
    """The same small tanh network (2 -> 4 -> 1, 17 parameters) trained from several seeds on one
    data set: the cells of a seed sweep, sharing architecture and data, differing in w*."""
    X, y, states = _tanh_network_data_and_minima(tuple(seeds), n)
    data = regression_data(X, y)
    contexts = []
    for seed, state in zip(seeds, states):
        model = make_mlp(**{"in": 2, "hidden": [4], "out": 1, "activation": "tanh"}).double()
        model.load_state_dict(state)
        contexts.append(make_context(model, data, mse, seed=100 + seed))
    return contexts


@pytest.mark.filterwarnings("ignore:R-hat of the loss")
@pytest.mark.parametrize("params", [
    {"chains": 4, "draws": 60},                                                  # step_size auto: batched calibration
    {"chains": 4, "draws": 60, "step_size": 1e-3, "batch_size": 30},             # own minibatch order per chain
    {"chains": 3, "draws": 40, "sampler": "mala", "step_size": 2e-3},            # own acceptance draws per cell
], ids=["auto-full-batch", "minibatch", "mala"])
def test_batched_cells_give_what_each_cell_gives_alone(params):
    probe = Langevin()
    assert probe.batched
    resolved = probe.resolve(params)
    alone = [probe.run(ctx, resolved) for ctx in trained_tanh_networks()]
    together = probe.run_batched(trained_tanh_networks(), resolved)
    assert len(together) == 3
    for single, batched in zip(alone, together):
        assert set(single.data_vars) == set(batched.data_vars) and single.attrs == batched.attrs
        for name in single.data_vars:
            # Equal up to the reassociation of sums in a gradient batched over 3x more chains.
            np.testing.assert_allclose(batched[name].values, single[name].values, rtol=1e-9, atol=1e-12,
                                       err_msg=name)
    # Different w* and seeds: the cells really differ, so equality is not vacuous.
    assert not np.allclose(together[0].loss_trace.values, together[1].loss_trace.values)


def test_batched_cells_with_different_data_fall_back_to_one_run_per_cell():
    probe = Langevin()
    params = probe.resolve({"chains": 3, "draws": 20, "step_size": 1e-3, "burn_in": 5})
    contexts = [linear_regression(n=100, seed=0), linear_regression(n=100, seed=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together = probe.run_batched(contexts, params)
        alone = [probe.run(ctx, params) for ctx in contexts]
    for single, batched in zip(alone, together):
        assert np.array_equal(single.loss_trace.values, batched.loss_trace.values)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:R-hat of the loss")
def test_compiled_sgld_step_gives_the_eager_result():
    """execution: {compile: true} wraps the vmapped gradient of the SGLD step in torch.compile;
    where the compiler is missing it falls back to eager with a warning. Either way: same chains."""
    probe = Langevin()
    params = probe.resolve({"chains": 3, "draws": 30, "step_size": 1e-3, "batch_size": 40, "burn_in": 5})
    eager = probe.run(trained_tanh_networks(seeds=(0,))[0], params)
    ctx = trained_tanh_networks(seeds=(0,))[0]
    ctx.compile = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = probe.run(ctx, params)
    fell_back = [str(w.message) for w in caught if "sgld step" in str(w.message)]
    assert not fell_back or "running eagerly" in fell_back[0]
    for name in ("llc", "loss_trace", "distance_trace", "llc_chain"):
        np.testing.assert_allclose(compiled[name].values, eager[name].values, rtol=1e-9, atol=1e-12, err_msg=name)


LANGEVIN_SWEEP_SPEC = """
version: 1
name: langevin-seeds
seed: 0
device: cpu
dtype: float64
model: {kind: mlp, with: {in: 3, hidden: [4], out: 1, activation: tanh}}
data: {kind: teacher_student, with: {n: 100, in: 3, out: 1, noise: 0.1}, batch_size: 100}
loss: mse
train: {optimizer: {kind: adam, lr: 0.05}, steps: 100, checkpoints: {at: [100]}}
sweep: {seed: [0, 1, 2]}
probes:
  - {name: llc, probe: langevin, with: {chains: 3, draws: 30, burn_in: 10, step_size: 0.001, batch_size: 20}}
output: out.zarr
"""


@pytest.mark.slow       # mostly the runtime: trains 6 networks and writes two stores
@pytest.mark.filterwarnings("ignore:R-hat of the loss", "ignore:w\\* looks far")
def test_a_seed_sweep_run_with_batch_cells_stores_what_the_cell_by_cell_run_stores(write_spec, tmp_path, monkeypatch):
    from basinprobe.runtime import open_results
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.spec import load_spec

    batch_sizes = []
    run_batched = Langevin.run_batched

    def counting(self, ctxs, params):
        batch_sizes.append(len(ctxs))
        return run_batched(self, ctxs, params)

    monkeypatch.setattr(Langevin, "run_batched", counting)

    plain = load_spec(write_spec(LANGEVIN_SWEEP_SPEC.replace("out.zarr", "plain.zarr"), "plain.yaml"))
    batched = load_spec(write_spec(LANGEVIN_SWEEP_SPEC.replace("out.zarr", "batched.zarr")
                                   + "execution: {batch_cells: true}\n", "batched.yaml"))
    assert run_spec(plain).ok and run_spec(batched).ok
    assert 3 in batch_sizes                      # the three seeds went through one run_batched call
    a, b = open_results(tmp_path / "plain.zarr")["llc"], open_results(tmp_path / "batched.zarr")["llc"]
    assert a["llc"].dims == ("seed", "checkpoint") and a.sizes["seed"] == 3
    for name in ("llc", "llc_stderr", "llc_chain", "loss_trace", "distance_trace", "diverged"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-9, atol=1e-12, err_msg=name)
