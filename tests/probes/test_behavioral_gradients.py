"""Truth tests of the probe ``behavioral_gradients`` against closed forms and dense autograd Jacobians."""

import jsonschema
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from basinprobe.probes import _probe_classes
from basinprobe.probes.behavioral_gradients import BehavioralGradients
from basinprobe.registry import ProbeError
from basinprobe.runtime import artifacts
from basinprobe.runtime.context import CellContext
from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.testing import make_context, regression_data

F64 = torch.float64
PROBE = BehavioralGradients()


def run(model, X, y=None, **with_):
    y = torch.zeros(len(X), model(X[:1]).shape[1], dtype=F64) if y is None else y
    ctx = make_context(model, regression_data(X, y), mse)
    return PROBE.run(ctx, PROBE.resolve(with_))


def mlp(hidden, inp=3, out=1, activation="relu", seed=0):
    torch.manual_seed(seed)
    return make_mlp(**{"in": inp, "hidden": hidden, "out": out, "activation": activation}).to(F64)


def dense_jacobian(model, X) -> torch.Tensor:
    """J built column by column with torch.autograd's forward mode: column j = ∂f(X)/∂θ_j."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    columns = []
    for name, p in params.items():
        for j in range(p.numel()):
            tangent = torch.zeros(p.numel(), dtype=p.dtype)
            tangent[j] = 1
            with fwAD.dual_level():
                dual = {**params, name: fwAD.make_dual(p, tangent.view_as(p))}
                columns.append(fwAD.unpack_dual(functional_call(model, dual, (X,))).tangent.reshape(-1))
    return torch.stack(columns, dim=1)


def dense_rank(A: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(A))   # σ > max(shape)·eps·σ_max, the probe's default


def block_ranks(model, J) -> list[int]:
    ranks, start = [], 0
    for p in model.parameters():
        ranks.append(dense_rank(J[:, start:start + p.numel()]))
        start += p.numel()
    return ranks


# --- the Jacobian and its spectrum --------------------------------------------------------
@pytest.mark.parametrize("width", [1, 3, 20])
@pytest.mark.parametrize("k,m", [(5, 8), (12, 4)])
def test_deep_linear_scalar_output_jacobian_rank_is_min_of_inputs_and_input_dim(width, k, m):
    # f(x) = w2ᵀ W1 x: row(x) = [vec(w2 xᵀ), W1 x] is linear and injective in x (w2 ≠ 0),
    # so rank J = rank [x_1 … x_k] = min(k, m) for generic inputs, whatever the width
    torch.manual_seed(width)
    model = make_deep_linear(widths=[m, width, 1]).to(F64)
    ds = run(model, torch.randn(k, m, dtype=F64))
    assert int(ds["rank"]) == min(k, m)
    n = m * width + width
    assert int(ds["n_params"]) == n and int(ds["manifold_dim_bound"]) == n - min(k, m)


@pytest.mark.parametrize("widths", [[4, 2, 3], [4, 5, 3], [4, 1, 3], [5, 3, 4], [4, 3, 2, 3], [4, 6, 1, 3]])
def test_deep_linear_jacobian_rank_is_the_dimension_of_the_rank_r_matrices(widths):
    # f(x) = W_L ⋯ W_1 x computes the p x m matrix W = W_L ⋯ W_1 of rank r = min(widths) for generic
    # weights; θ ↦ W maps onto the manifold of rank-r matrices, of dimension r(m + p − r) (Trager,
    # Kohn & Bruna 2020), and k ≥ m generic inputs make W ↦ W X injective: rank J = r(m + p − r).
    # [4, 2, 3]: 2·(4 + 3 − 2) = 10; [4, 5, 3]: 3·4 = 12 = m·p (full); [4, 1, 3]: 1·6 = 6.
    torch.manual_seed(0)
    model = make_deep_linear(widths=widths).to(F64)
    m, p, r = widths[0], widths[-1], min(widths)
    ds = run(model, torch.randn(12, m, dtype=F64))
    assert int(ds["rank"]) == r * (m + p - r)
    assert int(ds["n_rows"]) == 12 * p


@pytest.mark.parametrize("d", [1, 3])
def test_collapsed_inputs_give_the_rank_of_the_input_span(d):
    # 10 inputs in R^6 that span only a d-dimensional subspace (x_i = B z_i), 4 of them repeated:
    # row(x) = [vec(w2 xᵀ), W1 x] is linear and injective in x, so rank J = rank X = d,
    # and the repeats are counted once by distinct_inputs (and distinct_activations)
    torch.manual_seed(1)
    model = make_deep_linear(widths=[6, 8, 1]).to(F64)
    Z = torch.randn(6, d, dtype=F64)
    X = torch.cat([Z, Z[:4]]) @ torch.randn(d, 6, dtype=F64)
    ds = run(model, X)
    assert int(ds["rank"]) == d == dense_rank(dense_jacobian(model, X))
    assert int(ds["distinct_inputs"]) == 6
    assert int(ds["distinct_activations"].sel(hidden_layer="1")) == 6
    assert int(ds["activation_rank"].sel(hidden_layer="1")) == d


def test_deep_linear_rank_is_the_same_on_the_gram_path():
    torch.manual_seed(0)
    model = make_deep_linear(widths=[4, 20, 1]).to(F64)
    ds = run(model, torch.randn(12, 4, dtype=F64), memory_mb=0.01)
    assert ds.attrs["jacobian_path"] == "gram_outputs"
    assert int(ds["rank"]) == 4


@pytest.mark.parametrize("outputs", ["all", [1], "sum"])
@pytest.mark.parametrize("memory_mb", [1024, 0.045])
def test_mlp_singular_values_equal_the_dense_svd_of_the_autograd_jacobian(outputs, memory_mb):
    model = mlp([5, 4], out=3, activation="tanh")
    X = torch.randn(15, 3, dtype=F64)
    J = dense_jacobian(model, X).reshape(15, 3, -1)
    if outputs == "sum":
        J = J.sum(1, keepdim=True)
    elif outputs != "all":
        J = J[:, outputs]
    J = J.reshape(-1, J.shape[-1])
    dense = torch.linalg.svdvals(J)
    ds = run(model, X, outputs=outputs, memory_mb=memory_mb)
    # 45 x 59 J: 21 KiB, 42 with its SVD; J Jᵀ 45 x 45: 32 KiB with its eigh. Selected outputs fit directly.
    assert ds.attrs["jacobian_path"] == ("gram_outputs" if memory_mb < 1 and outputs == "all" else "direct")
    sv = torch.from_numpy(ds["singular_values"].values)
    assert len(sv) == min(J.shape)
    resolved = dense > (1e-3 if memory_mb < 1 else 1e-12) * dense[0]   # the Gram path squares σ
    torch.testing.assert_close(sv[resolved], dense[resolved], rtol=1e-6, atol=0)
    assert int(ds["rank"]) == dense_rank(J)
    torch.testing.assert_close(torch.from_numpy(ds["ntk_eigenvalues"].values), sv ** 2)
    rank = int(ds["rank"])
    assert float(ds["ntk_condition"]) == pytest.approx(float(sv[0] ** 2 / sv[rank - 1] ** 2))


def test_gram_path_is_taken_and_stated_when_j_exceeds_the_budget():
    model = mlp([6], out=2, activation="tanh")
    X = torch.randn(30, 3, dtype=F64)
    # J is 60 x 38 (18 KiB, twice that for its SVD); Jᵀ J is 38 x 38 (11 KiB, twice for eigh)
    direct, gram = run(model, X), run(model, X, memory_mb=0.03)
    assert direct.attrs["jacobian_path"] == "direct"
    assert gram.attrs["jacobian_path"] == "gram_params"
    assert gram.attrs["modelled_peak_mb"] <= 0.03
    assert int(gram["rank"]) == int(direct["rank"])
    assert (gram["layer_rank"].values == direct["layer_rank"].values).all()


def test_layer_rank_is_the_rank_of_each_parameter_block_of_the_dense_jacobian():
    model = mlp([5, 4], out=2, activation="tanh")
    X = torch.randn(12, 3, dtype=F64)
    ds = run(model, X)
    assert list(ds["layer"].values) == [name for name, _ in model.named_parameters()]
    assert ds["layer_rank"].values.tolist() == block_ranks(model, dense_jacobian(model, X))


# --- information loss -------------------------------------------------------------------------
def coinciding_case():
    """ReLU MLP 3 -> 16 -> 1 in which x1 + t·d (t = 0, 1, 2) share one first-layer activation vector.

    Units 0-7 ignore the third coordinate (their weight on it is 0); units 8-15 see it but
    have bias -6, so they are dead on x1 + t·d with d = (0, 0, 0.5). The other inputs are generic.
    """
    model = mlp([16], seed=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        W, b = model[0].weight, model[0].bias
        W[:8, 2] = 0
        W[8:, 2] = 1.5 * torch.sign(torch.randn(8, dtype=F64, generator=g))
        b[:8] = 0.3 * torch.randn(8, dtype=F64, generator=g)
        b[8:] = -6
    others = torch.randn(8, 3, dtype=F64, generator=g)
    others[:, 2] *= 5
    x1, d = torch.tensor([0.3, -0.2, 0.0], dtype=F64), torch.tensor([0.0, 0.0, 0.5], dtype=F64)
    return model, others, x1, d


def test_inputs_with_coinciding_first_layer_activations_lose_exactly_the_dense_rank():
    model, others, x1, d = coinciding_case()
    pair = torch.cat([others, torch.stack([x1, x1 + d])])
    triple = torch.cat([pair, (x1 + 2 * d)[None]])
    generic = torch.cat([pair, torch.tensor([[0.5, 0.4, 0.25]], dtype=F64)])
    results = {name: (run(model, X), dense_jacobian(model, X))
               for name, X in [("pair", pair), ("triple", triple), ("generic", generic)]}
    for name, (ds, J) in results.items():
        assert int(ds["rank"]) == dense_rank(J), name
        assert ds["layer_rank"].values.tolist() == block_ranks(model, J), name
        # the outgoing block has rows h(x_i) (scalar output): its rank is the activation rank
        assert int(ds["layer_rank"].sel(layer="2.weight")) == int(ds["activation_rank"].sel(hidden_layer="1"))
    # x1 and x1 + d share h: 10 inputs, 9 distinct; x1 + 2d too: 11 inputs, 9 distinct
    assert int(results["pair"][0]["distinct_activations"].sel(hidden_layer="1")) == 9
    assert int(results["triple"][0]["distinct_activations"].sel(hidden_layer="1")) == 9
    assert int(results["pair"][0]["distinct_inputs"]) == 10
    # In the shared activation region a row is affine in x: r(x1 + 2d) = 2 r(x1 + d) - r(x1),
    # so the third coinciding input adds no rank where a generic eleventh input adds one.
    rank = {name: int(ds["rank"]) for name, (ds, _) in results.items()}
    assert rank["generic"] == rank["pair"] + 1
    assert rank["triple"] == rank["pair"]


@pytest.mark.parametrize("dead", [False, True])
def test_a_dead_unit_is_reported_and_loses_its_weights_from_the_rank(dead):
    # f = Σ_u a_u relu(w_u·x + b_u) + c with in = 3, out = 2, 6 units: each live unit adds
    # (in + 1) + out directions minus one for its scaling symmetry = in + out = 5, plus out biases:
    # rank = 6·5 + 2 = 32, and 5·5 + 2 = 27 when one unit is dead (its in + 1 incoming and out outgoing
    # weights get zero gradient on every input)
    model = mlp([6], out=2, seed=2)
    if dead:
        with torch.no_grad():
            model[0].bias[0] = -100
    X = torch.randn(200, 3, dtype=F64)
    ds = run(model, X)
    live = 6 - dead
    assert int(ds["rank"]) == live * (3 + 2) + 2 == dense_rank(dense_jacobian(model, X))
    assert float(ds["dead_fraction"].sel(hidden_layer="1")) == pytest.approx(dead / 6)
    assert int(ds["layer_rank"].sel(layer="2.weight")) == 2 * live   # out x (live units)


@pytest.mark.parametrize("scale", [None, 1.0, 2.0])
def test_a_duplicated_hidden_unit_is_reported_as_a_pair(scale):
    # unit 3 := scale x unit 0 (incoming row and bias): relu(scale·z) = scale·relu(z), so the two
    # units act as one: rank 5·(in + out) + out = 21 drops to 4·(3 + 1) + 1 = 17
    model = mlp([5], seed=3)
    if scale is not None:
        with torch.no_grad():
            model[0].weight[3] = scale * model[0].weight[0]
            model[0].bias[3] = scale * model[0].bias[0]
    X = torch.randn(40, 3, dtype=F64)
    ds = run(model, X)
    assert int(ds["duplicate_units"].sel(hidden_layer="1")) == (0 if scale is None else 1)
    assert int(ds["rank"]) == (21 if scale is None else 17) == dense_rank(dense_jacobian(model, X))


def test_hessian_rank_equals_jacobian_rank_at_a_trained_mse_minimum():
    # At an interpolating minimum the residuals vanish and H = (2/N) Jᵀ J: rank H = rank J = k = 8
    # (k < n = 25). Away from it the residual term Σ r_i ∇²f_i fills in the rest.
    model = mlp([6], inp=2, activation="tanh")
    X = torch.randn(8, 2, dtype=F64)
    y = torch.sin(2 * X[:, :1]) + X[:, 1:] ** 2
    init = run(model, X, y, hessian_rank=True)
    assert int(init["hessian_rank"]) > int(init["rank"])
    for _ in range(30):   # Gauss-Newton with the minimum-norm step: quadratic convergence to interpolation
        J = dense_jacobian(model, X)
        residual = (model(X) - y).reshape(-1).detach()
        theta = parameters_to_vector(model.parameters()).detach()
        vector_to_parameters(theta - torch.linalg.lstsq(J, residual, driver="gelsd").solution, model.parameters())
        if float(((model(X) - y) ** 2).mean().detach()) < 1e-30:
            break
    ds = run(model, X, y, hessian_rank=True)
    assert int(ds["rank"]) == 8
    assert int(ds["hessian_rank"]) == int(ds["rank"])


@pytest.mark.parametrize("k,m", [(3, 5), (10, 4)])
def test_hessian_rank_of_an_exactly_fitted_linear_regression_is_the_rank_of_the_design(k, m):
    # f(x) = wᵀx + b fits y = X w* + b* exactly; L = (1/k) Σ (f(x_i) − y_i)², f linear in θ = (w, b):
    # H = (2/k) AᵀA with A = [X 1] = J, so rank H = rank J = rank A = min(k, m + 1)
    model = mlp([], inp=m)
    X = torch.randn(k, m, dtype=F64)
    y = X @ torch.randn(m, 1, dtype=F64) + 0.7
    with torch.no_grad():
        A = torch.cat([X, torch.ones(k, 1, dtype=F64)], dim=1)
        solution = torch.linalg.lstsq(A, y, driver="gelsd").solution[:, 0]
        model[0].weight.copy_(solution[:m][None])
        model[0].bias.copy_(solution[m:])
    ds = run(model, X, y, hessian_rank=True)
    assert int(ds["hessian_rank"]) == int(ds["rank"]) == min(k, m + 1)
    assert int(ds["manifold_dim_bound"]) == m + 1 - min(k, m + 1)


@pytest.mark.parametrize("k,m", [(3, 5), (8, 4)])
def test_hessian_rank_of_a_deep_linear_network_at_a_global_minimum_is_min_k_m(k, m):
    # f(x) = w2ᵀ W1 x (width 3) fitted to its own outputs: loss 0, a global minimum, where
    # H = (2/k) JᵀJ and rank H = rank J = min(k, m). Off the minimum the residual term
    # (2/k) Σ r_i ∇²f_i, with ∂²f/∂w2_a ∂W1_bc = δ_ab x_c, adds rank.
    torch.manual_seed(k)
    model = make_deep_linear(widths=[m, 3, 1]).to(F64)
    X = torch.randn(k, m, dtype=F64)
    y = model(X).detach()
    at_minimum = run(model, X, y, hessian_rank=True)
    assert int(at_minimum["hessian_rank"]) == int(at_minimum["rank"]) == min(k, m)
    off = run(model, X, y + torch.randn(k, 1, dtype=F64), hessian_rank=True)
    assert int(off["hessian_rank"]) > int(off["rank"]) == min(k, m)


def test_near_a_minimum_hessian_tol_above_the_residuals_recovers_the_jacobian_rank():
    # deep linear f = w2ᵀ W1 x, targets off its outputs by δ = 1e-7: H = (2/k)(JᵀJ + Σ r_i ∇²f_i) with
    # JᵀJ's nonzero eigenvalues O(1) and the residual term's O(δ·|x|). The default tolerance n·eps
    # (n = 4·8 + 8 = 40: 40·2.2e-16 ≈ 9e-15) counts the residual term; hessian_tol = 1e-4 lies between.
    torch.manual_seed(0)
    model = make_deep_linear(widths=[4, 8, 1]).to(F64)
    X = torch.randn(6, 4, dtype=F64)
    y = model(X).detach() + 1e-7 * torch.randn(6, 1, dtype=F64)
    default, tolerant = run(model, X, y, hessian_rank=True), run(model, X, y, hessian_rank=True, hessian_tol=1e-4)
    assert int(default["hessian_rank"]) > int(default["rank"]) == 4
    assert int(tolerant["hessian_rank"]) == int(tolerant["rank"]) == 4
    assert float(tolerant["hessian_rank_threshold"]) == pytest.approx(
        1e-4 * float(default["hessian_rank_threshold"]) / (40 * torch.finfo(F64).eps))


def test_hessian_rank_is_the_rank_of_the_shared_dense_hessian_artifact(monkeypatch):
    # the probe reads the cell's hessian.dense (runtime/substrate/dense.py), computed once per cell
    # and shared with hessian_spectrum / basin_volume, whose eigenvalues it thresholds at n·eps·max|λ|
    calls = []
    produce = artifacts.producer("hessian.dense")
    monkeypatch.setitem(artifacts.PRODUCERS, "hessian.dense", lambda ctx, **kw: calls.append(kw) or produce(ctx, **kw))
    model, X = mlp([3], inp=2, activation="tanh"), torch.randn(6, 2, dtype=F64)
    ctx = make_context(model, regression_data(X, torch.zeros(6, 1, dtype=F64)), mse)
    ds = PROBE.run(ctx, PROBE.resolve({"hessian_rank": True}))
    shared = ctx.artifact("hessian.dense", operator="hessian", split="train", batches=None, at=None)
    assert len(calls) == 1
    H = dense_loss_hessian(model, X, torch.zeros(6, 1, dtype=F64))
    torch.testing.assert_close(shared.matrix, H)
    assert int(ds["hessian_rank"]) == int(torch.linalg.matrix_rank(H, hermitian=True))
    assert PROBE.artifact_requests(PROBE.resolve({"hessian_rank": True})) == [
        ("hessian.dense", {"operator": "hessian", "split": "train", "batches": None, "at": None})]
    assert PROBE.artifact_requests(PROBE.resolve({})) == []


def dense_loss_hessian(model, X, y) -> torch.Tensor:
    """∇²L by torch.autograd.functional.hessian of the flat-parameter MSE."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    flat = parameters_to_vector(model.parameters()).detach()

    def loss(theta):
        params, start = {}, 0
        for name, shape in shapes.items():
            params[name] = theta[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return mse(functional_call(model, params, (X,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def test_hessian_rank_over_a_subset_of_inputs_warns_that_it_is_not_comparable():
    model, X = mlp([3], inp=2, activation="tanh"), torch.randn(20, 2, dtype=F64)
    with pytest.warns(RuntimeWarning, match="hessian_rank is the rank of the Hessian of the loss on all 20"):
        ds = run(model, X, inputs=5, hessian_rank=True)
    assert int(ds["n_rows"]) == 5


class NormedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.act1 = nn.Linear(3, 6), nn.ReLU()
        self.norm, self.mid, self.act2 = nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh()
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.act2(self.mid(self.norm(self.act1(self.inp(x))))))


def test_hidden_layers_of_other_modules_are_their_activation_modules():
    torch.manual_seed(0)
    model = NormedNet().to(F64)
    with torch.no_grad():
        model.mid.weight[2] = model.mid.weight[0]
        model.mid.bias[2] = model.mid.bias[0]
        model.inp.bias[1] = -100            # dead on every input
    ds = run(model, torch.randn(20, 3, dtype=F64))
    assert list(ds["hidden_layer"].values) == ["act1", "act2"]
    assert ds.attrs["hidden_layers_from"] == "activation modules"
    assert ds["dead_fraction"].values.tolist() == pytest.approx([1 / 6, 0.0])
    assert ds["duplicate_units"].values.tolist() == [0, 1]


# --- the probe's contract and bad input ------------------------------------------------------
def test_probe_is_built_in_and_its_schema_is_draft07_with_defaults():
    assert BehavioralGradients in _probe_classes()
    jsonschema.Draft7Validator.check_schema(PROBE.schema)
    assert all("default" in prop for prop in PROBE.schema["properties"].values())
    jsonschema.Draft202012Validator(PROBE.schema).validate({"inputs": 64, "outputs": [0, 2], "tol": 1e-8})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(PROBE.schema).validate({"outputs": "first"})


def test_every_variable_is_described_and_no_dim_is_a_sel_keyword():
    ds = run(mlp([4]), torch.randn(6, 3, dtype=F64), hessian_rank=True)
    assert not set(ds.dims) & {"method", "tolerance", "drop", "indexers"}
    assert all(var.attrs.get("description") for var in ds.data_vars.values())
    assert {"singular_values", "rank", "n_params", "n_rows", "manifold_dim_bound", "ntk_eigenvalues",
            "ntk_condition", "layer_rank", "distinct_activations", "activation_rank", "dead_fraction",
            "duplicate_units", "hessian_rank"} <= set(ds.data_vars)


def test_per_layer_false_stores_only_the_whole_jacobian_results():
    X = torch.randn(6, 3, dtype=F64)
    full, ds = run(mlp([4]), X), run(mlp([4]), X, per_layer=False)
    assert not {"layer_rank", "distinct_activations", "dead_fraction", "duplicate_units"} & set(ds.data_vars)
    assert set(ds.dims) == {"sv"} and int(ds["rank"]) == int(full["rank"])


def test_a_subset_of_inputs_is_drawn_from_the_seed_reproducibly():
    model, X = mlp([4], activation="tanh"), torch.randn(50, 3, dtype=F64)
    a, b = run(model, X, inputs=7), run(model, X, inputs=7)
    assert int(a["n_rows"]) == 7 and a.attrs["n_available"] == 50
    assert (a["singular_values"].values == b["singular_values"].values).all()


def test_more_inputs_than_the_split_holds_are_clamped_with_a_warning():
    with pytest.warns(RuntimeWarning, match="inputs=100 but split 'train' holds 10"):
        ds = run(mlp([4]), torch.randn(10, 3, dtype=F64), inputs=100)
    assert int(ds["n_rows"]) == 10


def test_output_indices_out_of_range_are_an_error():
    with pytest.raises(ProbeError, match=r"outputs \[3\] are out of range: the model has 2 outputs"):
        run(mlp([4], out=2), torch.randn(5, 3, dtype=F64), outputs=[0, 3])


def test_a_model_without_parameters_is_an_error():
    X = torch.randn(5, 1, dtype=F64)
    ctx = CellContext(nn.Identity(), torch.zeros(0, dtype=F64), regression_data(X, X), mse, dtype=F64)
    with pytest.raises(ProbeError, match="no parameters"):
        PROBE.run(ctx, PROBE.resolve({}))


def test_nan_outputs_are_an_error_and_nothing_is_stored():
    model = mlp([4])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ProbeError, match="NaN or inf on 5 of the 5 inputs"):
        run(model, torch.randn(5, 3, dtype=F64))


def test_an_empty_split_is_an_error():
    with pytest.raises(ProbeError, match="split 'test' holds no inputs"):
        run(mlp([4]), torch.randn(5, 3, dtype=F64), split="test")


def test_a_gram_matrix_over_the_budget_is_an_error_saying_what_to_change():
    with pytest.raises(ProbeError, match="lower `inputs`"):
        run(mlp([4]), torch.randn(50, 3, dtype=F64), memory_mb=0.001)


def test_hessian_rank_of_a_model_too_large_for_a_dense_hessian_is_an_error():
    with pytest.raises(ProbeError, match="hessian_rank: false"):
        run(mlp([1300], inp=3), torch.randn(4, 3, dtype=F64), hessian_rank=True, per_layer=False)
