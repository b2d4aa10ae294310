"""Truth tests of the per-input Jacobian, its Gram matrices, numerical rank and hidden activations."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from basinprobe.runtime.models import make_deep_linear, make_mlp
from basinprobe.runtime.substrate import activations as acts
from basinprobe.runtime.substrate import jacobian as jac

F64 = torch.float64


def mlp_case(inp=3, hidden=(5, 4), out=2, k=10, activation="tanh", seed=0):
    torch.manual_seed(seed)
    model = make_mlp(**{"in": inp, "hidden": list(hidden), "out": out, "activation": activation}).to(F64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    X = torch.randn(k, inp, dtype=F64)
    return model, params, (lambda p, x: functional_call(model, p, (x,))), X


def autograd_rows(model, X) -> torch.Tensor:
    """J row by row: one torch.autograd.grad per (input, output)."""
    rows = []
    for x in X:
        y = model(x[None])[0]
        for o in range(len(y)):
            grads = torch.autograd.grad(y[o], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("chunk", [3, 10])
def test_jacobian_rows_are_the_autograd_gradients_of_each_output(mode, chunk):
    model, params, fn, X = mlp_case()
    J = jac.jacobian(fn, params, X, chunk=chunk, mode=mode)
    assert J.shape == (10 * 2, sum(p.numel() for p in params.values()))
    torch.testing.assert_close(J, autograd_rows(model, X), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("chunk", [3, 10])
def test_per_example_identity_of_linear_layers_gives_the_autograd_rows(activation, chunk):
    """∂f_o(x_i)/∂W = δ_i ⊗ a_i, ∂f_o(x_i)/∂b = δ_i, all δ_i from one backward of Σ_i f_o(x_i)."""
    model, params, _, X = mlp_case(activation=activation)
    net = jac.ModuleNetwork(model)
    J = jac.jacobian(net, params, X, chunk=chunk)
    torch.testing.assert_close(J, autograd_rows(model, X), rtol=1e-12, atol=1e-13)
    name = "2.weight"
    torch.testing.assert_close(jac.jacobian(net, params, X, chunk=chunk, names=[name]),
                               J[:, jac.Columns(params).slice(name)], rtol=0, atol=0)


def test_per_example_identity_agrees_with_vmap_on_selected_outputs_and_deep_linear_nets():
    torch.manual_seed(1)
    model = make_deep_linear(widths=[4, 3, 2]).to(F64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    X = torch.randn(9, 4, dtype=F64)
    for select in (lambda y: y[:, [1]], lambda y: y.sum(dim=1, keepdim=True)):
        net = jac.ModuleNetwork(model, select=select)
        torch.testing.assert_close(jac.jacobian(net, params, X, chunk=4),
                                   jac.jacobian(lambda p, x: net(p, x), params, X, chunk=4), rtol=1e-12, atol=1e-13)


def test_a_layer_used_twice_falls_back_to_vmap():
    """Weight sharing breaks the one-call-per-layer identity; the result must still be right."""
    torch.manual_seed(2)
    layer = nn.Linear(3, 3).to(F64)
    model = nn.Sequential(layer, nn.Tanh(), layer).to(F64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    X = torch.randn(5, 3, dtype=F64)
    net = jac.ModuleNetwork(model)
    assert net.linear_block(params, X, jac.Columns(params), lambda rows: torch.empty(rows, 12, dtype=F64)) is None
    assert not net.per_example_identity(params, X)
    torch.testing.assert_close(jac.jacobian(net, params, X, chunk=5),
                               jac.jacobian(lambda p, x: net(p, x), params, X, chunk=5), rtol=1e-12, atol=1e-13)


def test_jacobian_of_a_linear_map_has_rows_e_o_kron_x():
    # f(x) = W x: ∂f_o/∂W[a, b] = δ_oa x_b, so row (i, o) is e_o ⊗ x_i
    W = torch.randn(2, 3, dtype=F64)
    X = torch.randn(4, 3, dtype=F64)
    J = jac.jacobian(lambda p, x: x @ p["W"].T, {"W": W}, X, chunk=2)
    expected = torch.stack([torch.kron(torch.eye(2, dtype=F64)[o], x) for x in X for o in range(2)])
    torch.testing.assert_close(J, expected)


def test_jacobian_restricted_to_tensors_is_the_column_block():
    model, params, fn, X = mlp_case()
    full = jac.jacobian(fn, params, X, chunk=4)
    cols = jac.Columns(params)
    for mode in ("reverse", "forward"):
        block = jac.jacobian(fn, params, X, chunk=4, mode=mode, names=["2.weight"])
        torch.testing.assert_close(block, full[:, cols.slice("2.weight")], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("side", ["params", "outputs"])
@pytest.mark.parametrize("chunk,jvp_chunk", [(3, 2), (10, None), (1, 4)])
def test_chunked_gram_equals_the_product_of_the_dense_jacobian(side, chunk, jvp_chunk):
    model, params, fn, X = mlp_case()
    J = autograd_rows(model, X)
    gram = jac.jacobian_gram(fn, params, X, chunk=chunk, side=side, jvp_chunk=jvp_chunk)
    torch.testing.assert_close(gram, J.T @ J if side == "params" else J @ J.T, rtol=1e-11, atol=1e-12)


def test_gram_of_one_tensor_is_the_gram_of_its_column_block():
    model, params, fn, X = mlp_case()
    block = autograd_rows(model, X)[:, jac.Columns(params).slice("0.weight")]
    gram = jac.jacobian_gram(fn, params, X, chunk=3, side="outputs", jvp_chunk=3, names=["0.weight"])
    torch.testing.assert_close(gram, block @ block.T, rtol=1e-11, atol=1e-12)


def known_rank_matrix(singular_values, rows=12, cols=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=F64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=F64, generator=g))
    s = torch.zeros(min(rows, cols), dtype=F64)
    s[:len(singular_values)] = torch.tensor(singular_values, dtype=F64)
    return U[:, :len(s)] @ torch.diag(s) @ V[:, :len(s)].T


def test_numerical_rank_counts_singular_values_above_max_shape_times_eps():
    # σ = 1, 1e-3, 1e-10, 0...: the default tolerance 12·eps ≈ 2.7e-15 keeps 1e-10; rtol 1e-6 drops it
    A = known_rank_matrix([1.0, 1e-3, 1e-10])
    spectrum = jac.svd_spectrum(A)
    assert spectrum.rank == 3
    assert spectrum.threshold == pytest.approx(12 * torch.finfo(F64).eps)
    assert jac.svd_spectrum(A, rtol=1e-6).rank == 2


def test_a_wide_matrix_keeps_its_small_singular_values_through_the_triangular_factor():
    # 40 x 300 (a Jacobian of 40 rows and 300 parameters), σ from 1 down to 1e-12, then exact zeros:
    # taken through QR of Aᵀ, each σ is within a few eps·σ_max (as svdvals itself), rank 30 of 40
    values = torch.logspace(0, -12, 30, dtype=F64).tolist()
    A = known_rank_matrix(values, rows=40, cols=300, seed=1)
    spectrum = jac.svd_spectrum(A)
    assert spectrum.rank == 30
    expected = torch.tensor(values + [0.0] * 10, dtype=F64)
    assert (spectrum.singular_values - expected).abs().max() < 20 * torch.finfo(F64).eps
    assert (spectrum.singular_values - torch.linalg.svdvals(A)).abs().max() < 20 * torch.finfo(F64).eps


def test_gram_spectrum_gives_the_singular_values_and_rank_of_j():
    # rank 4 matrix: σ = 3, 2, 1, 0.5; both Grams have λ = σ² and the rank is 4
    A = known_rank_matrix([3.0, 2.0, 1.0, 0.5])
    for gram in (A @ A.T, A.T @ A):
        spectrum = jac.gram_spectrum(gram, n_singular=9)
        assert spectrum.rank == 4
        torch.testing.assert_close(spectrum.singular_values[:4], torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64))
        assert len(spectrum.singular_values) == 9


def test_gram_rank_cannot_resolve_below_sqrt_size_times_eps():
    # σ = 1e-9 squares to 1e-18, under the Gram's rounding 12·eps ≈ 2.7e-15: not counted,
    # and a requested rtol of 1e-12 is raised to sqrt(12·eps) ≈ 5.2e-8
    A = known_rank_matrix([1.0, 1e-9])
    spectrum = jac.gram_spectrum(A @ A.T, n_singular=9, rtol=1e-12)
    assert spectrum.rank == 1
    assert spectrum.rtol == pytest.approx((12 * torch.finfo(F64).eps) ** 0.5)


def test_mode_is_forward_only_when_parameters_are_fewer_than_outputs():
    assert jac.choose_mode(n=50, out=100) == "forward"
    assert jac.choose_mode(n=50, out=10) == "reverse"
    assert jac.choose_mode(n=50_000, out=1) == "reverse"


def test_plan_takes_j_when_it_fits_and_the_smaller_gram_when_it_does_not():
    # J of 512 x 50000 float64 is 195 MiB: it fits 1 GiB twice over, not 256 MiB
    big = jac.plan_jacobian(512, 1, 50_000, acts=500, itemsize=8, memory_bytes=1 << 30)
    assert big.path == "direct"
    small = jac.plan_jacobian(512, 1, 50_000, acts=500, itemsize=8, memory_bytes=256 << 20)
    assert (small.path, small.side) == ("gram", "outputs")
    assert small.bytes <= 256 << 20
    tall = jac.plan_jacobian(50_000, 10, 2_000, acts=500, itemsize=8, memory_bytes=256 << 20)
    assert (tall.path, tall.side) == ("gram", "params")
    assert tall.bytes <= 256 << 20
    with pytest.raises(MemoryError, match="Gram matrix"):
        jac.plan_jacobian(50_000, 10, 50_000, acts=500, itemsize=8, memory_bytes=256 << 20)


def test_in_place_blocks_take_all_inputs_in_one_chunk_where_copied_blocks_are_capped():
    torch.manual_seed(3)
    model = make_deep_linear(widths=[4, 3, 2]).to(F64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    assert jac.ModuleNetwork(model).per_example_identity(params, torch.randn(2, 4, dtype=F64))
    copied = jac.plan_jacobian(512, 1, 50_000, acts=500, itemsize=8, memory_bytes=1 << 30)
    in_place = jac.plan_jacobian(512, 1, 50_000, acts=500, itemsize=8, memory_bytes=1 << 30, in_place=True)
    assert copied.chunk * 50_000 * 8 <= jac.CPU_BLOCK_BYTES
    assert (in_place.path, in_place.chunk) == ("direct", 512) and in_place.bytes <= 1 << 30
    # the budget still bounds the cotangents: 2 J's of 195 MiB leave 10 MiB for ~1000 numbers per input
    room = int(2.1 * 512 * 50_000 * 8 / (1 - jac.ALLOCATOR_SLACK))
    tight = jac.plan_jacobian(512, 1, 50_000, acts=500, itemsize=8, memory_bytes=room, in_place=True)
    assert tight.path == "direct" and tight.bytes <= int(2.1 * 512 * 50_000 * 8)


def test_planned_chunk_keeps_the_modelled_block_within_the_budget():
    for budget in (48 << 20, 64 << 20, 1 << 30):
        plan = jac.plan_jacobian(512, 3, 5_000, acts=300, itemsize=8, memory_bytes=budget, device="cuda")
        assert plan.bytes <= budget or plan.chunk == 1


def test_activation_numel_of_a_tanh_mlp_is_what_backward_keeps_per_input():
    # Linear(in→h) keeps x (in), tanh keeps its output (h), Linear(h→out) keeps its input (h),
    # and the output itself (out): 10 + 32 + 32 + 1 = 75 per input
    model, params, fn, X = mlp_case(inp=10, hidden=(32,), out=1)
    assert jac.activation_numel(fn, params, X) == 75


def test_buffer_too_small_is_refused():
    model, params, fn, X = mlp_case()
    with pytest.raises(ValueError, match="cannot hold"):
        jac.jacobian(fn, params, X, chunk=3, out=torch.empty(3, 5, dtype=F64))


# --- hidden activations -------------------------------------------------------------------------
def test_captured_mlp_activations_are_the_hidden_layers_and_their_linear_sources():
    model, params, fn, X = mlp_case(activation="relu")
    hidden = acts.capture_hidden(model, params, X, batch_size=4)
    assert list(hidden.activations) == ["1", "3"]
    assert hidden.fed_by == {"1": "0", "3": "2"}
    h1 = torch.relu(X @ params["0.weight"].T + params["0.bias"])
    h2 = torch.relu(h1 @ params["2.weight"].T + params["2.bias"])
    torch.testing.assert_close(hidden.activations["1"], h1)
    torch.testing.assert_close(hidden.activations["3"], h2)


class NormedNet(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear -> GELU (the same module twice) -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.act(self.mid(self.norm(self.act(self.inp(x))))))


def test_hidden_layers_of_other_modules_are_their_activation_modules_one_per_call():
    model = NormedNet().to(F64)
    assert acts.hidden_layer_names(model) == ["act"]
    params = dict(model.named_parameters())
    hidden = acts.capture_hidden(model, {**params, **dict(model.named_buffers())}, torch.randn(5, 3, dtype=F64))
    assert list(hidden.activations) == ["act", "act#1"]
    assert hidden.fed_by == {"act": "inp", "act#1": "mid"}


def test_distinct_rows_joins_rows_within_tolerance():
    A = torch.tensor([[0.0, 1.0], [0.0, 1.0 + 1e-12], [1.0, 0.0], [0.0, 0.0]], dtype=F64)
    assert acts.distinct_rows(A, tol=1e-6) == 3
    assert acts.distinct_rows(A, tol=1e-14) == 4


def test_dead_units_are_zero_on_every_input():
    A = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1e-9], [0.0, 1.0, 0.0]], dtype=F64)
    assert acts.dead_units(A, tol=1e-6).tolist() == [True, False, True]
    assert acts.dead_units(A, tol=1e-12).tolist() == [True, False, False]


def test_parallel_pairs_counts_rows_in_the_same_direction_only():
    # rows 0, 1 (2x row 0) and 3 (3x row 0) are parallel: 3 pairs; row 2 is antiparallel, row 4 zero
    v = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    rows = torch.stack([v, 2 * v, -v, 3 * v, torch.zeros(3, dtype=F64)])
    assert acts.parallel_pairs(rows, tol=1e-9) == 3


@pytest.mark.cuda
def test_jacobian_and_gram_on_cuda_equal_cpu():
    model, params, fn, X = mlp_case()
    J = jac.jacobian(fn, params, X, chunk=3)
    model_gpu = model.to("cuda")
    params_gpu = {k: v.to("cuda") for k, v in params.items()}
    fn_gpu = lambda p, x: functional_call(model_gpu, p, (x,))  # noqa: E731
    torch.testing.assert_close(jac.jacobian(fn_gpu, params_gpu, X.cuda(), chunk=3).cpu(), J)
    gram = jac.jacobian_gram(fn_gpu, params_gpu, X.cuda(), chunk=3, side="outputs", jvp_chunk=2)
    torch.testing.assert_close(gram.cpu(), J @ J.T)
