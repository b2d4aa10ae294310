"""Training in a subspace of parameter space, the bases it uses, and subspace overlaps.

Intrinsic dimension (Li, Farkhoor, Liu & Yosinski 2018, "Measuring the intrinsic
dimension of objective landscapes", ICLR): freeze the initialization θ0 and a
projection P (n x d), and train only z ∈ R^d in

    θ(z) = θ0 + P z,        z0 = 0,

so gradients are ∂L/∂z = Pᵀ ∇L(θ). d_int90 is the smallest d whose trained model reaches
90% of the performance of the unrestricted model trained the same way.

Bases (columns of P, most important first, so the first d columns span the d-dim space):

``random_dense_basis``     Gaussian columns scaled to unit norm (Li et al.): n·d numbers.
``SparseProjection``       a very sparse random projection (Li, Hastie & Church 2006, KDD):
                           each column has ⌈√n⌉ entries ±1/√⌈√n⌉ at uniformly drawn rows
                           (duplicates summed, then the column is rescaled to unit norm);
                           d·√n numbers, so a d = 1000 subspace of a 10⁶-parameter model
                           costs 10⁶ entries instead of 10⁹.
``principal_directions``   the top left singular vectors of a stack of vectors (uncentered
                           PCA): of the displacements θ_t − θ_0 of a training trajectory, the
                           "lottery subspace" of Larsen, Fort, Becker & Ganguli 2022 ("How many
                           degrees of freedom do we need to train deep networks", ICLR), or of
                           minibatch gradients at a point (Gur-Ari, Roberts & Dyer 2018, "Gradient
                           descent happens in a tiny subspace", arXiv:1812.04754).
``IdentityProjection``     P = I: the unrestricted model, trained by the same loop.

Batching. A run trains several models at once: ``groups`` independent bases (the random
repeats; one for a deterministic basis) times several dims per basis, model (g, s) using
the first d_s columns of basis g. All coordinates live in one tensor Z (g, Σ_s d_s); one
step forms every θ_{g,s}, evaluates all losses with ``torch.func.vmap`` over
``functional_call`` on a shared minibatch, and takes the gradient of their sum, which is
each model's own gradient because the models share no coordinates. The optimizers of
:mod:`basinprobe.runtime.train` (SGD, Adam, AdamW) act elementwise, so one optimizer on Z
is exactly one optimizer per model, and the batched run equals a loop of single runs.

Subspace overlap of two subspaces with orthonormal bases U (n x k_a) and V (n x k_b):

    overlap(U, V) = ‖Uᵀ V‖_F² / min(k_a, k_b)  ∈ [0, 1],

1 for equal spaces, 0 for orthogonal ones, and k/n in expectation for two independent
uniformly random k-dim subspaces of R^n (Gur-Ari et al. 2018 use it for Hessian eigenspaces
at different times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, vmap

from basinprobe.runtime.substrate.compiled import maybe_compile
from basinprobe.runtime.train import make_optimizer

# Singular values below this fraction of the largest are a null direction, not a basis vector
# (the Gram route squares them, so float64 resolves ratios down to about 1e-8).
RANK_RTOL = 1e-6


# --- projections ---------------------------------------------------------------------------
class Projection:
    """Maps coordinates z (g, d) to parameter offsets P_g[:, :d] z_g (g, n), for d ≤ ``dim``."""

    kind = ""
    groups: int
    n: int
    dim: int

    def __call__(self, z: torch.Tensor, d: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return 0


class DenseProjection(Projection):
    """Explicit columns ``matrices`` (g, n, d) (or one basis (n, d))."""

    kind = "dense"

    def __init__(self, matrices: torch.Tensor):
        if matrices.dim() == 2:
            matrices = matrices[None]
        self.groups, self.n, self.dim = matrices.shape
        # Stored as rows (g, d, n): the first d directions are then a contiguous prefix, and a
        # product with them copies nothing (slicing columns of (g, n, d) copied P every step).
        self.rows = matrices.transpose(1, 2).contiguous()

    def __call__(self, z, d):
        return torch.bmm(z[:, None, :], self.rows[:, :d]).squeeze(1)

    @property
    def matrices(self) -> torch.Tensor:
        return self.rows.transpose(1, 2)

    @property
    def nbytes(self):
        return self.rows.numel() * self.rows.element_size()


class SparseProjection(Projection):
    """A very sparse random projection, stored as (row, column, value) triplets per group.

    Applied as an ``index_add`` of value·z[column] into the rows: work and memory scale
    with the d·⌈√n⌉ nonzeros, never with n·d.
    """

    kind = "sparse"

    def __init__(self, n: int, d: int, groups: int, generator: torch.Generator, dtype=torch.float32,
                 device="cpu", nonzeros_per_column: int | None = None):
        self.n, self.dim, self.groups = n, d, groups
        c = nonzeros_per_column or math.ceil(math.sqrt(n))
        rows = torch.randint(0, n, (groups, d, c), generator=generator)
        signs = torch.randint(0, 2, (groups, d, c), generator=generator).to(torch.float64) * 2 - 1
        # Sum duplicate (row, column) pairs, then give every column unit norm exactly.
        key = (torch.arange(groups)[:, None, None] * d + torch.arange(d)[None, :, None]) * n + rows
        unique, inverse = torch.unique(key.reshape(-1), return_inverse=True)
        values = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, signs.reshape(-1))
        keep = values != 0
        unique, values = unique[keep], values[keep]
        column = unique // n                       # g·d + j
        norms = torch.zeros(groups * d, dtype=torch.float64).index_add_(0, column, values**2).sqrt()
        values = values / norms[column]
        # Entries sorted by column (unique sorts by key), so the first d columns are a prefix.
        self.group = (column // d).to(device)
        self.column = (column % d).to(device)
        self.row = (unique % n).to(device)
        self.values = values.to(device=device, dtype=dtype)
        self._prefix: dict[int, tuple] = {}

    def _entries(self, d: int):
        if d not in self._prefix:
            mask = self.column < d
            self._prefix[d] = (self.group[mask] * self.n + self.row[mask], self.group[mask] * d + self.column[mask],
                               self.values[mask])
        return self._prefix[d]

    def __call__(self, z, d):
        rows, cols, values = self._entries(d)
        flat = z.reshape(-1)[cols] * values
        return torch.zeros(self.groups * self.n, dtype=z.dtype, device=z.device).index_add(0, rows, flat).reshape(
            self.groups, self.n)

    def dense(self) -> torch.Tensor:
        """The explicit (g, n, d) matrices (for tests and small models)."""
        out = torch.zeros(self.groups, self.n, self.dim, dtype=self.values.dtype, device=self.values.device)
        out[self.group, self.row, self.column] = self.values
        return out

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.group, self.column, self.row, self.values))


class IdentityProjection(Projection):
    """P = I: coordinates are the parameters themselves."""

    kind = "identity"

    def __init__(self, n: int):
        self.n, self.dim, self.groups = n, n, 1

    def __call__(self, z, d):
        if d != self.n:
            raise ValueError("the identity projection trains all parameters")
        return z


# --- bases --------------------------------------------------------------------------------
def random_dense_basis(n: int, d: int, groups: int, generator: torch.Generator, dtype=torch.float32,
                       device="cpu") -> torch.Tensor:
    """(groups, n, d) Gaussian columns scaled to unit norm (drawn on the CPU for reproducibility)."""
    matrices = torch.randn(groups, n, d, generator=generator, dtype=torch.float64)
    matrices /= matrices.norm(dim=1, keepdim=True)
    return matrices.to(device=device, dtype=dtype)


def principal_directions(vectors: torch.Tensor, d: int, rtol: float = RANK_RTOL) -> torch.Tensor:
    """The top-``d`` left singular vectors (n, r) of the columns of ``vectors`` (n, m), uncentered.

    Formed from the m x m Gram matrix (m ≪ n: m checkpoints or gradients), in float64.
    r = min(d, rank): directions with singular value below ``rtol`` times the largest are dropped.
    """
    M = vectors.to(torch.float64)
    gram = M.T @ M
    values, vecs = torch.linalg.eigh(gram)
    values, vecs = values.flip(0), vecs.flip(1)
    top = values[0].clamp_min(0)
    if top == 0:
        return M[:, :0].to(vectors.dtype)
    rank = int((values > rtol**2 * top).sum())  # σ_i > rtol·σ_max, with σ² the Gram eigenvalues
    r = min(d, rank)
    U = M @ (vecs[:, :r] / values[:r].sqrt())
    # One Gram–Schmidt pass in float64 removes the loss of orthogonality of the Gram route.
    U, _ = torch.linalg.qr(U)
    return U.to(vectors.dtype)


def trajectory_displacements(trajectory: dict[int, torch.Tensor]) -> torch.Tensor:
    """(n, C − 1): θ_t − θ_{t0} for every stored checkpoint t after the first t0."""
    steps = sorted(trajectory)
    start = trajectory[steps[0]]
    return torch.stack([trajectory[s] - start for s in steps[1:]], dim=1)


def minibatch_gradients(forward: Callable, loss_fn: Callable, theta: torch.Tensor, X: torch.Tensor,
                        y: torch.Tensor, count: int, batch_size: int, generator: torch.Generator,
                        chunk: int = 32) -> torch.Tensor:
    """(n, count): gradients of the loss on ``count`` minibatches of ``batch_size`` examples,
    each drawn without replacement from the ``generator``; ``chunk`` of them per vmapped call."""
    batch = min(batch_size, len(X))

    def loss_of(flat, xb, yb):
        return loss_fn(forward(flat, xb), yb)

    per_batch = vmap(grad(loss_of), in_dims=(None, 0, 0))
    columns = []
    for start in range(0, count, chunk):
        m = min(chunk, count - start)
        idx = torch.stack([torch.randperm(len(X), generator=generator)[:batch] for _ in range(m)]).to(X.device)
        columns.append(per_batch(theta, X[idx], y[idx]).T)
    return torch.cat(columns, dim=1)


# --- overlaps -----------------------------------------------------------------------------
def subspace_overlap(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ V‖_F² / min(k_a, k_b) for orthonormal columns U (n, k_a), V (n, k_b)."""
    k = min(U.shape[1], V.shape[1])
    return float((U.T.to(torch.float64) @ V.to(torch.float64)).pow(2).sum() / k)


def projected_fraction(U: torch.Tensor, g: torch.Tensor) -> float:
    """‖Uᵀ g‖² / ‖g‖²: the fraction of g's squared norm inside span(U) (orthonormal U)."""
    g = g.to(torch.float64)
    return float((U.T.to(torch.float64) @ g).pow(2).sum() / g.pow(2).sum())


# --- training -------------------------------------------------------------------------------
def minibatch_order(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches as :func:`basinprobe.runtime.train.train` draws them: without replacement,
    epoch after epoch, so the same generator seed gives the same sequence."""
    batch = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor:cursor + batch]
        cursor += batch


@dataclass
class SubspaceRun:
    """The result of :func:`train_in_subspace`.

    ``params`` (g, s, n) final parameters θ0 + P_g[:, :d_s] z_{g,s}; ``coordinates`` the
    z's, one (g, d_s) tensor per dim; ``final_batch_loss`` (g, s) the loss of the last
    minibatch; ``diverged`` (g, s) models whose minibatch loss became NaN/inf.
    """

    params: torch.Tensor
    coordinates: list[torch.Tensor]
    final_batch_loss: torch.Tensor
    diverged: torch.Tensor


def train_in_subspace(forward: Callable, loss_fn: Callable, theta0: torch.Tensor, projection: Projection,
                      dims: list[int], X: torch.Tensor, y: torch.Tensor, optimizer, steps: int, batch_size: int,
                      generator: torch.Generator, compile: bool = False, progress=None) -> SubspaceRun:
    """Train z in θ = θ0 + P_g[:, :d] z for every basis g and every d in ``dims`` at once.

    ``optimizer`` is an :class:`basinprobe.runtime.spec.OptimizerSpec` (kind, lr, momentum,
    nesterov, weight_decay, betas); minibatches of ``batch_size`` come from ``generator``
    in the order of :func:`minibatch_order`, the same for every model.
    """
    g, n = projection.groups, theta0.numel()
    if max(dims) > projection.dim:
        raise ValueError(f"dim {max(dims)} exceeds the basis's {projection.dim} directions")
    dims = [int(d) for d in dims]
    s = len(dims)
    Z = torch.zeros(g, sum(dims), dtype=theta0.dtype, device=theta0.device, requires_grad=True)
    opt = make_optimizer([Z], optimizer)

    def loss_of(flat, xb, yb):
        return loss_fn(forward(flat, xb), yb)

    per_model = vmap(loss_of, in_dims=(0, None, None))

    def total_loss(z, xb, yb):
        offsets = torch.stack([projection(part, d) for part, d in zip(torch.split(z, dims, dim=1), dims)], dim=1)
        losses = per_model((theta0 + offsets).reshape(g * s, n), xb, yb)
        return losses.sum(), losses.detach()

    step = maybe_compile(grad(total_loss, has_aux=True), compile, "subspace step")
    diverged = torch.zeros(g * s, dtype=torch.bool, device=theta0.device)
    losses = torch.full((g * s,), float("nan"), dtype=theta0.dtype, device=theta0.device)
    for idx in minibatch_order(len(X), batch_size, steps, generator):
        idx = idx.to(X.device)
        gradient, losses = step(Z.detach(), X[idx], y[idx])
        diverged |= ~torch.isfinite(losses)
        Z.grad = gradient
        opt.step()
        if progress is not None:
            progress.advance(1)
    with torch.no_grad():
        parts = [part.clone() for part in torch.split(Z.detach(), dims, dim=1)]
        params = theta0 + torch.stack([projection(part, d) for part, d in zip(parts, dims)], dim=1)
    return SubspaceRun(params, parts, losses.reshape(g, s), diverged.reshape(g, s))
