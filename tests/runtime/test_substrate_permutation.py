"""Truth tests of weight matching (runtime/substrate/permutation.py).

A network and a copy whose hidden units are permuted compute the same function; weight
matching must find the permutation back exactly. For one hidden layer it is an exact
linear assignment, so it must equal a brute-force minimum of ‖θ_a − π(θ_b)‖² over all
permutations.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from basinprobe.registry import ProbeError
from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.substrate import permutation


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def random_perms(axes, params, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(permutation.width_of(params, axes, name), generator=g) for name in axes}


def squared_distance(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a))


def test_hidden_axes_of_an_mlp_list_rows_bias_and_next_columns():
    model = make_mlp(**{"in": 3, "hidden": [5, 4], "out": 2, "activation": "relu"})
    assert permutation.hidden_axes(model) == {
        "0": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)],
        "2": [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)],
    }
    deep_linear = make_deep_linear(widths=[3, 4, 4, 2])
    assert permutation.hidden_axes(deep_linear) == {"0": [("0.weight", 0), ("2.weight", 1)],
                                                    "2": [("2.weight", 0), ("4.weight", 1)]}


NETWORKS = {"mlp": lambda: make_mlp(**{"in": 5, "hidden": [7, 6, 8], "out": 3, "activation": "tanh"}),
            "deep_linear": lambda: make_deep_linear(widths=[4, 6, 5, 6, 2])}


@pytest.mark.parametrize("kind", list(NETWORKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_a_hidden_unit_permutation(kind, seed):
    torch.manual_seed(seed)
    model = NETWORKS[kind]().double()
    axes = permutation.hidden_axes(model)
    theta_a = params_of(model)
    true = random_perms(axes, theta_a, seed=seed + 10)
    theta_b = permutation.permute(theta_a, axes, true)
    assert squared_distance(theta_a, theta_b) > 1.0
    match = permutation.weight_matching(theta_a, theta_b, axes, generator=torch.Generator().manual_seed(2))
    # θ_b = P(θ_a), so the permutation that maps θ_b back to θ_a is P⁻¹.
    for name, perm in permutation.inverse(true).items():
        assert torch.equal(match.perms[name], perm)
    assert match.converged
    assert squared_distance(theta_a, match.params) == 0.0


def test_permuting_hidden_units_leaves_the_function_unchanged():
    torch.manual_seed(0)
    model = make_mlp(**{"in": 5, "hidden": [7, 6], "out": 3, "activation": "gelu"}).double()
    axes = permutation.hidden_axes(model)
    theta = params_of(model)
    permuted = permutation.permute(theta, axes, random_perms(axes, theta, seed=3))
    x = torch.randn(20, 5, dtype=torch.float64)
    before = torch.func.functional_call(model, theta, (x,))
    after = torch.func.functional_call(model, permuted, (x,))
    torch.testing.assert_close(after, before, rtol=1e-14, atol=1e-14)


def test_weight_matching_of_one_hidden_layer_is_the_brute_force_optimum():
    torch.manual_seed(0)
    a = make_mlp(**{"in": 3, "hidden": [5], "out": 2}).double()
    b = make_mlp(**{"in": 3, "hidden": [5], "out": 2}).double()
    axes = permutation.hidden_axes(a)
    theta_a, theta_b = params_of(a), params_of(b)
    best = min(squared_distance(theta_a, permutation.permute(theta_b, axes, {"0": torch.tensor(p)}))
               for p in itertools.permutations(range(5)))
    match = permutation.weight_matching(theta_a, theta_b, axes)
    assert squared_distance(theta_a, match.params) == pytest.approx(best, rel=1e-12)
    assert best < squared_distance(theta_a, theta_b)


def test_weight_matching_never_increases_the_distance_of_deep_networks():
    torch.manual_seed(0)
    a = make_mlp(**{"in": 6, "hidden": [16, 16, 16], "out": 4}).double()
    b = make_mlp(**{"in": 6, "hidden": [16, 16, 16], "out": 4}).double()
    axes = permutation.hidden_axes(a)
    theta_a, theta_b = params_of(a), params_of(b)
    match = permutation.weight_matching(theta_a, theta_b, axes, generator=torch.Generator().manual_seed(0))
    assert match.converged
    after = squared_distance(theta_a, match.params)
    assert after < squared_distance(theta_a, theta_b)
    # At convergence no single layer's permutation can gain on its own: for each layer the identity
    # solves the linear assignment max_P tr(Pᵀ C), C[i, j] = Σ ⟨unit i of θ_a, unit j of the aligned θ_b⟩.
    for name, entries in axes.items():
        n = permutation.width_of(theta_a, axes, name)
        units_a = [torch.movedim(theta_a[p], ax, 0).reshape(n, -1) for p, ax in entries]
        units_b = [torch.movedim(match.params[p], ax, 0).reshape(n, -1) for p, ax in entries]
        cost = sum(ua @ ub.T for ua, ub in zip(units_a, units_b)).numpy()
        rows, cols = linear_sum_assignment(cost, maximize=True)
        assert cost[rows, cols].sum() == pytest.approx(np.trace(cost), rel=1e-12), name


class TwoLayer(nn.Module):
    """x -> fc2(relu(fc1(x))), not a Sequential: its hidden axes must be declared."""

    def __init__(self, declare: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)
        if declare:
            self.hidden_axes = {"hidden": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]}

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_declared_hidden_axes_let_weight_matching_align_a_user_model():
    torch.manual_seed(0)
    model = TwoLayer(declare=True).double()
    axes = permutation.hidden_axes(model)
    theta_a = params_of(model)
    theta_b = permutation.permute(theta_a, axes, random_perms(axes, theta_a, seed=4))
    match = permutation.weight_matching(theta_a, theta_b, axes)
    assert squared_distance(theta_a, match.params) == 0.0


def test_a_model_without_hidden_axes_is_a_clear_error():
    with pytest.raises(ProbeError, match=r"TwoLayer cannot be determined.*model.hidden_axes = .*align: \[none\]"):
        permutation.hidden_axes(TwoLayer(declare=False))
    with pytest.raises(ProbeError, match="LayerNorm"):
        permutation.hidden_axes(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))


def test_declared_hidden_axes_are_checked_against_the_parameters():
    model = TwoLayer(declare=False)
    model.hidden_axes = {"hidden": [("fc1.weight", 0), ("fc3.weight", 1)]}
    with pytest.raises(ProbeError, match="'fc3.weight', which the model does not have"):
        permutation.hidden_axes(model)
    model.hidden_axes = {"hidden": [("fc1.weight", 0), ("fc2.weight", 0)]}
    with pytest.raises(ProbeError, match=r"different sizes \[2, 6\]"):
        permutation.hidden_axes(model)
