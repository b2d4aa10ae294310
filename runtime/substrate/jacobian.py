"""Per-input Jacobians of a network's outputs with respect to its parameters.

For a network with outputs ``f(θ, x) ∈ R^out``, ``n`` parameters ``θ`` and
inputs ``x_1 … x_k``, the rows of the Jacobian are the *behavioral gradients*
(Hebbar 2022, "Information loss → basin flatness"):

    J[(i, o), :] = ∂ f_o(θ, x_i) / ∂θ,        J ∈ R^{(k·out) × n}, row (i, o) at i·out + o,

with the columns in the order of the parameter dict (the flat-vector order).
``J Jᵀ`` is the empirical neural tangent kernel (Jacot, Gabriel & Hongler 2018);
``(2/N)·Jᵀ J`` is the Gauss-Newton part of the MSE Hessian.

Ways to build it, all on ``torch.func`` and chunked over inputs:

- ``reverse``: ``vmap`` over inputs of ``jacrev`` of the single-input function,
  one vectorized vjp per row; cost ∝ out backward passes per input. For a
  :class:`ModuleNetwork` whose parameters all sit in ``nn.Linear`` layers, the
  per-example-gradient identity instead (Goodfellow 2015): for z = a Wᵀ + b,
  ``∂f_o(x_i)/∂W = δ_i ⊗ a_i`` and ``∂f_o(x_i)/∂b = δ_i`` with ``δ_i = ∂f_o(x_i)/∂z_i``;
  inputs do not interact, so every ``δ_i`` comes from one backward pass of
  ``Σ_i f_o(x_i)``, and the outer products are written straight into ``J``.
- ``forward``: jvp columns, one vectorized jvp per parameter through each input
  chunk; cost ∝ n forward passes per input. Inputs are independent, so the
  choice is per input: forward only when ``n < out`` (:func:`choose_mode`).
- ``gram``: when ``rows·n`` does not fit the memory budget, the Gram matrix on
  the smaller side instead of ``J``: ``Jᵀ J = Σ_a J_aᵀ J_a`` accumulated over
  input chunks ``a`` (when ``n ≤ rows``), or ``J Jᵀ`` block column by block
  column, ``(J Jᵀ)[:, a] = J (J_aᵀ)``, the rows of ``J_a`` pushed through the
  network as jvp tangents (when ``rows < n``). Its eigenvalues are the squared
  singular values of ``J``.

Numerical rank follows ``numpy.linalg.matrix_rank`` (Press et al., Numerical
Recipes, §2.6): ``rank = #{σ_i > rtol·σ_max}`` with ``rtol = max(rows, n)·eps``.
A Gram matrix ``G`` of size ``m`` is itself rounded at ``m·eps·λ_max``, so its
eigenvalues resolve singular values of ``J`` only down to ``sqrt(m·eps)·σ_max``.

The network is passed as ``fn(params, x_batch) -> outputs`` with ``params`` a
dict of tensors (outputs ``(batch, out)`` or ``(batch,)``), differentiable under
``torch.func`` transforms, e.g. ``functional_call(model, params, (x,))``.
Differentiating with respect to the dict, not a flat vector, spares the
concatenation that the backward of ``torch.split`` would make of every row.

Example: the Jacobian of a linear map ``x ↦ W x`` has rows ``e_o ⊗ x_i``::

    >>> W = torch.zeros(2, 3, dtype=torch.float64)
    >>> X = torch.eye(3, dtype=torch.float64)
    >>> J = jacobian(lambda p, x: x @ p["W"].T, {"W": W}, X, chunk=2)
    >>> J.shape, svd_spectrum(J).rank
    (torch.Size([6, 6]), 6)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch.func import functional_call, jacrev, jvp, vmap

NetworkFn = Callable[[dict, torch.Tensor], torch.Tensor]
Params = dict  # name -> tensor, in flat-vector order

DEFAULT_MEMORY_BYTES = 1 << 30
# On CPU glibc hands blocks above 32 MiB back to the OS when freed, and faulting the
# pages in again costs more than computing the block: keep per-chunk blocks below it.
CPU_BLOCK_BYTES = 24 << 20


class _NoProgress:
    def advance(self, n: int = 1) -> None:
        pass


# --- columns: the parameter tensors that J is taken with respect to ----------------------
class Columns:
    """A selection of parameter tensors and their column offsets in ``J``."""

    def __init__(self, params: Params, names: Sequence[str] | None = None):
        names = list(params) if names is None else list(names)
        unknown = [name for name in names if name not in params]
        if unknown:
            raise KeyError(f"no parameters named {unknown}; known: {list(params)}")
        self.names = names
        self.shapes = [params[name].shape for name in names]
        self.numels = [params[name].numel() for name in names]
        self.offsets = [0]
        for numel in self.numels:
            self.offsets.append(self.offsets[-1] + numel)
        self.n = self.offsets[-1]

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def flatten(self, params: Params) -> torch.Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        pieces = torch.split(flat, self.numels)
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}


class ModuleNetwork:
    """``fn(params, x)`` of an ``nn.Module``: its outputs flattened per input, then
    ``select``-ed (e.g. one output, or their sum). Knowing the module lets
    :func:`jacobian_block` use the per-example-gradient identity of its linear layers."""

    def __init__(self, model: torch.nn.Module, buffers: dict | None = None,
                 select: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.buffers = dict(model.named_buffers()) if buffers is None else buffers
        self.select = select or (lambda outputs: outputs)
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.select(functional_call(self.model, (params, self.buffers), (x,)).reshape(len(x), -1))

    def per_example_identity(self, params: Params, X: torch.Tensor, names: Sequence[str] | None = None) -> bool:
        """Whether :meth:`linear_block` applies to these tensors (tried on one input)."""
        detached = {k: v.detach() for k, v in params.items()}
        return self._linear_forward(detached, X[:1], Columns(params, names)) is not None

    def _linear_forward(self, params: Params, X: torch.Tensor, cols: "Columns"):
        """``(outputs, calls, layers)`` of a forward pass that records each wanted layer's
        input and output, or None when the identity does not apply (a wanted tensor
        outside an ``nn.Linear``, a layer called more than once or on inputs that are
        not ``(batch, features)``)."""
        layers = []
        for name in cols.names:
            module, _, leaf = name.rpartition(".")
            if module not in self.linears or leaf not in ("weight", "bias"):
                return None
            layers.append(module)
        calls: dict[str, list] = {module: [] for module in dict.fromkeys(layers)}
        handles = [self.linears[m].register_forward_hook(
            lambda _, inputs, output, m=m: calls[m].append((inputs[0], output))) for m in calls]
        try:
            with torch.enable_grad():
                wanted = {k: v.detach().requires_grad_(k in cols.names) for k, v in params.items()}
                outputs = self(wanted, X)
        finally:
            for handle in handles:
                handle.remove()
        if any(len(c) != 1 or c[0][0].dim() != 2 for c in calls.values()):
            return None
        return outputs, calls, layers

    def linear_block(self, params: Params, X: torch.Tensor, cols: "Columns",
                     allocate: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
        """The block of ``J`` on ``X`` by the per-example-gradient identity, or None when it
        does not apply (see :meth:`_linear_forward`)."""
        recorded = self._linear_forward(params, X, cols)
        if recorded is None:
            return None
        outputs, calls, layers = recorded
        k, out = outputs.shape
        J = allocate(k * out)
        per_input = J.view(k, out, cols.n)
        modules = list(calls)
        for o in range(out):
            deltas = torch.autograd.grad(outputs[:, o].sum(), [calls[m][0][1] for m in modules],
                                         retain_graph=o < out - 1, allow_unused=True)
            delta_of = dict(zip(modules, deltas))
            for name, module in zip(cols.names, layers):
                delta = delta_of[module]
                target = per_input[:, o, cols.slice(name)]
                if delta is None:  # the layer does not reach this output
                    target.zero_()
                elif name.endswith("weight"):
                    a = calls[module][0][0].detach()
                    torch.mul(delta.unsqueeze(2), a.unsqueeze(1), out=target.view(k, delta.shape[1], a.shape[1]))
                else:
                    target.copy_(delta)
        return J


def _rows(fn: NetworkFn, params: Params, x: torch.Tensor) -> torch.Tensor:
    """The outputs of ``x`` as one vector of ``len(x)·out`` rows (input-major)."""
    return fn(params, x).reshape(-1)


def _flat_function(fn: NetworkFn, params: Params, cols: Columns, X: torch.Tensor):
    """``h(p) = rows of X at θ with θ[cols] = p``: the batch as a function of a flat vector."""
    return lambda p: _rows(fn, {**params, **cols.unflatten(p)}, X)


# --- memory model ---------------------------------------------------------------------------
def activation_numel(fn: NetworkFn, params: Params, X: torch.Tensor) -> int:
    """Elements the forward pass keeps for backward, per input (an estimate of its activations).

    Counts the tensors saved for backward on one and on two inputs; the difference
    is what one more input costs (the weights, saved for both, cancel).
    """
    counts = []
    for m in (1, 2) if len(X) >= 2 else (1,):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        leaves = {name: t.detach().requires_grad_(True) for name, t in params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(leaves, X[:m])
        counts.append(total + out.numel())
    return max(counts[1] - counts[0], 1) if len(counts) == 2 else max(counts[0], 1)


@dataclass(frozen=True)
class JacobianPlan:
    """How a Jacobian (or its Gram matrix) is computed within a memory budget.

    ``path``: ``direct`` (J itself) or ``gram``; ``side``: for the Gram path,
    ``outputs`` (J Jᵀ, rows × rows) or ``params`` (Jᵀ J, n × n); ``mode``:
    ``reverse`` or ``forward``; ``chunk``: inputs per vmap chunk; ``jvp_chunk``:
    inputs per jvp block of the ``outputs`` Gram; ``bytes``: the modelled peak.
    """

    path: Literal["direct", "gram"]
    mode: Literal["reverse", "forward"]
    chunk: int
    rows: int
    n: int
    side: Literal["outputs", "params"] | None = None
    jvp_chunk: int = 0
    bytes: int = 0


def choose_mode(n: int, out: int) -> Literal["reverse", "forward"]:
    """jvp columns when a parameter column is cheaper than an output row, else vjp rows.

    Inputs are independent, so both modes vmap over them and the comparison is
    per input: ``n`` jvps against ``out`` vjps, each about one pass. (The
    black-box rule ``n < k·out`` pays for the k inputs twice in forward mode,
    k·n² in all against k·out·n; measured in ``tests/benchmarks/bench_jacobian.py``.)
    """
    return "forward" if n < out else "reverse"


FORWARD_COLUMNS = 64  # one-hot tangents pushed at once in forward mode
ALLOCATOR_SLACK = 0.2  # share of the budget left out of the plan (measured in bench_jacobian.py)


def block_bytes(mode: str, chunk: int, out: int, n: int, acts: int, item: int) -> int:
    """Modelled peak of building the Jacobian block of ``chunk`` inputs, the block included."""
    block = chunk * out * n
    if mode == "reverse":
        # saved activations, out cotangents through them, the per-tensor gradients
        return (chunk * (acts + out * acts) + 2 * block) * item
    cols = min(n, FORWARD_COLUMNS)
    return (cols * (n + chunk * (acts + out)) + block + chunk * out * cols) * item


def plan_jacobian(k: int, out: int, n: int, *, acts: int, itemsize: int,
                  memory_bytes: int = DEFAULT_MEMORY_BYTES, chunk: int | None = None,
                  mode: Literal["auto", "reverse", "forward"] = "auto",
                  path: Literal["auto", "direct", "gram"] = "auto",
                  device: torch.device | str = "cpu", in_place: bool = False) -> JacobianPlan:
    """Pick the path and chunk sizes for ``k`` inputs, ``out`` outputs each, ``n`` parameters.

    ``direct`` when J and the copy that its SVD takes fit the budget, else the
    Gram matrix on the smaller side. Raises ``MemoryError`` when even the Gram
    matrix (and its eigendecomposition) does not fit. A given ``chunk`` is used as is.
    ``in_place``: the network writes its blocks straight into ``J``
    (:meth:`ModuleNetwork.per_example_identity`), so a direct chunk costs only its
    activations and cotangents, and one chunk of all inputs spares per-chunk passes.
    """
    rows = k * out
    mode = choose_mode(n, out) if mode == "auto" else mode
    item = itemsize
    # the model counts tensors; the allocator's fragmentation and the interpreter come on top
    budget, memory_bytes = memory_bytes, int(memory_bytes * (1 - ALLOCATOR_SLACK))

    def cost(c):
        return block_bytes(mode, c, out, n, acts, item)

    def fit(room):
        c = _largest_chunk(cost, room, k)
        if torch.device(device).type == "cpu":
            c = min(c, max(1, CPU_BLOCK_BYTES // max(out * n * item, 1)))
        return chunk or c

    j_bytes = rows * n * item
    if path == "auto":
        path = "direct" if 2 * j_bytes + cost(1) <= memory_bytes else "gram"
    if path == "direct":
        if in_place and mode == "reverse":
            def cotangents(c):
                return c * (acts + out * acts) * item
            c = chunk or _largest_chunk(cotangents, memory_bytes - 2 * j_bytes, k)
            return JacobianPlan("direct", mode, c, rows, n, bytes=2 * j_bytes + cotangents(c))
        c = fit(memory_bytes - 2 * j_bytes)
        return JacobianPlan("direct", mode, c, rows, n, bytes=2 * j_bytes + cost(c))

    side = "params" if n <= rows else "outputs"
    m = min(rows, n)
    g_bytes = 2 * m * m * item      # G and the workspace of its eigendecomposition
    if g_bytes > memory_bytes:
        raise MemoryError(
            f"the Gram matrix of the {rows} x {n} Jacobian is {m} x {m} "
            f"({g_bytes / 2**20:.3g} MiB with its eigendecomposition), over the memory budget of "
            f"{budget / 2**20:.3g} MiB (less {ALLOCATOR_SLACK:.0%} slack)")
    room = memory_bytes - g_bytes
    if side == "params":
        c = fit(room)
        return JacobianPlan("gram", mode, c, rows, n, side, 0, g_bytes + cost(c))
    c = fit(room // 2)
    # jvp of the c·out rows of J_a through b inputs: the batched-weight products copy the
    # tangents once (c·out·n), then tangent activations and outputs per (tangent, input)

    def push_cost(b):
        return c * out * (n + b * (acts + 2 * out)) * item

    jb = _largest_chunk(push_cost, room - cost(c), k)
    return JacobianPlan("gram", mode, c, rows, n, side, jb, g_bytes + cost(c) + push_cost(jb))


def _largest_chunk(cost: Callable[[int], int], room: int, k: int) -> int:
    """The largest c in [1, k] with cost(c) <= room (at least 1: one input always runs)."""
    lo, hi = 1, max(k, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- J itself ---------------------------------------------------------------------------
def jacobian_block(fn: NetworkFn, params: Params, X: torch.Tensor, *, names: Sequence[str] | None = None,
                   mode: Literal["reverse", "forward"] = "reverse", out: torch.Tensor | None = None) -> torch.Tensor:
    """Jacobian of the outputs on ``X`` with respect to the tensors ``names`` (default all).

    One chunk, no further chunking over inputs. Returns ``(len(X)·out, n_columns)``,
    written into ``out`` when given (a buffer reused across chunks spares the allocation).
    """
    params = {name: t.detach() for name, t in params.items()}
    cols = Columns(params, names)
    if mode == "reverse" and isinstance(fn, ModuleNetwork):
        J = fn.linear_block(params, X, cols, lambda rows: _buffer(out, rows, cols.n, params))
        if J is not None:
            return J
    if mode == "reverse":
        sub = {name: params[name] for name in cols.names}

        def single(sub, x):
            return _rows(fn, {**params, **sub}, x.unsqueeze(0))

        per_tensor = vmap(jacrev(single), in_dims=(None, 0))(sub, X)   # name -> (len(X), out, *shape)
        rows = per_tensor[cols.names[0]].shape[0] * per_tensor[cols.names[0]].shape[1]
        J = _buffer(out, rows, cols.n, params)
        for name in cols.names:
            J[:, cols.slice(name)] = per_tensor[name].reshape(rows, -1)
        return J
    if mode == "forward":
        h = _flat_function(fn, params, cols, X)
        p = cols.flatten(params)

        def push(t):
            return jvp(h, (p,), (t,))[1]

        J = None
        for c0 in range(0, cols.n, FORWARD_COLUMNS):
            c1 = min(c0 + FORWARD_COLUMNS, cols.n)
            basis = torch.zeros(c1 - c0, cols.n, dtype=p.dtype, device=p.device)
            basis[:, c0:c1].fill_diagonal_(1)
            columns = vmap(push)(basis)                          # (c1 - c0, rows)
            J = _buffer(out, columns.shape[1], cols.n, params) if J is None else J
            J[:, c0:c1] = columns.T
        return J
    raise ValueError(f"unknown mode {mode!r}: use 'reverse' or 'forward'")


def _buffer(out: torch.Tensor | None, rows: int, n: int, params: Params) -> torch.Tensor:
    if out is None:
        first = next(iter(params.values()))
        return torch.empty(rows, n, dtype=first.dtype, device=first.device)
    if out.shape[0] < rows or out.shape[1] != n:
        raise ValueError(f"buffer of shape {tuple(out.shape)} cannot hold a {rows} x {n} block")
    return out[:rows]


def jacobian(fn: NetworkFn, params: Params, X: torch.Tensor, *, chunk: int,
             mode: Literal["reverse", "forward"] = "reverse", names: Sequence[str] | None = None,
             out: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """``J`` of the outputs on all of ``X``, ``chunk`` inputs at a time: ``(len(X)·out, n_columns)``.

    Written into ``out`` when given: a fresh J of a few hundred MB costs more in page
    faults on CPU than its computation, so callers that repeat it keep one buffer.
    """
    progress = progress or _NoProgress()
    cols = Columns(params, names)
    n_out = _rows(fn, {k: v.detach() for k, v in params.items()}, X[:1]).numel()
    J = _buffer(out, len(X) * n_out, cols.n, params)
    out = n_out
    for start in range(0, len(X), chunk):
        stop = min(start + chunk, len(X))
        jacobian_block(fn, params, X[start:stop], names=names, mode=mode, out=J[start * out:stop * out])
        progress.advance(1)
    return J


# --- its Gram matrix --------------------------------------------------------------------------
def jacobian_gram(fn: NetworkFn, params: Params, X: torch.Tensor, *, chunk: int,
                  side: Literal["outputs", "params"], jvp_chunk: int | None = None,
                  mode: Literal["reverse", "forward"] = "reverse", names: Sequence[str] | None = None,
                  progress=None) -> torch.Tensor:
    """The Gram matrix of ``J`` (restricted to the tensors ``names``) without holding ``J``.

    ``side="params"``: ``Jᵀ J = Σ_a J_aᵀ J_a`` (n × n), one Jacobian block at a time.
    ``side="outputs"``: ``J Jᵀ`` (rows × rows): for each input chunk ``a`` the
    block ``J_a`` is computed once, and ``J_b J_aᵀ`` for the chunks ``b`` after
    ``a`` comes from jvps of the network on ``b`` in the directions of ``J_a``'s rows.
    """
    progress = progress or _NoProgress()
    params = {name: t.detach() for name, t in params.items()}
    cols = Columns(params, names)
    first = next(iter(params.values()))
    out = _rows(fn, params, X[:1]).numel()
    buffer = torch.empty(min(chunk, len(X)) * out, cols.n, dtype=first.dtype, device=first.device)
    if side == "params":
        gram = torch.zeros(cols.n, cols.n, dtype=first.dtype, device=first.device)
        for start in range(0, len(X), chunk):
            block = jacobian_block(fn, params, X[start:start + chunk], names=names, mode=mode, out=buffer)
            gram.addmm_(block.T, block)
            progress.advance(1)
        return gram
    if side != "outputs":
        raise ValueError(f"unknown side {side!r}: use 'outputs' or 'params'")

    rows = len(X) * out
    jvp_chunk = jvp_chunk or len(X)
    p = cols.flatten(params)
    gram = torch.zeros(rows, rows, dtype=first.dtype, device=first.device)
    for start in range(0, len(X), chunk):
        stop = min(start + chunk, len(X))
        block = jacobian_block(fn, params, X[start:stop], names=names, mode=mode, out=buffer)
        ra = slice(start * out, stop * out)
        gram[ra, ra] = block @ block.T
        for b0 in range(stop, len(X), jvp_chunk):
            b1 = min(b0 + jvp_chunk, len(X))
            h = _flat_function(fn, params, cols, X[b0:b1])
            cross = vmap(lambda t, h=h: jvp(h, (p,), (t,))[1])(block)      # (rows_a, rows_b) = J_a J_bᵀ
            rb = slice(b0 * out, b1 * out)
            gram[ra, rb] = cross
            gram[rb, ra] = cross.T
        progress.advance(1)
    return gram


# --- spectra and numerical rank ---------------------------------------------------------------
@dataclass(frozen=True)
class Spectrum:
    """Singular values of ``J`` (descending) and the numerical rank decided on them.

    ``threshold`` is the absolute singular-value threshold (σ > threshold counts);
    ``rtol`` the relative one it came from; ``source`` is ``svd`` or ``gram``.
    """

    singular_values: torch.Tensor
    rank: int
    threshold: float
    rtol: float
    source: str


def default_rtol(shape: Sequence[int], dtype: torch.dtype) -> float:
    """``max(rows, cols)·eps``: the rounding level of an SVD of a matrix of this shape."""
    return max(shape) * torch.finfo(dtype).eps


def numerical_rank(singular_values: torch.Tensor, rtol: float) -> tuple[int, float]:
    """``(#{σ > rtol·σ_max}, rtol·σ_max)`` of descending singular values."""
    if singular_values.numel() == 0:
        return 0, 0.0
    threshold = rtol * float(singular_values[0])
    return int((singular_values > threshold).sum()), threshold


def svd_spectrum(matrix: torch.Tensor, rtol: float | None = None) -> Spectrum:
    """Singular values and numerical rank of ``matrix`` (rank: σ > rtol·σ_max)."""
    rtol = default_rtol(tuple(matrix.shape), matrix.dtype) if rtol is None else rtol
    if matrix.numel() == 0:
        return Spectrum(matrix.new_zeros(0), 0, 0.0, rtol, "svd")
    rows, cols = matrix.shape[-2:]
    if cols > 1.5 * rows:
        # A wide J (k·outputs rows, n parameters): its singular values are those of the square
        # triangular factor of Jᵀ = QR, as accurate (Householder QR is backward stable, and no
        # Gram matrix squares the condition number) and 2.1-2.5x faster for 2,560 x 4,810 here (two runs).
        matrix = torch.linalg.qr(matrix.mT, mode="r").R
    sv = torch.linalg.svdvals(matrix)
    rank, threshold = numerical_rank(sv, rtol)
    return Spectrum(sv, rank, threshold, rtol, "svd")


def gram_floor(size: int, dtype: torch.dtype) -> float:
    """The smallest relative singular-value tolerance a Gram matrix of ``size`` resolves: sqrt(m·eps)."""
    return math.sqrt(default_rtol((size, size), dtype))


def gram_spectrum(gram: torch.Tensor, n_singular: int, rtol: float | None = None) -> Spectrum:
    """Singular values of ``J`` from a Gram matrix ``J Jᵀ`` or ``Jᵀ J`` (the top ``n_singular``).

    Rank counts σ above ``max(rtol, sqrt(m·eps))·σ_max``: below ``m·eps·λ_max``
    (the Gram's own rounding) eigenvalues are noise, so a smaller ``rtol`` is
    raised to the floor. Eigenvalues rounded below zero are set to zero.
    """
    m = gram.shape[0]
    rel = max(rtol or 0.0, gram_floor(m, gram.dtype))
    # eigvalsh reads the lower triangle only: no symmetrized copy of a matrix sized to the budget
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)[:n_singular]
    sv = eig.sqrt()
    rank, threshold = numerical_rank(sv, rel)
    return Spectrum(sv, rank, threshold, rel, "gram")


def jacobian_spectrum(fn: NetworkFn, params: Params, X: torch.Tensor, plan: JacobianPlan, *,
                      names: Sequence[str] | None = None, rtol: float | None = None,
                      progress=None) -> Spectrum:
    """The singular values and rank of ``J`` (restricted to ``names``) along ``plan``.

    On the Gram path the side is chosen per call by the shape of the block.
    """
    n_cols = Columns(params, names).n
    if plan.path == "direct":
        J = jacobian(fn, params, X, chunk=plan.chunk, mode=plan.mode, names=names, progress=progress)
        return svd_spectrum(J, rtol)
    side = "params" if n_cols <= plan.rows else "outputs"
    gram = jacobian_gram(fn, params, X, chunk=plan.chunk, side=side, jvp_chunk=plan.jvp_chunk,
                         mode=plan.mode, names=names, progress=progress)
    return gram_spectrum(gram, min(plan.rows, n_cols), rtol)
