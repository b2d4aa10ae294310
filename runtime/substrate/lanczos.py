"""Lanczos with full reorthogonalization: extreme eigenpairs and Gauss quadrature nodes.

For a symmetric A (n x n), known through products, j steps of Lanczos build an
orthonormal basis V_j of the Krylov space span{v, Av, ..., A^{j-1}v} with

    A V_j = V_j T_j + f_j e_jᵀ,      T_j = V_jᵀ A V_j  (tridiagonal in exact arithmetic)

(Lanczos 1950). Every new vector is orthogonalized against the whole basis, a second
time when the first pass cancelled most of it (Daniel, Gragg, Kaufman & Stewart 1976;
"twice is enough", Giraud et al. 2005). This keeps V_j orthonormal to rounding and rules
out the ghost copies of converged eigenvalues plain Lanczos produces (Paige 1971).
T_j is filled with the computed projections, so after a restart it holds the
arrowhead block of the kept Ritz vectors exactly.

Eigenpairs (:func:`lanczos`): the Ritz values θ_i of T_j approximate the extreme
eigenvalues. The residual of a Ritz pair is r_i = ‖f_j‖·|s_{j,i}| (s_i the eigenvector
of T_j), and an eigenvalue lies within min(r_i, r_i²/gap_i) of θ_i (Kato-Temple;
Parlett, "The Symmetric Eigenvalue Problem", 11.7), gap_i the distance to the other
Ritz values. The iteration stops as soon as every wanted θ_i has

    min(r_i, r_i²/gap_i) ≤ tol · max(|θ_i|, tol · ‖A‖),

so no product is spent past the requested accuracy; the floor tol·‖A‖ makes an
eigenvalue near zero converge to an absolute error tol²·‖A‖. When the basis reaches
``max_basis`` vectors it is thick-restarted (Wu & Simon 2000, "Thick-restart Lanczos
method for large symmetric eigenvalue problems"): the Ritz vectors of the wanted end
are kept and the iteration continues from the residual, bounding memory at
(max_basis + 1) vectors.

Quadrature (:func:`lanczos_quadrature`): from a unit start vector v, the eigenpairs
(θ_i, s_i) of T_m give the m-node Gauss rule vᵀ f(A) v ≈ Σ_i s_{1,i}² f(θ_i), exact for
polynomials of degree < 2m (Golub & Meurant 1994), used by stochastic Lanczos quadrature.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from basinprobe.runtime.substrate.lockstep import Routine, drive

# Memory the default Lanczos basis may take (restarts start beyond it, or beyond 200 vectors).
BASIS_BYTES = 1 << 30


@dataclass
class Eigenpairs:
    """Extreme eigenpairs of a symmetric operator.

    ``values`` (k,) are sorted from the wanted end (descending for ``top``, ascending
    for ``bottom``); ``vectors`` (n, k) are orthonormal columns on the operator's device;
    ``errors`` (k,) are the estimated absolute errors of the values; ``matvecs`` counts
    the products spent.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    errors: torch.Tensor
    converged: bool
    matvecs: int
    restarts: int = 0
    method: str = "lanczos"


class _Krylov:
    """An orthonormal Krylov basis (rows of ``V``) and the projection ``T = V A Vᵀ``."""

    def __init__(self, matvec: Callable, n: int, size: int, dtype, device, generator: torch.Generator):
        self.matvec, self.n, self.generator = matvec, n, generator
        # empty, not zeros: every row is written before it is read, and zeroing a basis sized for
        # restarts touches far more memory than a run that converges early uses
        self.V = torch.empty(size + 1, n, dtype=dtype, device=device)
        self.T = torch.zeros(size + 1, size + 1, dtype=torch.float64)
        self.j = 0          # products computed for rows 0..j-1; row j is the pending vector
        self.residual = None  # f_j, orthogonal to the basis
        self.beta = 0.0

    def start(self, v: torch.Tensor) -> None:
        self.V[0] = v / v.norm()
        self.j = 0

    def _orthogonalize(self, w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        Q = self.V[:rows]
        before = w.norm()
        h = Q @ w
        w = w - Q.T @ h
        # Second pass only when the first cancelled most of w (Daniel, Gragg, Kaufman & Stewart
        # 1976): then rounding may have left components along Q; otherwise one pass is enough.
        if w.norm() < 0.7 * before:
            h2 = Q @ w
            w, h = w - Q.T @ h2, h + h2
        return w, h

    def pending(self) -> torch.Tensor:
        """The vector whose product the next step needs."""
        return self.V[self.j]

    def step(self) -> None:
        self.accept(self.matvec(self.pending()))

    def accept(self, w: torch.Tensor) -> None:
        """Extend the basis with the product ``w = A v_j`` of the pending vector."""
        j = self.j
        w = w.to(self.V)
        w, h = self._orthogonalize(w, j + 1)
        h = h.to("cpu", torch.float64)
        self.T[: j + 1, j] = h
        self.T[j, : j + 1] = h
        self.residual, self.beta = w, float(w.norm())
        self.j = j + 1

    def advance(self, scale: float) -> None:
        """Make the normalized residual the pending vector (a fresh direction on breakdown)."""
        w = self.residual
        if self.beta <= 1e-12 * max(scale, 1e-300) and self.j < self.n:
            # An invariant subspace: the spectrum seen so far is exact; continue in a
            # random direction orthogonal to it (its coupling to the basis is zero).
            w = torch.randn(self.n, generator=self.generator, dtype=torch.float64).to(self.V)
            w, _ = self._orthogonalize(w, self.j)
        self.V[self.j] = w / w.norm()

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.eigh(self.T[: self.j, : self.j])

    def restart(self, S_keep: torch.Tensor, theta_keep: torch.Tensor) -> None:
        """Keep the Ritz vectors ``V_jᵀ S_keep`` and continue from the residual."""
        l = S_keep.shape[1]
        kept = S_keep.T.to(self.V) @ self.V[: self.j]
        self.V[:l] = kept
        self.T.zero_()
        self.T[:l, :l] = torch.diag(theta_keep)
        self.j = l


def _wanted(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of the Ritz values from the wanted end, most extreme first."""
    return torch.argsort(theta, descending=(which == "top"))


def _error_bounds(theta: torch.Tensor, residuals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if len(theta) == 1:
        return residuals[idx]
    diff = (theta[idx, None] - theta[None, :]).abs()
    diff[torch.arange(len(idx)), idx] = float("inf")
    gap = (diff - residuals[None, :]).min(dim=1).values.clamp_min(1e-300)
    r = residuals[idx]
    return torch.minimum(r, r * r / gap)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, which: str = "top", *,
            tol: float = 1e-4, max_matvecs: int | None = None, max_basis: int | None = None,
            v0: torch.Tensor | None = None, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            progress=None) -> Eigenpairs:
    """The ``k`` largest (``which="top"``) or smallest (``"bottom"``) eigenpairs of a symmetric operator.

    ``matvec`` maps an (n,) tensor to an (n,) tensor. See :func:`lanczos_steps`.
    """
    return drive(lanczos_steps(n, k, which, tol=tol, max_matvecs=max_matvecs, max_basis=max_basis, v0=v0,
                               generator=generator, dtype=dtype, device=device, progress=progress), matvec)


def lanczos_steps(n: int, k: int, which: str = "top", *, tol: float = 1e-4, max_matvecs: int | None = None,
                  max_basis: int | None = None, v0: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu", progress=None) -> Routine:
    """:func:`lanczos` as a coroutine (:mod:`lockstep`): yields each vector to multiply, returns
    the :class:`Eigenpairs`.

    The start vector is ``v0`` or a
    Gaussian drawn from ``generator``. ``max_basis`` bounds the stored basis (thick
    restart beyond it; default: as many vectors as fit in ``BASIS_BYTES``, between 2k + 20
    and 200, at most n); ``max_matvecs``
    bounds the products (default ``max(500, 50 k)``). If the budget runs out first,
    ``converged`` is False and ``errors`` says how far off the values may be.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', not {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"cannot compute {k} eigenpairs of an operator of size {n}")
    generator = generator or torch.Generator().manual_seed(0)
    itemsize = torch.finfo(dtype).bits // 8
    size = min(n, max_basis or max(2 * k + 20, min(200, BASIS_BYTES // (n * itemsize))))
    if size < min(n, k + 2):
        raise ValueError(f"max_basis={max_basis} must exceed k + 1 = {k + 1}")
    budget = max_matvecs or max(500, 50 * k)
    v0 = torch.randn(n, generator=generator, dtype=torch.float64) if v0 is None else v0
    krylov = _Krylov(None, n, size, dtype, device, generator)
    krylov.start(v0.to(device=device, dtype=dtype))
    matvecs = restarts = 0
    scale = 0.0
    with (progress or contextlib.nullcontext()) as bar:
        while True:
            krylov.accept((yield krylov.pending()))
            matvecs += 1
            if bar is not None:
                bar.advance(1)
            theta, S = krylov.ritz()
            scale = max(scale, float(theta.abs().max()))
            residuals = krylov.beta * S[-1].abs()
            idx = _wanted(theta, which)[:k]
            errors = _error_bounds(theta, residuals, idx) if krylov.j >= k else None
            exact = krylov.j == n  # the basis spans the whole space
            converged = exact or (
                errors is not None and krylov.j > k
                and bool((errors <= tol * torch.clamp(theta[idx].abs(), min=tol * scale)).all())
            )
            if converged or matvecs >= budget:
                if exact:
                    errors = torch.zeros(k, dtype=torch.float64)
                vectors = S[:, idx].to(krylov.V).T @ krylov.V[: krylov.j]
                return Eigenpairs(theta[idx], vectors.T.contiguous(), errors.clone(), converged, matvecs, restarts)
            if krylov.j == size:
                keep = min(krylov.j - 1, k + (size - k) // 2)
                order = _wanted(theta, which)[:keep]
                krylov.restart(S[:, order], theta[order])
                restarts += 1
            krylov.advance(scale)


def lanczos_quadrature(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, steps: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes θ (m,) and weights τ (m,) of the Gauss rule ``vᵀ f(A) v / ‖v‖² ≈ Σ τ_i f(θ_i)``.

    ``m = min(steps, n)``; the iteration stops early (fewer nodes) when the Krylov space
    becomes invariant, where the rule is already exact.
    """
    return drive(quadrature_steps(v, steps, generator), matvec)


def quadrature_steps(v: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> Routine:
    """:func:`lanczos_quadrature` as a coroutine (:mod:`lockstep`)."""
    n = v.numel()
    steps = min(steps, n)
    krylov = _Krylov(None, n, steps, v.dtype, v.device, generator or torch.Generator().manual_seed(0))
    krylov.start(v)
    scale = 0.0
    for _ in range(steps):
        krylov.accept((yield krylov.pending()))
        scale = max(scale, float(krylov.T[: krylov.j, : krylov.j].abs().max()))
        if krylov.beta <= 1e-12 * max(scale, 1e-300) or krylov.j == steps:
            break
        krylov.advance(scale)
    theta, S = krylov.ritz()
    return theta, S[0] ** 2


def quadrature_stacked(apply: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor,
                       steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lanczos_quadrature` of m start vectors (rows of ``V0``) against a stacked operator.

    ``apply`` maps (m, n) to (m, n) row by row (row j by operator j, e.g. the stacked models
    of batched cells). The m recurrences take the steps :func:`quadrature_steps` takes for
    each alone (the same reorthogonalization and the same early stop on an invariant
    subspace), with the basis bookkeeping batched (one ``bmm`` per step instead of m small
    products); a row that has stopped is sent a zero vector.
    """
    m, n = V0.shape
    steps = min(steps, n)
    V = torch.zeros(m, steps + 1, n, dtype=V0.dtype, device=V0.device)
    T = torch.zeros(m, steps + 1, steps + 1, dtype=torch.float64)
    V[:, 0] = V0 / V0.norm(dim=1, keepdim=True)
    active = torch.ones(m, dtype=torch.bool)
    length = torch.zeros(m, dtype=torch.long)
    scale = torch.zeros(m, dtype=torch.float64)
    for j in range(steps):
        W = apply(V[:, j]).to(V)
        Q = V[:, : j + 1]
        before = W.norm(dim=1)
        h = torch.bmm(Q, W[:, :, None])[:, :, 0]
        W = W - torch.bmm(Q.transpose(1, 2), h[:, :, None])[:, :, 0]
        again = W.norm(dim=1) < 0.7 * before  # as _Krylov._orthogonalize, row by row
        if bool(again.any()):
            h2 = torch.bmm(Q, W[:, :, None])[:, :, 0]
            W = torch.where(again[:, None], W - torch.bmm(Q.transpose(1, 2), h2[:, :, None])[:, :, 0], W)
            h = torch.where(again[:, None], h + h2, h)
        h = h.to("cpu", torch.float64)
        rows = active.nonzero().flatten()
        T[rows, : j + 1, j] = h[rows]
        T[rows, j, : j + 1] = h[rows]
        beta = W.norm(dim=1).to("cpu", torch.float64)
        scale[rows] = torch.maximum(scale[rows], T[rows, : j + 1, : j + 1].abs().amax(dim=(1, 2)))
        length[rows] = j + 1
        stop = active & ((beta <= 1e-12 * scale.clamp_min(1e-300)) | (j + 1 == steps))
        active &= ~stop
        if not bool(active.any()):
            break
        keep = active.to(W.device)[:, None]
        V[:, j + 1] = torch.where(keep, W / torch.where(keep, W.norm(dim=1, keepdim=True), 1.0), 0.0)
    rules = []
    for i in range(m):
        theta, S = torch.linalg.eigh(T[i, : length[i], : length[i]])
        rules.append((theta, S[0] ** 2))
    return rules
