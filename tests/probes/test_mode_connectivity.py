"""Truth tests of the ``mode_connectivity`` probe: barriers, weight matching, monotonic
interpolation and layer dropping against closed forms, and a run through a spec.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from basinprobe.probes.mode_connectivity import ModeConnectivity, alphas_of
from basinprobe.registry import ProbeError
from basinprobe.runtime import open_results
from basinprobe.runtime.context import GroupContext, Member
from basinprobe.runtime.execute import check_result, run_spec
from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.spec import SpecError, load_spec
from basinprobe.runtime.substrate import interpolation, permutation
from basinprobe.runtime.testing import fit, make_context, regression_data


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def group(cells: list[tuple[dict, object]], spanned: list[str]) -> GroupContext:
    """A group context over (coordinates, cell context) pairs, as the runtime builds it."""
    members = [Member(coords, coords.get("checkpoint", 0), lambda c=ctx: c) for coords, ctx in cells]
    shared = {d: v for d, v in cells[0][0].items() if d not in spanned}
    return GroupContext(members, shared, spanned, device="cpu", dtype=torch.float64, seed=0)


def run(gctx, **params):
    probe = ModeConnectivity()
    resolved = probe.resolve(params)
    probe.spans(resolved, [*gctx.spanned, *gctx.coords])
    return check_result(probe.run(gctx, resolved), "mc", list(gctx.coords))


def with_params(model: torch.nn.Module, values: list[list[float]]) -> torch.nn.Module:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(torch.tensor(v, dtype=p.dtype).reshape(p.shape))
    return model


@functools.lru_cache(maxsize=None)
def trained_mlp(seed: int = 0):
    """A 4 -> 16 -> 1 tanh network fitted (full-batch Adam, float64) to a tanh teacher (shared: do not modify)."""
    g = torch.Generator().manual_seed(100)
    X = torch.randn(128, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(X @ torch.randn(4, 1, generator=g, dtype=torch.float64)) + 0.05 * torch.randn(128, 1, generator=g,
                                                                                                   dtype=torch.float64)
    torch.manual_seed(seed)
    model = make_mlp(**{"in": 4, "hidden": [16], "out": 1, "activation": "tanh"}).double()
    return fit(model, X, y, mse, steps=300, lr=0.02), regression_data(X, y)


# --- barriers: formulas and closed forms --------------------------------------------------------
def test_barrier_conventions_on_a_known_profile():
    # L = 1, 2.5, 3 at α = 0, ½, 1. Chord at ½: (1 + 3)/2 = 2, so barrier = 2.5 − 2 = 0.5 (the ends give 0);
    # mean of the ends = 2, so barrier_mean = max L − 2 = 3 − 2 = 1.
    assert interpolation.barrier([1.0, 2.5, 3.0], [0.0, 0.5, 1.0]) == pytest.approx(0.5, abs=1e-15)
    assert interpolation.barrier_mean([1.0, 2.5, 3.0], [0.0, 0.5, 1.0]) == pytest.approx(1.0, abs=1e-15)
    # An uneven grid: chord at α = 0.25 is 0.75·1 + 0.25·3 = 1.5; L = 4 there, so barrier = 2.5.
    assert interpolation.barrier([1.0, 4.0, 3.0], [0.0, 0.25, 1.0]) == pytest.approx(2.5, abs=1e-15)
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        interpolation.barrier([1.0, 2.0, 3.0], [0.1, 0.5, 1.0])


def test_max_bump_is_the_largest_rise_along_the_path():
    # From 3 down to 1, up to 2.5 (a rise of 1.5), down to 0, up to 0.5: the largest rise is 1.5.
    assert interpolation.max_bump([3.0, 1.0, 2.5, 0.0, 0.5]) == 1.5
    assert interpolation.max_bump([3.0, 2.0, 2.0, 1.0]) == 0.0


def double_well_pair():
    """f(x) = w₂·w₁·x on x = 1, y = 1 under mse: L = (w₂w₁ − 1)². Both (1, 1) and (−1, −1) fit exactly;
    on the straight path w₁ = w₂ = 2α − 1, so L(α) = ((2α − 1)² − 1)² = 16α²(1 − α)², peaking at L(½) = 1."""
    data = regression_data(torch.ones(1, 1), torch.ones(1))
    a = make_context(with_params(make_deep_linear(widths=[1, 1, 1]), [[1.0], [1.0]]), data, mse)
    b = make_context(with_params(make_deep_linear(widths=[1, 1, 1]), [[-1.0], [-1.0]]), data, mse)
    return a, b


def test_barrier_of_the_double_well_path_is_one():
    a, b = double_well_pair()
    result = run(group([({"seed": 0, "checkpoint": 0}, a), ({"seed": 1, "checkpoint": 0}, b)], ["seed"]),
                 pairs={"sweep": "seed"}, align=["none"], alphas=21)
    alpha = np.linspace(0, 1, 21)
    np.testing.assert_allclose(result["loss_path"].sel(pair="0-1", align="none").values,
                               16 * alpha ** 2 * (1 - alpha) ** 2, rtol=1e-12, atol=1e-15)
    assert float(result["barrier"].sel(pair="0-1", align="none")) == pytest.approx(1.0, rel=1e-12)
    assert float(result["barrier_mean"].sel(pair="0-1", align="none")) == pytest.approx(1.0, rel=1e-12)
    # ‖(1, 1) − (−1, −1)‖² = 8
    assert float(result["permutation_distance"].sel(pair="0-1", align="none")) == pytest.approx(8.0)
    assert result["a"].values.tolist() == [0] and result["b"].values.tolist() == [1]


def test_the_vmapped_path_equals_the_loss_at_each_point():
    _, data = trained_mlp(0)
    torch.manual_seed(0)
    ctx = make_context(make_mlp(**{"in": 4, "hidden": [16], "out": 1, "activation": "tanh"}), data, mse, batch_size=50)
    other = torch.randn(ctx.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alphas = torch.linspace(0, 1, 7, dtype=torch.float64)
    losses, accuracy = interpolation.path_loss_and_accuracy(ctx, ctx.flat_params, other, alphas)
    expected = [float(ctx.loss((1 - a) * ctx.flat_params + a * other)) for a in alphas]
    np.testing.assert_allclose(losses, expected, rtol=1e-12)
    assert accuracy is None


def least_squares():
    """A linear model x -> wᵀx + c on noisy linear data; its mse is a convex quadratic in θ = (w, c)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.1 * torch.randn(64, generator=g,
                                                                                          dtype=torch.float64)
    design = torch.cat([X, torch.ones(64, 1, dtype=torch.float64)], dim=1)
    optimum = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    return regression_data(X, y), optimum


def test_barriers_of_linear_regression_are_those_of_a_convex_loss():
    data, optimum = least_squares()
    cells = []
    for seed in range(3):
        torch.manual_seed(seed)
        cells.append(({"seed": seed, "checkpoint": 0}, make_context(make_mlp(**{"in": 3, "hidden": [], "out": 1}),
                                                                  data, mse)))
    result = run(group(cells, ["seed"]), pairs={"sweep": "seed"}, alphas=11)
    assert result.sizes["pair"] == 3 and result["pair"].values.tolist() == ["0-1", "0-2", "1-2"]
    # Convex L lies below its chord, and the chord meets L at the ends: barrier = 0.
    np.testing.assert_allclose(result["barrier"].values, 0.0, atol=1e-12)
    # A convex function on a segment peaks at an end: barrier_mean = |L(0) − L(1)| / 2.
    path = result["loss_path"]
    expected = abs(path.sel(alpha=0.0) - path.sel(alpha=1.0)) / 2
    np.testing.assert_allclose(result["barrier_mean"].values, expected.values, rtol=1e-12)
    # No hidden layer: weight matching has nothing to permute.
    np.testing.assert_array_equal(result["permutation_distance"].sel(align="none").values,
                                  result["permutation_distance"].sel(align="weight_matching").values)


def test_mli_of_linear_regression_follows_the_closed_form_and_is_monotone():
    # L(θ) = L* + (θ − θ*)ᵀ H (θ − θ*) for least squares, so from θ_0 to θ*:
    # L(α) = L* + (1 − α)²·(L(θ_0) − L*), strictly decreasing.
    data, optimum = least_squares()
    torch.manual_seed(0)
    model = make_mlp(**{"in": 3, "hidden": [], "out": 1})
    init = make_context(model, data, mse).flat_params
    ctx = make_context(with_params(model, [optimum[:3].tolist(), [float(optimum[3])]]), data, mse,
                       trajectory={0: init, 100: optimum})
    result = run(group([({"checkpoint": 100}, ctx)], []), init_to_final=True, alphas=9)
    alpha = np.linspace(0, 1, 9)
    l_star, l_0 = float(ctx.loss(optimum)), float(ctx.loss(init))
    np.testing.assert_allclose(result["mli_loss_path"].values, l_star + (1 - alpha) ** 2 * (l_0 - l_star), rtol=1e-12)
    assert bool(result["mli_monotone"]) and float(result["mli_max_bump"]) == 0.0
    assert result["mli_monotone"].dims == ()


def test_mli_of_the_double_well_path_has_a_bump_of_one():
    # From (1, 1) to (−1, −1): L(α) = 16α²(1 − α)² rises from 0 to 1 at α = ½, then falls back to 0.
    a, b = double_well_pair()
    ctx = make_context(b.model, b.data, mse, trajectory={0: a.flat_params, 5: b.flat_params})
    result = run(group([({"checkpoint": 5}, ctx)], []), init_to_final=True, alphas=5)
    assert float(result["mli_max_bump"]) == pytest.approx(1.0, rel=1e-12)
    assert not bool(result["mli_monotone"])


# --- weight matching ------------------------------------------------------------------------------
def test_aligned_barrier_of_permuted_copy_is_zero():
    model, data = trained_mlp(0)
    ctx_a = make_context(model, data, mse)
    axes = permutation.hidden_axes(model)
    true = {"0": torch.randperm(16, generator=torch.Generator().manual_seed(7))}
    permuted = permutation.permute(ctx_a.params, axes, true)
    copy_b = make_context(with_params(make_mlp(**{"in": 4, "hidden": [16], "out": 1, "activation": "tanh"}).double(),
                                      [permuted[k].tolist() for k in ctx_a.param_names]), data, mse)
    result = run(group([({"seed": 0, "checkpoint": 0}, ctx_a), ({"seed": 1, "checkpoint": 0}, copy_b)], ["seed"]),
                 pairs={"sweep": "seed"})
    pair = result.sel(pair="0-1")
    assert float(pair["barrier"].sel(align="none")) > 1e-3
    assert abs(float(pair["barrier"].sel(align="weight_matching"))) < 1e-12
    assert float(pair["permutation_distance"].sel(align="none")) > 1.0
    assert float(pair["permutation_distance"].sel(align="weight_matching")) == 0.0
    # The aligned model computes the same function as before alignment: the path's end has the same loss.
    end = pair["loss_path"].sel(alpha=1.0)
    assert float(end.sel(align="weight_matching")) == pytest.approx(float(end.sel(align="none")), rel=1e-13)
    assert int(pair["matching_rounds"]) >= 1


def test_weight_matching_lowers_the_barrier_between_independent_networks():
    cells = [({"seed": s, "checkpoint": 0}, make_context(*trained_mlp(s), mse)) for s in (0, 1)]
    result = run(group(cells, ["seed"]), pairs={"sweep": "seed"}, alphas=11)
    barrier = result["barrier"].sel(pair="0-1")
    distance = result["permutation_distance"].sel(pair="0-1")
    assert float(distance.sel(align="weight_matching")) < float(distance.sel(align="none"))
    assert float(barrier.sel(align="weight_matching")) < float(barrier.sel(align="none"))


def test_weight_matching_on_a_model_without_hidden_axes_names_the_fix():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    data = regression_data(torch.randn(8, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    cells = [({"seed": s, "checkpoint": 0}, make_context(Net(), data, mse)) for s in (0, 1)]
    with pytest.raises(ProbeError, match=r"hidden axes of a Net cannot be determined.*model.hidden_axes"):
        run(group(cells, ["seed"]), pairs={"sweep": "seed"})
    assert "barrier" in run(group(cells, ["seed"]), pairs={"sweep": "seed"}, align=["none"])


# --- layer dropping -------------------------------------------------------------------------------
def test_dropping_an_identity_layer_costs_nothing():
    # W₃W₂W₁x with W₂ = I: removing W₂ leaves the same function, so the same loss; W₃ (4 -> 4, random) is
    # droppable too but changes the function. The output layer (4 -> 2) is not a hidden layer.
    torch.manual_seed(0)
    model = make_deep_linear(widths=[3, 4, 4, 4, 2])
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(4))
    data = regression_data(torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64))
    ctx = make_context(model, data, mse)
    result = run(group([({"checkpoint": 0}, ctx)], []), layer_drop=True)
    assert result["layer"].values.tolist() == ["linear1", "linear2"]
    assert result["modules"].values.tolist() == ["2+3", "4+5"]
    assert float(result["layer_drop_increase"].sel(layer="linear1")) == 0.0
    assert float(result["layer_drop_loss"].sel(layer="linear1")) == pytest.approx(float(ctx.loss()), rel=1e-15)
    assert abs(float(result["layer_drop_increase"].sel(layer="linear2"))) > 1e-3


def test_dropping_an_identity_layer_after_a_relu_costs_nothing():
    # relu(I·relu(h) + 0) = relu(h): a square hidden layer that is the identity on its (non-negative) input.
    torch.manual_seed(0)
    model = make_mlp(**{"in": 3, "hidden": [5, 5], "out": 2, "activation": "relu"})
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(5))
        model[2].bias.zero_()
    data = regression_data(torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64))
    result = run(group([({"checkpoint": 0}, make_context(model, data, mse))], []), layer_drop=True)
    assert result["layer"].values.tolist() == ["linear1"]
    assert float(result["layer_drop_increase"].sel(layer="linear1")) == 0.0


def test_a_declared_residual_block_can_be_dropped():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = torch.nn.Linear(3, 3)

        def forward(self, x):
            return x + self.branch(x)

    class Net(torch.nn.Module):
        droppable_layers = {"block": ["block.branch"]}

        def __init__(self):
            super().__init__()
            self.block, self.head = Residual(), torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.block(x))

    torch.manual_seed(0)
    net = Net()
    data = regression_data(torch.randn(16, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64))
    ctx = make_context(net, data, mse)
    result = run(group([({"checkpoint": 0}, ctx)], []), layer_drop=True)
    # Without its branch the block is x + x: dropping the branch Linear turns it into the identity map.
    x, y = data.X_train, data.y_train
    with torch.no_grad():
        expected = float(mse(net.head(x + x), y))
    assert float(result["layer_drop_loss"].sel(layer="block")) == pytest.approx(expected, rel=1e-12)


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    ({"pairs": {"sweep": "width"}}, r"no sweep axis 'width' \(sweep axes: seed\); add width to sweep:"),
    ({"pairs": {"sweep": "checkpoint"}}, "use pairs: checkpoints"),
    ({"pairs": [[{"seed": 0}, {"lr": 1}]]}, r"pairs\[0\] names 'lr', which is not a cell dim"),
    ({}, "nothing to measure"),
    ({"pairs": "checkpoints", "alphas": [0.0, 0.5, 0.9]}, "must start at 0 and end at 1"),
    ({"pairs": "checkpoints", "alphas": [0.0, 0.7, 0.5, 1.0]}, "must increase strictly"),
    ({"pairs": "checkpoints", "alphas": [0.0, 1.5, 1.0]}, r"leaves \[0, 1\]"),
    ({"pairs": "checkpoints", "alphas": 2}, "at least 3"),
])
def test_bad_parameters_are_errors_naming_the_fix(params, message):
    probe = ModeConnectivity()
    with pytest.raises(ProbeError, match=message):
        probe.spans(probe.resolve(params), ["seed", "checkpoint"])


def test_spans_follow_the_pairs():
    probe = ModeConnectivity()
    assert probe.spans(probe.resolve({"pairs": {"sweep": "seed"}}), ["seed", "hidden", "checkpoint"]) == ["seed"]
    assert probe.spans(probe.resolve({"pairs": "checkpoints"}), ["seed", "checkpoint"]) == ["checkpoint"]
    assert probe.spans(probe.resolve({"init_to_final": True}), ["seed", "checkpoint"]) == []
    pairs = [[{"checkpoint": 0, "seed": 0}, {"seed": 1, "checkpoint": 10}]]
    assert probe.spans(probe.resolve({"pairs": pairs}), ["seed", "checkpoint"]) == ["seed", "checkpoint"]
    assert alphas_of(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_an_explicit_pair_naming_a_missing_checkpoint_is_an_error():
    a, b = double_well_pair()
    gctx = group([({"checkpoint": 0}, a), ({"checkpoint": 10}, b)], ["checkpoint"])
    with pytest.raises(ProbeError, match=r"pairs\[0\]: no cell has \{'checkpoint': 7\} \(values here: checkpoint: "
                                         r"0, 10\)"):
        run(gctx, pairs=[[{"checkpoint": 0}, {"checkpoint": 7}]], align=["none"])
    result = run(gctx, pairs=[[{"checkpoint": 10}, {"checkpoint": 0}]], align=["none"])
    assert result["pair"].values.tolist() == ["10-0"]


def test_checkpoint_pairs_need_two_checkpoints_and_mli_needs_the_initialization():
    a, _ = double_well_pair()
    with pytest.raises(ProbeError, match=r"only one model to pair \(checkpoint=300\).*select them with at:"):
        run(group([({"checkpoint": 300}, a)], ["checkpoint"]), pairs="checkpoints")
    late = make_context(a.model, a.data, mse, trajectory={100: a.flat_params, 300: a.flat_params})
    with pytest.raises(ProbeError, match=r"no checkpoint at step 0 \(its checkpoints: \[100, 300\]\); add 0 to "
                                         r"train.checkpoints"):
        run(group([({"checkpoint": 300}, late)], []), init_to_final=True)


# --- through a spec ------------------------------------------------------------------------------
DIGITS_SPEC = """
version: 1
name: mc-digits
seed: 0
dtype: float64
device: cpu
model: {kind: mlp, with: {in: 64, hidden: [32, 32], out: 10, activation: relu}}
data: {kind: digits, with: {test_fraction: 0.2}, batch_size: 512}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1, momentum: 0.9}, steps: 200, checkpoints: {at: [0, 200]}}
sweep: {seed: [0, 1]}
probes:
  - {name: seeds, probe: mode_connectivity, at: last, with: {pairs: {sweep: seed}, alphas: 11, init_to_final: true}}
  - {name: runs, probe: mode_connectivity, with: {pairs: checkpoints, align: [none], alphas: 5, data: test}}
  - name: cross
    probe: mode_connectivity
    with: {pairs: [[{seed: 0, checkpoint: 0}, {seed: 1, checkpoint: 200}]], align: [none], alphas: 5}
output: out.zarr
"""


def test_digits_mlps_from_two_seeds_have_a_lower_barrier_after_weight_matching(write_spec, cli, tmp_path):
    assert run_spec(load_spec(write_spec(DIGITS_SPEC))).ok
    tree = open_results(tmp_path / "out.zarr")
    seeds = tree["seeds"].to_dataset()
    assert seeds["barrier"].dims == ("checkpoint", "pair", "align")
    assert seeds["loss_path"].dims == ("checkpoint", "pair", "align", "alpha")
    assert seeds["mli_monotone"].dims == ("seed", "checkpoint") and seeds["mli_monotone"].dtype == bool
    barrier = seeds["barrier"].sel(checkpoint=200, pair="0-1")
    assert float(barrier.sel(align="weight_matching")) < 0.5 * float(barrier.sel(align="none"))
    assert float(barrier.sel(align="none")) > 0.1
    distance = seeds["permutation_distance"].sel(checkpoint=200, pair="0-1")
    assert float(distance.sel(align="weight_matching")) < float(distance.sel(align="none"))
    # The endpoints of the path are the stored checkpoints: its α = 0 end is the trained seed-0 model.
    accuracy = seeds["accuracy_path"].sel(checkpoint=200, pair="0-1", align="none")
    assert float(accuracy.sel(alpha=0.0)) > 0.9 and float(accuracy.sel(alpha=1.0)) > 0.9
    runs = tree["runs"].to_dataset()
    assert runs["barrier"].dims == ("seed", "pair", "align") and runs["pair"].values.tolist() == ["0-200"]
    assert runs["b"].values.tolist() == [200]
    cross = tree["cross"].to_dataset()
    # A pair spanning two dims names its ends by both.
    assert cross["a"].values.tolist() == ["seed=0,checkpoint=0"]
    assert cross["b"].values.tolist() == ["seed=1,checkpoint=200"]
    assert cross["barrier"].dims == ("pair", "align")
    code, out, err = cli("query", tmp_path / "out.zarr", "seeds/barrier", "--format", "json")
    assert code == 0 and '"align": "weight_matching"' in out


def test_pairs_along_a_missing_sweep_axis_is_a_spec_error(write_spec):
    from basinprobe.runtime.plan import compile_plan

    text = DIGITS_SPEC.replace("pairs: {sweep: seed}", "pairs: {sweep: width}")
    with pytest.raises(SpecError, match=r"spec.yaml:12:\d+: at probes.0.with: .*no sweep axis 'width'.*add width to "
                                        r"sweep:"):
        compile_plan(load_spec(write_spec(text)))
    text = DIGITS_SPEC.replace("alphas: 11", "alphas: [0, 0.5, 1.5]")
    with pytest.raises(SpecError, match=r"probes.0.with.alphas.2"):
        load_spec(write_spec(text))
