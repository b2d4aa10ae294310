"""The curvature engine's shared artifacts: operators, eigenpairs, dense spectra, SLQ rules.

Probes ask for them by name through ``ctx.artifact(name, **kwargs)``; each is computed
once per cell per arguments, so two probes asking for the same eigenpairs share one run.
Every artifact measures the loss of :mod:`hvp` (``split``, ``batches``) at the cell's
parameters, or at the checkpoint ``at`` (a training step in ``ctx.trajectory``, e.g. 0
for the initialization) when given.

``hessian.operator``  the Hessian or GGN operator (:class:`hvp.CurvatureOperator`)
``hessian.dense``     the explicit matrix and its ``eigh`` (:class:`dense.DenseSpectrum`)
``hessian.eigen``     top or bottom k eigenpairs (:class:`CurvatureEigen`): Lanczos, or the
                      dense path at or below ``dense.DENSE_THRESHOLD`` parameters
``hessian.slq``       stochastic Lanczos quadrature rules (:class:`slq.Quadrature`)

The cache keys on the arguments with the producer's defaults filled in, so requests that
spell out a default and requests that leave it out share one computation. For batched cells (several models of one architecture on
the same data), :func:`stacked_operator`, :func:`dense_spectra`, :func:`eigen_many` and
:func:`slq_many` compute the same results for all cells at once, over one ``vmap``-ed
product per step: Lanczos and SLQ advance every cell's recurrence as a row of one batched
recurrence (:func:`lanczos.lanczos_rows`, :func:`lanczos.quadrature_rows`), Hutch++ runs
each cell's routine in lockstep (:mod:`lockstep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from basinprobe.runtime.artifacts import artifact
from basinprobe.runtime.context import derive_seed
from basinprobe.runtime.substrate.dense import DENSE_THRESHOLD, DenseSpectrum, dense_operator, spectra, spectrum
from basinprobe.runtime.substrate.hvp import CurvatureOperator, curvature_operator
from basinprobe.runtime.substrate.lanczos import Eigenpairs, lanczos_rows, one_row
from basinprobe.runtime.substrate.lockstep import Routine, drive, drive_many
from basinprobe.runtime.substrate.slq import Quadrature, slq_stacked, slq_steps


@dataclass
class CurvatureEigen:
    """Extreme eigenpairs of the Hessian or GGN at a point.

    ``values`` (k,) float64 on the CPU, from the wanted end (descending for ``top``,
    ascending for ``bottom``); ``vectors`` (n_params, k) orthonormal columns on the
    cell's device and dtype; ``errors`` (k,) estimated absolute errors of the values;
    ``hvp_count`` the curvature-vector products spent (for the dense path: the columns
    formed); ``method`` ``"lanczos"`` or ``"dense"``.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    errors: torch.Tensor
    hvp_count: int
    converged: bool
    method: str
    which: str
    operator: str


def point(ctx, at: int | None) -> torch.Tensor:
    """The flat parameters of the cell (``at=None``) or of checkpoint ``at`` of its training run."""
    if at is None:
        return ctx.flat_params
    try:
        return ctx.trajectory[int(at)]
    except KeyError:
        steps = ", ".join(map(str, sorted(ctx.trajectory)))
        raise ValueError(f"no checkpoint at step {at} in this cell's trajectory (steps: {steps})") from None


def artifact_generator(ctx, *parts, at: int | None = None) -> torch.Generator:
    """A CPU generator seeded from the cell (not the probe entry), so a shared artifact
    does not depend on which probe asked first; at a checkpoint ``at`` of the training run,
    from the run and ``at``, so that every cell of the run gets the same value
    (``artifacts.RUN_SHARED``)."""
    if at is None:
        return torch.Generator().manual_seed(derive_seed(getattr(ctx, "cell_seed", ctx.seed), *parts))
    return torch.Generator().manual_seed(derive_seed(getattr(ctx, "run_seed", ctx.seed), "at", int(at), *parts))


def choose_method(method: str, n: int, k: int = 0, *, extremes_only: bool = False) -> str:
    """``dense`` or ``lanczos`` for ``method="auto"`` (a named method is returned as is).

    By default (the whole spectrum is useful, e.g. for a density) the matrix is formed
    up to ``DENSE_THRESHOLD`` parameters. With ``extremes_only`` (only the k extreme
    pairs are wanted, e.g. at every checkpoint) the cheaper in products wins: Lanczos
    takes about 4k + 30 of them, with margin 10k + 100, the matrix n.
    """
    if method not in ("auto", "lanczos", "dense"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'dense', not {method!r}")
    if method != "auto":
        return method
    if extremes_only:
        return "lanczos" if 10 * k + 100 < n else "dense"
    return "dense" if n <= DENSE_THRESHOLD or k > n else "lanczos"


@artifact("hessian.operator")
def operator_artifact(ctx, operator: str = "hessian", split: str = "train", batches: int | None = None,
                      at: int | None = None, cache: bool = True) -> CurvatureOperator:
    return curvature_operator(ctx, operator, point(ctx, at), split, batches, cache=cache)


@artifact("hessian.dense")
def dense_artifact(ctx, operator: str = "hessian", split: str = "train", batches: int | None = None,
                   at: int | None = None) -> DenseSpectrum:
    # the columns as products of the cached-graph operator: on small CPU models 2.8x faster than
    # torch.func.hessian's jvp-of-jacrev columns (dense.dense_hessian), which is kept as a reference
    op = ctx.artifact("hessian.operator", operator=operator, split=split, batches=batches, at=at)
    before = op.count
    matrix = dense_operator(op)
    return spectrum(matrix, op.count - before)


@artifact("hessian.eigen", run_shared=True)
def eigen_artifact(ctx, k: int = 20, which: str = "top", operator: str = "hessian", split: str = "train",
                   batches: int | None = None, at: int | None = None, tol: float = 1e-4, method: str = "auto",
                   max_matvecs: int | None = None) -> CurvatureEigen:
    n = ctx.n_params
    if not 1 <= k <= n:
        raise ValueError(f"asked for {k} eigenpairs of a model with {n} parameters; use 1 <= k <= {n}")
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', not {which!r}")
    if choose_method(method, n, k) == "dense":
        dense = ctx.artifact("hessian.dense", operator=operator, split=split, batches=batches, at=at)
        idx = torch.arange(n - 1, n - 1 - k, -1) if which == "top" else torch.arange(k)
        return CurvatureEigen(dense.values[idx].to("cpu", torch.float64), dense.vectors[:, idx],
                              torch.zeros(k, dtype=torch.float64), dense.matvecs, True, "dense", which, operator)
    op = ctx.artifact("hessian.operator", operator=operator, split=split, batches=batches, at=at)
    budget = eigen_budget(k, max_matvecs)
    with ctx.progress(budget, f"Lanczos {which}-{k} {operator} eigenpairs") as bar:
        routine = eigen_rows([ctx], k, which, tol, max_matvecs, progress=_Passthrough(bar), at=at)
        (result,) = drive(routine, one_row(op.matvec))
    return _eigen(result, which, operator)


def eigen_budget(k: int, max_matvecs: int | None = None) -> int:
    return max_matvecs or max(500, 50 * k)


def eigen_rows(ctxs: list, k: int, which: str, tol: float, max_matvecs: int | None = None, progress=None,
               at: int | None = None) -> Routine:
    """The Lanczos runs of ``hessian.eigen`` of the cells, as one coroutine (:func:`lanczos.lanczos_rows`):
    each cell's start vector seeded from the cell (or the run, at a checkpoint ``at``), the same
    budget and stopping rule."""
    first = ctxs[0]
    generators = [artifact_generator(ctx, "hessian.eigen", which, at=at) for ctx in ctxs]
    return lanczos_rows(first.n_params, k, which, tol=tol, max_matvecs=eigen_budget(k, max_matvecs),
                        dtype=first.dtype, device=first.device, generators=generators, progress=progress)


def _eigen(result: Eigenpairs, which: str, operator: str) -> CurvatureEigen:
    return CurvatureEigen(result.values, result.vectors, result.errors, result.matvecs, result.converged,
                          "lanczos", which, operator)


@artifact("hessian.slq", run_shared=True)
def slq_artifact(ctx, probes: int = 8, steps: int = 80, operator: str = "hessian", split: str = "train",
                 batches: int | None = None, at: int | None = None) -> Quadrature:
    op = ctx.artifact("hessian.operator", operator=operator, split=split, batches=batches, at=at)
    with ctx.progress(min(steps, ctx.n_params),
                      f"SLQ {operator} spectral density ({probes} probes x {steps} steps)") as bar:
        # probe vectors seeded from the cell (or the run, at a checkpoint ``at``)
        routine = slq_steps(ctx.n_params, probes, steps, artifact_generator(ctx, "hessian.slq", at=at), ctx.dtype,
                            ctx.device, progress=_Passthrough(bar))
        return drive(routine, lambda V: op.matmat(V.T).T)


class _Passthrough:
    """An already-entered progress bar handed to a substrate loop that enters its own."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        return False


@dataclass
class DescentCheck:
    """Whether a point is near a minimum, from the gradient and the curvature along it.

    Along −g the quadratic model L(w − t g) ≈ L − t‖g‖² + ½ t² gᵀHg is lowest at
    t = ‖g‖²/gᵀHg, where it has dropped by ``decrease`` = ‖g‖⁴/(2 gᵀHg) (infinite when
    gᵀHg ≤ 0): a lower bound on how far the point sits above a local minimum of its
    quadratic model. One Hessian-vector product.
    """

    loss: float
    gradient_norm: float
    curvature: float  # gᵀHg / ‖g‖²
    decrease: float


def descent_check(op: CurvatureOperator) -> DescentCheck:
    if op.stacked:
        raise ValueError("descent_check takes the operator of one model; use descent_checks for stacked models")
    return descent_checks(op)[0]


def descent_checks(op: CurvatureOperator) -> list[DescentCheck]:
    """:class:`DescentCheck` of each model of a (stacked) Hessian operator, from one product."""
    G = op.gradient.reshape(-1, op.n)
    losses = op.loss_value if op.stacked else [op.loss_value]
    norms = G.norm(dim=1).tolist()
    if not any(norms):
        return [DescentCheck(loss, 0.0, 0.0, 0.0) for loss in losses]
    gHg = (G * op.matvec(G.reshape(op.params.shape)).reshape(-1, op.n)).sum(dim=1).tolist()
    checks = []
    for loss, norm, ghg in zip(losses, norms, gHg):
        if norm == 0.0:
            checks.append(DescentCheck(loss, 0.0, 0.0, 0.0))
            continue
        curvature = ghg / norm**2
        decrease = norm**2 / (2 * curvature) if curvature > 0 else math.inf
        checks.append(DescentCheck(loss, norm, curvature, decrease))
    return checks


# --- several models at once (batched cells) ------------------------------------------------------

def stacked_operator(ctxs: list, operator: str = "hessian", split: str = "train",
                     batches: int | None = None) -> CurvatureOperator:
    """The operator of the cells' models stacked (block diagonal; see :mod:`hvp`): the cells must
    share architecture and data, and differ only in their parameters."""
    flats = torch.stack([ctx.flat_params for ctx in ctxs])
    return curvature_operator(ctxs[0], operator, flats, split, batches)


def dense_spectra(ctxs: list, operator: str = "hessian", split: str = "train",
                  batches: int | None = None, op: CurvatureOperator | None = None) -> list[DenseSpectrum]:
    """``hessian.dense`` of each cell, computed for all of them at once (``op``: their stacked operator)."""
    op = op if op is not None else stacked_operator(ctxs, operator, split, batches)
    before = op.count
    matrices = dense_operator(op)
    return spectra(matrices, op.count - before)


def lockstep(ctx, routines: list[Routine], op: CurvatureOperator, description: str, total: int) -> list:
    """Run the cells' routines against a stacked operator, one product for all per step."""
    with ctx.progress(total, description) as bar:
        def apply(V):
            bar.advance(1)
            return op.matmat(V) if V.dim() == 3 else op.matvec(V)

        return drive_many(routines, apply)


def eigen_many(ctxs: list, op: CurvatureOperator, k: int, which: str, tol: float,
               max_matvecs: int | None = None) -> list[CurvatureEigen]:
    """``hessian.eigen`` (Lanczos path) of each cell, the cells' runs advanced together, one product
    of the stacked operator per step."""
    description = f"Lanczos {which}-{k} {op.kind} eigenpairs of {len(ctxs)} cells"
    with ctxs[0].progress(eigen_budget(k, max_matvecs), description) as bar:
        results = drive(eigen_rows(ctxs, k, which, tol, max_matvecs, progress=_Passthrough(bar)), op.matvec)
    return [_eigen(result, which, op.kind) for result in results]


def slq_many(ctxs: list, op: CurvatureOperator, probes: int, steps: int) -> list[Quadrature]:
    """``hessian.slq`` of each cell (the same probe vectors, seeded from each cell), the cells'
    recurrences batched (:func:`slq.slq_stacked`)."""
    first = ctxs[0]
    generators = [artifact_generator(ctx, "hessian.slq") for ctx in ctxs]
    with first.progress(min(steps, first.n_params), f"SLQ {op.kind} spectral density of {len(ctxs)} cells") as bar:
        return slq_stacked(lambda V: op.matmat(V.transpose(1, 2)).transpose(1, 2), first.n_params, probes, steps,
                           generators, first.dtype, first.device, progress=_Passthrough(bar))
