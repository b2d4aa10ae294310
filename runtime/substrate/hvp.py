"""Hessian- and Gauss-Newton-vector products of a cell's loss.

The loss is the mean over the examples of a split (all of them, or the first
``batches`` minibatches of ``batch_size``), accumulated batch by batch::

    L(θ) = (1/N) Σ_b N_b ℓ_b(θ),        ℓ_b = loss_fn(f(θ, X_b), y_b)  (a batch mean)

Hessian-vector product (Pearlmutter 1994, "Fast exact multiplication by the Hessian")::

    H v = ∇²L(θ) v = ∇_θ ⟨∇_θ L(θ), v⟩

Generalized Gauss-Newton product (Schraudolph 2002; Martens 2010), with z_b = f(θ, X_b)
the outputs and J_b = ∂z_b/∂θ their Jacobian::

    G v = (1/N) Σ_b N_b J_bᵀ (∇²_z ℓ_b) J_b v

G equals H when the model is linear in θ, and is positive semi-definite for convex
losses of the outputs (MSE, cross-entropy).

Formulation. The gradient graph is built once per operator (``create_graph=True``)
and kept; each product is then one backward pass through it (double backward).
Measured on the trained 26k-parameter MLP of ``tests/benchmarks/bench_curvature.py``
(2-core CPU, torch 2.13, float64): gradient 8.8 ms, cached double backward 12.3 ms,
double backward rebuilding the graph 20.8 ms, ``torch.func`` reverse-over-reverse
23.6 ms, forward-over-reverse 26.3 ms; so the cached graph is the default, and
``cache=False`` (rebuild per product, memory of one batch) is the fallback for data
that do not fit. J v for the GGN uses the double-vjp trick (J v = ∂/∂u ⟨Jᵀu, v⟩)
on the same cached graph.

Blocks. On CUDA a block of vectors is pushed through the graph in one batched backward
(``is_grads_batched``, a vmap over the backward pass). On CPU that measured 1.2x slower per
vector than a loop (14.5 vs 12.3 ms), so there the block is either looped or, where a product
is small enough to be bound by per-operation overhead rather than arithmetic, multiplied as one
product of a stack of copies of the model, vector j by copy j (``REPLICA_WORK``).

Stacked models. Given parameters Θ of shape (m, n), one row per model of the same
architecture (batched cells: seeds, checkpoints), the operator is that of
Σ_j L(θ_j): the forward pass is ``vmap``-ed over the rows, and since the models share
no parameter its curvature is block diagonal, so one product with V (m, n) gives every
model's own product, row by row (A V)_j = A(θ_j) v_j, in one backward pass.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from basinprobe.runtime.substrate.compiled import maybe_compile

# On CPU a block of vectors goes through one product of stacked copies of the model while
# copies x parameters x examples (x models, for stacked models) stays within REPLICA_WORK.
# Against a loop of products (tanh MLPs, float64, torch 2.13, 2 threads), by parameters x examples
# of one copy: 0.07M (387 on 192): 1.5x for 2 copies, 2.2-2.7x for 4-16; 3.3-6.7M: 1.1-1.5x for
# 4-8 copies, but 0.66x for 8 copies of 4.9M (19210 on 256); 0.58-0.81x for 4-8 copies of 1.4M
# on 2048 examples, 7.1M and 27M, where the copies' larger kernels cost more than they save.
REPLICA_WORK = 2_000_000


def loss_batches(ctx, split: str = "train", batches: int | None = None,
                 batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(X_b, y_b, N_b / N)`` for the examples the curvature is measured on.

    ``batches=None`` uses the whole split, ``batch_size=None`` one batch of it;
    ``batches=B`` uses the first ``B`` minibatches of ``batch_size`` (default:
    the spec's ``data.batch_size``).
    """
    X, y = ctx.data.split(split)
    if len(X) == 0:
        raise ValueError(f"the {split!r} split is empty: measure curvature on a split that has examples")
    if batches is not None:
        size = batch_size or ctx.batch_size
        X, y = X[: batches * size], y[: batches * size]
    size = batch_size or len(X)
    total = len(X)
    return [(X[i:i + size], y[i:i + size], len(X[i:i + size]) / total) for i in range(0, total, size)]


class CurvatureOperator:
    """A symmetric ``n x n`` curvature matrix available through products only.

    ``matvec(v)`` and ``matmat(V)`` (columns) count every product in ``count``;
    ``as_linear_operator()`` wraps it for ``scipy.sparse.linalg``.

    With ``params`` of shape (m, n) (stacked models), ``matvec`` maps (m, n) to (m, n)
    and ``matmat`` (m, n, k) to (m, n, k), row j by model j's operator; ``loss_value``
    is then a list of m floats and ``gradient`` (m, n).
    """

    kind = ""

    def __init__(self, ctx, params: torch.Tensor | None = None, split: str = "train",
                 batches: int | None = None, batch_size: int | None = None, cache: bool = True):
        self.ctx = ctx
        self.params = (ctx.flat_params if params is None else params).detach().to(ctx.device, ctx.dtype)
        self.stacked = self.params.dim() == 2
        self.n = self.params.shape[-1]
        self.dtype, self.device = ctx.dtype, ctx.device
        self.split = split
        self.data = loss_batches(ctx, split, batches, batch_size)
        self._batching = (batches, batch_size)
        self.n_examples = sum(len(xb) for xb, _, _ in self.data)
        self.cache = cache
        self.count = 0
        self.copies = 1   # copies of each model stacked in ``params`` (see :meth:`replicated`)
        self._graphs: list | None = None
        self._replicas: dict[int, CurvatureOperator] | None = {}   # None: vmap cannot stack the model
        self.loss_value, self.gradient = self._loss_and_gradient()

    # --- what subclasses provide ------------------------------------------------------
    def _build(self, xb, yb, weight):
        """The autograd pieces one product over a batch needs."""
        raise NotImplementedError

    def _product(self, graph, V: torch.Tensor, batched: bool) -> torch.Tensor:
        """The product of one batch's term with ``V`` ((n,) or, batched, (k, n))."""
        raise NotImplementedError

    # --- the model's outputs and the loss, of one model or of stacked models ----------------
    def _outputs(self, theta: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return vmap(self.ctx.forward, in_dims=(0, None))(theta, xb)
        return self.ctx.forward(theta, xb)

    def _losses(self, z: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The batch-mean loss: a scalar, or (m,) for stacked models."""
        if self.stacked:
            return vmap(self.ctx.loss_fn, in_dims=(0, None))(z, yb)
        return self.ctx.loss_fn(z, yb)

    # --- products ---------------------------------------------------------------------
    def _graphs_iter(self) -> Iterator:
        if self.cache:
            if self._graphs is None:
                self._graphs = [self._build(*batch) for batch in self.data]
            yield from self._graphs
        else:
            for batch in self.data:
                yield self._build(*batch)

    def _apply(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        out = torch.zeros_like(V)
        for graph in self._graphs_iter():
            out += self._product(graph, V, batched)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a vector of length ``n`` (stacked: ``(m, n)``, row by row)."""
        self.count += 1
        return self._apply(v.to(self.device, self.dtype).reshape(self.params.shape), batched=False)

    def matmat(self, V: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``(n, k)`` (stacked: ``(m, n, k)``); ``batched=None`` picks
        the faster way on the device (see the module's "Blocks")."""
        V = V.to(self.device, self.dtype)
        k = V.shape[-1]
        if batched is None:
            batched = self.device.type == "cuda"
        if batched:
            self.count += k
            return self._apply(V.movedim(-1, 0).contiguous(), batched=True).movedim(0, -1)
        limit = min(k, REPLICA_WORK // max(self.params.numel() * self.n_examples, 1))
        # the fewest products of at most `limit` vectors, evened out so the last is padded least
        copies = -(-k // -(-k // limit)) if limit > 1 else 1
        stack = self.replica(copies) if copies > 1 and self._replicable() else None
        if stack is None:
            return torch.stack([self.matvec(V[..., j]) for j in range(k)], dim=-1)
        self.count += k
        return self.through_copies(stack, V)

    def through_copies(self, stack: "CurvatureOperator", V: torch.Tensor) -> torch.Tensor:
        """``A V`` (shapes as :meth:`matmat`) as products of ``stack``, a :meth:`replica` of this
        operator: vector j of each product by copy j, the last product padded with zeros. Counted
        on ``stack``, not here."""
        blocks = V.movedim(-1, 0)                     # (k, [m,] n)
        out = torch.empty_like(blocks)
        for start in range(0, len(blocks), stack.copies):
            block = blocks[start:start + stack.copies]
            width = len(block)
            if width < stack.copies:
                block = torch.cat([block, block.new_zeros(stack.copies - width, *block.shape[1:])])
            out[start:start + width] = stack.matvec(block.reshape(stack.params.shape)).reshape(block.shape)[:width]
        return out.movedim(0, -1)

    def _replicable(self) -> bool:
        """Whether blocks may go through stacked copies on CPU."""
        return True

    def replica(self, copies: int) -> "CurvatureOperator | None":
        """:meth:`replicated`, kept for the next block, or None when vmap cannot stack the model
        (e.g. a forward that reads a tensor's value); that shows in the copies' first forward pass."""
        if self._replicas is not None and copies not in self._replicas:
            try:
                self._replicas[copies] = self.replicated(copies)
            except RuntimeError:
                self._replicas = None
        return None if self._replicas is None else self._replicas[copies]

    def replicated(self, copies: int) -> "CurvatureOperator":
        """The same operator over ``copies`` stacked copies of these parameters (copy-major: of stacked
        models' (m, n), rows c·m .. c·m + m - 1 are copy c): one product then takes ``copies`` vectors
        (or blocks) through a single larger autograd graph."""
        params = self.params.reshape(-1, self.n).repeat(copies, 1)
        stack = type(self)(self.ctx, params, self.split, *self._batching, cache=self.cache)
        stack.copies = copies * self.copies
        return stack

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def as_linear_operator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in and out; products are counted)."""
        from scipy.sparse.linalg import LinearOperator

        if self.stacked:
            raise ValueError("a LinearOperator needs the operator of one model, not of stacked models")

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def matvec(x):
            return self.matvec(torch.as_tensor(np.asarray(x).reshape(-1))).cpu().numpy()

        def matmat(X):
            return self.matmat(torch.as_tensor(np.asarray(X))).cpu().numpy()

        return LinearOperator((self.n, self.n), matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np_dtype)

    # --- the loss and gradient at the operator's point ----------------------------------
    def _loss_and_gradient(self) -> tuple[float | list[float], torch.Tensor]:
        theta = self.params.clone().requires_grad_(True)
        loss = 0.0
        for xb, yb, weight in self.data:
            loss = loss + weight * self._losses(self._outputs(theta, xb), yb)
        (grad,) = torch.autograd.grad(loss.sum(), theta, materialize_grads=True)
        loss = loss.detach()
        return (loss.tolist() if self.stacked else float(loss)), grad.detach()


class HessianOperator(CurvatureOperator):
    """``H v`` by double backward through the (cached) gradient graph.

    With ``ctx.compile`` (``execution: {compile: true}``) the products of one model are
    instead the forward-over-reverse ``torch.func`` HVP, ``jvp(grad(ℓ_b), θ, v)``, a pure
    function of (θ, v, X_b, y_b) that ``torch.compile`` can trace (a cached autograd graph
    cannot be); if compilation fails it runs eagerly (:mod:`compiled`).
    """

    kind = "hessian"

    def __init__(self, ctx, *args, **kwargs):
        super().__init__(ctx, *args, **kwargs)
        self._compiled = None
        if getattr(ctx, "compile", False) and not self.stacked:
            self._compiled = maybe_compile(self._functional_product, True, "hvp")

    def _replicable(self) -> bool:
        return self._compiled is None   # a compiled product stays the one the user asked for

    def _functional_product(self, theta, v, xb, yb):
        def loss(t):
            return self.ctx.loss_fn(self.ctx.forward(t, xb), yb)

        return jvp(grad(loss), (theta,), (v,))[1]

    def _apply(self, V, batched):
        if self._compiled is None:
            return super()._apply(V, batched)
        out = torch.zeros_like(V)
        products = vmap(self._compiled, in_dims=(None, 0, None, None)) if batched else self._compiled
        for xb, yb, weight in self.data:
            out += weight * products(self.params, V, xb, yb)
        return out

    def _build(self, xb, yb, weight):
        theta = self.params.clone().requires_grad_(True)
        loss = weight * self._losses(self._outputs(theta, xb), yb).sum()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return theta, grad

    def _product(self, graph, V, batched):
        theta, grad = graph
        if not grad.requires_grad:  # the loss is linear in θ: its Hessian is zero
            return torch.zeros_like(V)
        (hv,) = torch.autograd.grad(grad, theta, V, retain_graph=True, is_grads_batched=batched,
                                    materialize_grads=True)
        return hv


class GGNOperator(CurvatureOperator):
    """``G v = Jᵀ (∇²_z ℓ) J v`` through cached graphs of the outputs and of ∇_z ℓ."""

    kind = "ggn"

    def _build(self, xb, yb, weight):
        theta = self.params.clone().requires_grad_(True)
        z = self._outputs(theta, xb)
        z_leaf = z.detach().requires_grad_(True)
        loss = weight * self._losses(z_leaf, yb).sum()
        (grad_z,) = torch.autograd.grad(loss, z_leaf, create_graph=True)
        # Jᵀu as a (linear) function of a dummy u: differentiating it in u gives J v.
        u = torch.zeros_like(z, requires_grad=True)
        (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)
        return theta, z, z_leaf, grad_z, u, jt_u

    def _product(self, graph, V, batched):
        theta, z, z_leaf, grad_z, u, jt_u = graph
        opts = dict(retain_graph=True, is_grads_batched=batched, materialize_grads=True)
        (jv,) = torch.autograd.grad(jt_u, u, V, **opts)
        if not grad_z.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(V)
        (hjv,) = torch.autograd.grad(grad_z, z_leaf, jv, **opts)
        (gv,) = torch.autograd.grad(z, theta, hjv, **opts)
        return gv


OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}


def curvature_operator(ctx, operator: str = "hessian", params: torch.Tensor | None = None,
                       split: str = "train", batches: int | None = None, batch_size: int | None = None,
                       cache: bool = True) -> CurvatureOperator:
    """The Hessian (``"hessian"``) or Gauss-Newton (``"ggn"``) operator of ``ctx``'s loss at ``params``
    ((n,), or (m, n) for m stacked models of ``ctx``'s architecture on ``ctx``'s data)."""
    try:
        cls = OPERATORS[operator]
    except KeyError:
        raise ValueError(f"unknown curvature operator {operator!r}: use one of {sorted(OPERATORS)}") from None
    return cls(ctx, params, split, batches, batch_size, cache)
