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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from basinprobe.runtime.artifacts import artifact
from basinprobe.runtime.context import derive_seed
from basinprobe.runtime.substrate.dense import DENSE_THRESHOLD, DenseSpectrum, dense_hessian, dense_operator, spectrum
from basinprobe.runtime.substrate.hvp import CurvatureOperator, curvature_operator
from basinprobe.runtime.substrate.lanczos import lanczos
from basinprobe.runtime.substrate.slq import Quadrature, slq


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


def artifact_generator(ctx, *parts) -> torch.Generator:
    """A CPU generator seeded from the cell (not the probe entry), so a shared artifact
    does not depend on which probe asked first."""
    return torch.Generator().manual_seed(derive_seed(getattr(ctx, "cell_seed", ctx.seed), *parts))


def choose_method(method: str, n: int, k: int = 0) -> str:
    if method not in ("auto", "lanczos", "dense"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'dense', not {method!r}")
    if method == "auto":
        return "dense" if n <= DENSE_THRESHOLD or k > n else "lanczos"
    return method


@artifact("hessian.operator")
def operator_artifact(ctx, operator: str = "hessian", split: str = "train", batches: int | None = None,
                      at: int | None = None, cache: bool = True) -> CurvatureOperator:
    return curvature_operator(ctx, operator, point(ctx, at), split, batches, cache=cache)


@artifact("hessian.dense")
def dense_artifact(ctx, operator: str = "hessian", split: str = "train", batches: int | None = None,
                   at: int | None = None) -> DenseSpectrum:
    if operator == "hessian":
        matrix = dense_hessian(ctx, point(ctx, at), split, batches)
        return spectrum(matrix, ctx.n_params)
    op = curvature_operator(ctx, operator, point(ctx, at), split, batches)
    return spectrum(dense_operator(op), op.count)


@artifact("hessian.eigen")
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
    budget = max_matvecs or max(500, 50 * k)
    with ctx.progress(budget, f"Lanczos {which}-{k} {operator} eigenpairs") as bar:
        result = lanczos(op.matvec, n, k, which, tol=tol, max_matvecs=budget, dtype=ctx.dtype,
                         device=ctx.device, generator=artifact_generator(ctx, "hessian.eigen", which),
                         progress=_Passthrough(bar))
    return CurvatureEigen(result.values, result.vectors, result.errors, result.matvecs, result.converged,
                          "lanczos", which, operator)


@artifact("hessian.slq")
def slq_artifact(ctx, probes: int = 8, steps: int = 80, operator: str = "hessian", split: str = "train",
                 batches: int | None = None, at: int | None = None) -> Quadrature:
    op = ctx.artifact("hessian.operator", operator=operator, split=split, batches=batches, at=at)
    with ctx.progress(probes, f"SLQ {operator} spectral density ({probes} probes x {steps} steps)") as bar:
        return slq(op.matvec, ctx.n_params, probes, steps, artifact_generator(ctx, "hessian.slq"),
                   ctx.dtype, ctx.device, progress=_Passthrough(bar))


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
    g = op.gradient
    norm = float(g.norm())
    if norm == 0.0:
        return DescentCheck(op.loss_value, 0.0, 0.0, 0.0)
    curvature = float(g @ op.matvec(g)) / norm**2
    decrease = norm**2 / (2 * curvature) if curvature > 0 else math.inf
    return DescentCheck(op.loss_value, norm, curvature, decrease)
