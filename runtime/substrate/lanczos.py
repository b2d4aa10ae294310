"""Lanczos with full reorthogonalization: extreme eigenpairs and Gauss quadrature nodes.

For a symmetric A (n x n), known through products, j steps of Lanczos build an
orthonormal basis V_j of the Krylov space span{v, Av, ..., A^{j-1}v} with

    A V_j = V_j T_j + f_j e_jᵀ,      T_j = V_jᵀ A V_j  (tridiagonal in exact arithmetic)

(Lanczos 1950). Every new vector is orthogonalized against the whole basis: after the
three-term recurrence, by one full Gram-Schmidt pass, and a second when that pass cancelled
most of it (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough", Giraud et al. 2005).
This keeps V_j orthonormal to rounding and rules out the ghost copies of converged
eigenvalues plain Lanczos produces (Paige 1971).
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
    exact: bool = False   # the basis spanned the whole space: every eigenvalue was seen, copies included


class _Krylov:
    """m orthonormal Krylov bases (``V[i]``, one per row, advanced together) and the projections
    ``T[i] = V[i] A_i V[i]ᵀ``; every row is at the same step ``j``."""

    def __init__(self, m: int, n: int, size: int, dtype, device):
        self.n = n
        # empty, not zeros: every row is written before it is read, and zeroing a basis sized for
        # restarts touches far more memory than a run that converges early uses
        self.V = torch.empty(m, size + 1, n, dtype=dtype, device=device)
        self.T = torch.zeros(m, size + 1, size + 1, dtype=torch.float64)
        self.j = 0          # products computed for rows 0..j-1 of each basis; row j is pending
        self.arrow = 0      # rows up to here couple to every earlier row (the start, a restart's arrowhead)
        self.residual = None  # f_j (m, n), orthogonal to the bases
        self.beta = torch.zeros(m, dtype=torch.float64)  # ‖f_j‖ per row

    def start(self, V0: torch.Tensor) -> None:
        self.V[:, 0] = V0 / V0.norm(dim=1, keepdim=True)
        self.j = self.arrow = 0

    def _orthogonalize(self, W: torch.Tensor, rows: int, bases=slice(None)
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W (one vector per basis in ``bases``) minus its projections on the first ``rows``
        vectors of its basis, the projections, and the norms of the result."""
        Q = self.V[bases, :rows]
        before = torch.linalg.vector_norm(W, dim=1)
        h = torch.bmm(Q, W[:, :, None])[:, :, 0]
        # W - Qᵀh as one baddbmm of hᵀQ: bmm reads Q row-major, and through Q.transpose it
        # measured 5-12x slower on CPU
        W = torch.baddbmm(W[:, None, :], h[:, None, :], Q, alpha=-1)[:, 0]
        after = torch.linalg.vector_norm(W, dim=1)
        # Second pass only where the first cancelled most of w (Daniel, Gragg, Kaufman & Stewart
        # 1976): then rounding may have left components along Q; otherwise one pass is enough.
        again = after < 0.7 * before
        if bool(again.any()):
            h2 = torch.bmm(Q, W[:, :, None])[:, :, 0]
            W = torch.where(again[:, None], torch.baddbmm(W[:, None, :], h2[:, None, :], Q, alpha=-1)[:, 0], W)
            h = torch.where(again[:, None], h + h2, h)
            after = torch.linalg.vector_norm(W, dim=1)
        return W, h, after

    def pending(self) -> torch.Tensor:
        """The vectors (m, n) whose products the next step needs."""
        return self.V[:, self.j]

    def accept(self, W: torch.Tensor) -> None:
        """Extend each basis with the product ``A_i v_j`` of its pending vector (rows of ``W``)."""
        j = self.j
        W = W.to(self.V)
        coupling = alpha = None
        if j > self.arrow:
            # The three-term recurrence first: in exact arithmetic A v_j = β_{j-1} v_{j-1} + α_j v_j
            # + β_j v_{j+1}. What it leaves along the basis is rounding, which one full pass then
            # removes without the cancellation that made a second pass necessary at almost every
            # step: the basis is read twice a step instead of four times (memory-bound for large n).
            previous, current = self.V[:, j - 1], self.V[:, j]
            coupling = self.beta.to(W)
            W = torch.addcmul(W, coupling[:, None], previous, value=-1)
            alpha = torch.bmm(W[:, None, :], current[:, :, None])[:, 0, 0]
            W = torch.addcmul(W, alpha[:, None], current, value=-1)
        W, h, norms = self._orthogonalize(W, j + 1)
        if alpha is not None:  # the projections are the recurrence's plus what the full pass found
            h[:, j - 1] += coupling
            h[:, j] += alpha
        h = h.to("cpu", torch.float64)
        self.T[:, : j + 1, j] = h
        self.T[:, j, : j + 1] = h
        self.residual, self.beta = W, norms.to("cpu", torch.float64)
        self.j = j + 1

    def advance(self, scale: torch.Tensor, active: torch.Tensor, generators=None) -> None:
        """Make the normalized residuals the pending vectors of the ``active`` rows (the others
        get zeros). With ``generators``, a row whose residual vanished continues in a fresh
        random direction orthogonal to its basis: its Krylov space is invariant, the spectrum
        seen so far exact, and the new direction's coupling to the basis is zero."""
        W, j = self.residual, self.j
        norms = self.beta.to(W)
        broke = active & (self.beta <= 1e-12 * scale.clamp_min(1e-300))
        if generators is not None and j < self.n and bool(broke.any()):
            W, norms = W.clone(), norms.clone()
            for i in broke.nonzero().flatten().tolist():
                w = torch.randn(self.n, generator=generators[i], dtype=torch.float64).to(self.V)
                w, _, norm = self._orthogonalize(w[None], j, slice(i, i + 1))
                W[i], norms[i] = w[0], norm[0]
        if bool(active.all()):
            self.V[:, j] = W / norms[:, None]
        else:
            keep = active.to(W.device)[:, None]
            self.V[:, j] = torch.where(keep, W / torch.where(keep, norms[:, None], 1.0), 0.0)

    def ritz(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (r, j) ascending and the eigenvectors (r, j, j) of the ``T`` of ``rows``."""
        return torch.linalg.eigh(self.T[rows, : self.j, : self.j])

    def restart(self, rows: torch.Tensor, S_keep: torch.Tensor, theta_keep: torch.Tensor) -> None:
        """Keep the Ritz vectors ``V_iᵀ S_keep[r]`` of each of the ``rows`` (i = rows[r]) and continue
        from the residuals; the other rows have finished and are only sent zeros from now on."""
        l = S_keep.shape[2]
        self.V[rows, :l] = torch.bmm(S_keep.transpose(1, 2).to(self.V), self.V[rows, : self.j])
        self.T.zero_()
        self.T[rows, :l, :l] = torch.diag_embed(theta_keep)
        self.j = self.arrow = l


def _wanted(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of each row's Ritz values from the wanted end, most extreme first."""
    return torch.argsort(theta, dim=1, descending=(which == "top"))


def _error_bounds(theta: torch.Tensor, residuals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """min(r_i, r_i²/gap_i) for the Ritz values ``idx`` (m, k) of each row."""
    r = residuals.gather(1, idx)
    if theta.shape[1] == 1:
        return r
    diff = (theta.gather(1, idx)[:, :, None] - theta[:, None, :]).abs()
    diff.scatter_(2, idx[:, :, None], float("inf"))
    gap = (diff - residuals[:, None, :]).min(dim=2).values.clamp_min(1e-300)
    return torch.minimum(r, r * r / gap)


def one_row(matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block product (1, n) -> (1, n) of a routine of one row, from a product of one vector."""
    return lambda V: matvec(V[0])[None]


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, which: str = "top", *,
            tol: float = 1e-4, max_matvecs: int | None = None, max_basis: int | None = None,
            v0: torch.Tensor | None = None, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
            progress=None) -> Eigenpairs:
    """The ``k`` largest (``which="top"``) or smallest (``"bottom"``) eigenpairs of a symmetric operator.

    ``matvec`` maps an (n,) tensor to an (n,) tensor. See :func:`lanczos_rows`.
    """
    routine = lanczos_rows(n, k, which, generators=[generator or torch.Generator().manual_seed(0)], tol=tol,
                           max_matvecs=max_matvecs, max_basis=max_basis, V0=None if v0 is None else v0[None],
                           dtype=dtype, device=device, progress=progress)
    return drive(routine, one_row(matvec))[0]


def lanczos_rows(n: int, k: int, which: str = "top", *, generators: list[torch.Generator], tol: float = 1e-4,
                 max_matvecs: int | None = None, max_basis: int | None = None, V0: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", progress=None) -> Routine:
    """:func:`lanczos` of m operators at once, as a coroutine (:mod:`lockstep`): it yields (m, n)
    blocks, row i to be multiplied by operator i, and returns m :class:`Eigenpairs`.

    Row i starts from ``V0[i]`` or a Gaussian drawn from ``generators[i]`` and takes exactly
    the steps it would take alone (its own stopping test, restarts at the same step); the
    bookkeeping of all rows is batched (``bmm``, one batched ``eigh`` per step). A row that
    has converged is sent zeros while the others go on. ``max_basis`` bounds each stored basis
    (thick restart beyond it; default: as many vectors as fit in ``BASIS_BYTES``, between
    2k + 20 and 200, at most n); ``max_matvecs`` bounds the products (default
    ``max(500, 50 k)``). If the budget runs out first, ``converged`` is False and ``errors``
    says how far off the values may be.

    Repeated eigenvalues: the Krylov space of one start vector holds one direction of each
    eigenspace, so a run can converge with a copy of a repeated eigenvalue missing and a
    smaller value in its place. Each row therefore checks, once its values converge: a
    Lanczos run for the one most wanted eigenvalue of the operator with every eigenvector found
    so far moved to the unwanted side of the k-th value (P A P + s YYᵀ, P = I - YYᵀ), from a
    new start drawn from the row's generator. If that value is beyond the k-th, it joins the
    list (a missed copy, or a value the first run skipped) and the check repeats; otherwise
    the list stands. A spectrum without repeats costs one such run.
    """
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', not {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"cannot compute {k} eigenpairs of an operator of size {n}")
    m = len(generators)
    budget = max_matvecs or max(500, 50 * k)
    with (progress or contextlib.nullcontext()) as bar:
        results = yield from _pass(n, k, which, generators, tol, [budget] * m, max_basis, V0, dtype, device, bar)
        found = [r.vectors for r in results]   # every eigenvector found: what a check moves aside
        settled = [r.exact or r.matvecs >= budget or found[i].shape[1] >= n for i, r in enumerate(results)]
        while not all(settled):
            rows = [i for i in range(m) if not settled[i]]
            starts = torch.stack([_deflate(torch.randn(n, generator=generators[i], dtype=torch.float64)
                                           .to(device=device, dtype=dtype), found[i]) for i in rows])
            shifts = [_aside(results[i].values[-1], which) for i in rows]
            boundaries = torch.tensor([float(results[i].values[-1]) for i in rows], dtype=torch.float64)
            check = _pass(n, 1, which, [generators[i] for i in rows], tol,
                          [budget - results[i].matvecs for i in rows], max_basis, starts, dtype, device, bar,
                          boundaries=boundaries)
            checks = yield from _moved_aside(check, rows, [found[i] for i in rows], shifts, m, n)
            for i, extra in zip(rows, checks):
                results[i], found[i], settled[i] = _merge(results[i], extra, found[i], which, k, tol)
                settled[i] = settled[i] or results[i].matvecs >= budget or found[i].shape[1] >= n
        return results


def _deflate(v: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``v`` minus its components along the orthonormal columns of ``Y`` (twice: rounding)."""
    for _ in range(2):
        v = v - Y @ (Y.T @ v)
    return v


def _aside(boundary: torch.Tensor, which: str) -> float:
    """A value on the unwanted side of the k-th wanted value, for found eigenvectors to sit at."""
    b = float(boundary)
    return b - abs(b) - 1.0 if which == "top" else b + abs(b) + 1.0


def _moved_aside(routine: Routine, rows: list[int], bases: list[torch.Tensor], shifts: list[float],
                 m: int, n: int) -> Routine:
    """Run ``routine`` (over ``rows`` of the m operators) against P A P + s YYᵀ of each row, P = I - YYᵀ:
    the found eigenvectors Y moved to the value s, every other direction seen through A."""
    try:
        request = next(routine)
        while True:
            block = request.new_zeros(m, n)
            for q, i in enumerate(rows):
                block[i] = _deflate(request[q], bases[q])
            product = yield block
            answer = torch.stack([
                _deflate(product[i], bases[q]) + bases[q] @ (shifts[q] * (bases[q].T @ request[q]))
                for q, i in enumerate(rows)])
            request = routine.send(answer)
    except StopIteration as stop:
        return stop.value


def _merge(result: Eigenpairs, extra: Eigenpairs, found: torch.Tensor, which: str, k: int, tol: float
           ) -> tuple[Eigenpairs, torch.Tensor, bool]:
    """``result`` with the check's value joined where it lies beyond the k-th; the found vectors
    with the check's; whether the list stands (nothing joined)."""
    boundary, value = float(result.values[-1]), float(extra.values[0])
    margin = float(result.errors[-1] + extra.errors[0]) + tol * max(abs(boundary), tol)
    beyond = value > boundary + margin if which == "top" else value < boundary - margin
    found = torch.cat([found, extra.vectors], dim=1)
    spent = dict(matvecs=result.matvecs + extra.matvecs, restarts=result.restarts + extra.restarts,
                 converged=result.converged and extra.converged)
    if not beyond:
        return Eigenpairs(result.values, result.vectors, result.errors, **spent), found, True
    values = torch.cat([result.values, extra.values])
    order = torch.argsort(values, descending=(which == "top"))[:k]
    vectors = torch.cat([result.vectors, extra.vectors], dim=1)[:, order]
    errors = torch.cat([result.errors, extra.errors])[order]
    return Eigenpairs(values[order], vectors.contiguous(), errors, **spent), found, False


def _pass(n: int, k: int, which: str, generators: list[torch.Generator], tol: float, budgets: list[int],
          max_basis: int | None, V0: torch.Tensor | None, dtype: torch.dtype, device, bar,
          boundaries: torch.Tensor | None = None) -> Routine:
    """One Lanczos run per row (see :func:`lanczos_rows`), each row with its own budget of products;
    ``bar`` an entered progress bar or None. With ``boundaries`` (a check, k = 1), a row also
    stops once its value is on the unwanted side of its boundary by more than twice its
    residual: an eigenvalue lies within the residual of it (Kato), so it is not beyond, and
    the check needs no more digits of it."""
    m = len(generators)
    itemsize = torch.finfo(dtype).bits // 8
    size = min(n, max_basis or max(2 * k + 20, min(200, BASIS_BYTES // (n * itemsize))))
    if size < min(n, k + 2):
        raise ValueError(f"max_basis={max_basis} must exceed k + 1 = {k + 1}")
    budget = torch.tensor(budgets)
    if V0 is None:
        V0 = torch.stack([torch.randn(n, generator=g, dtype=torch.float64) for g in generators])
    krylov = _Krylov(m, n, size, dtype, device)
    krylov.start(V0.to(device=device, dtype=dtype))
    active = torch.ones(m, dtype=torch.bool)
    running, every = True, torch.arange(m)   # running: no row has finished yet
    results: list[Eigenpairs | None] = [None] * m
    matvecs = restarts = 0
    scale = torch.zeros(m, dtype=torch.float64)
    while True:
        krylov.accept((yield krylov.pending()))
        matvecs += 1
        if bar is not None:
            bar.advance(1)
        # finished rows need no Ritz values; while none has finished, a slice (a view) selects them
        rows = every if running else active.nonzero().flatten()
        sel = slice(None) if running else rows
        theta, S = krylov.ritz(sel)
        r, j = len(rows), krylov.j
        scale[sel] = torch.maximum(scale[sel], theta.abs().amax(dim=1))
        residuals = krylov.beta[sel, None] * S[:, -1].abs()
        order = _wanted(theta, which)
        idx = order[:, :k]
        values = theta.gather(1, idx)
        if j == n:  # the bases span the whole space: the values are exact
            errors = torch.zeros(r, k, dtype=torch.float64)
            converged = torch.ones(r, dtype=torch.bool)
        elif j >= k:
            errors = _error_bounds(theta, residuals, idx)
            converged = (errors <= tol * torch.maximum(values.abs(), tol * scale[sel, None])).all(dim=1) & (j > k)
            if boundaries is not None:
                short = boundaries[rows] - values[:, 0] if which == "top" else values[:, 0] - boundaries[rows]
                converged |= (short > 2 * residuals.gather(1, idx)[:, 0]) & (j > k)
        else:
            errors = torch.full((r, k), float("inf"), dtype=torch.float64)
            converged = torch.zeros(r, dtype=torch.bool)
        done = converged | (matvecs >= budget[rows])
        finished = done.nonzero().flatten().tolist()
        for q in finished:
            i = int(rows[q])
            vectors = S[q][:, idx[q]].to(krylov.V).T @ krylov.V[i, :j]
            results[i] = Eigenpairs(values[q], vectors.T.contiguous(), errors[q].clone(), bool(converged[q]),
                                    matvecs, restarts, exact=(j == n))
        if finished:
            active[rows[done]] = False
            running = False
            if not bool(active.any()):
                return results
        if j == size:
            going = ~done
            keep = order[going, : min(j - 1, k + (size - k) // 2)]
            krylov.restart(rows[going], S[going].gather(2, keep[:, None, :].expand(len(keep), j, keep.shape[1])),
                           theta[going].gather(1, keep))
            restarts += 1
        krylov.advance(scale, active, generators)


def lanczos_quadrature(matvec: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, steps: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes θ (m,) and weights τ (m,) of the Gauss rule ``vᵀ f(A) v / ‖v‖² ≈ Σ τ_i f(θ_i)``.

    ``m = min(steps, n)``; the iteration stops early (fewer nodes) when the Krylov space
    becomes invariant, where the rule is already exact.
    """
    return drive(quadrature_rows(v[None], steps), one_row(matvec))[0]


def quadrature_rows(V0: torch.Tensor, steps: int, progress=None) -> Routine:
    """:func:`lanczos_quadrature` of each row of ``V0`` (m, n), as one coroutine (:mod:`lockstep`).

    It yields an (m, n) block and receives the block's products row by row: row i by the
    operator of row i, which may be one operator for all rows (the probe vectors of SLQ) or
    a different one per row (the stacked models of batched cells). The m recurrences are
    independent and each takes the steps it would take alone (the same reorthogonalization,
    the same early stop on an invariant subspace); only their bookkeeping is batched.
    A row that has stopped is sent zeros. Returns the m rules ``(θ, τ)``.
    """
    m, n = V0.shape
    steps = min(steps, n)
    krylov = _Krylov(m, n, steps, V0.dtype, V0.device)
    krylov.start(V0)
    active = torch.ones(m, dtype=torch.bool)
    length = torch.zeros(m, dtype=torch.long)
    scale = torch.zeros(m, dtype=torch.float64)
    with (progress or contextlib.nullcontext()) as bar:
        for _ in range(steps):
            krylov.accept((yield krylov.pending()))
            if bar is not None:
                bar.advance(1)
            j = krylov.j
            # the largest |T| entry so far: T changes only in its new row and column
            scale = torch.where(active, torch.maximum(scale, krylov.T[:, :j, j - 1].abs().amax(dim=1)), scale)
            length[active] = j
            active &= ~((krylov.beta <= 1e-12 * scale.clamp_min(1e-300)) | (j == steps))
            if not bool(active.any()):
                break
            krylov.advance(scale, active)
    rules = []
    for i in range(m):
        theta, S = torch.linalg.eigh(krylov.T[i, : length[i], : length[i]])
        rules.append((theta, S[0] ** 2))
    return rules
