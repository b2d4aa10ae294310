"""Stochastic Lanczos quadrature: the spectral density of A and tr f(A), with standard errors.

For Rademacher probes v_p (p = 1..P, entries ±1, ‖v_p‖² = n) and the m-node Gauss rule
(θ_{p,i}, τ_{p,i}) of Lanczos started at v_p (:func:`lanczos.lanczos_quadrature`)::

    tr f(A) = E[v_pᵀ f(A) v_p] ≈ (n/P) Σ_p Σ_i τ_{p,i} f(θ_{p,i})

with standard error n·std_p(Σ_i τ_{p,i} f(θ_{p,i}))/√P (Ubaru, Chen & Saad 2017,
"Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"). The spectral density
φ(t) = (1/n) Σ_j δ(t − λ_j) is estimated by smoothing the same nodes with a Gaussian
kernel of width σ (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019)::

    φ_σ(t) = (1/P) Σ_p Σ_i τ_{p,i} exp(−(t − θ_{p,i})²/2σ²)/(σ√(2π)),

a probability density: it integrates to 1 and its mean is the estimate of tr(A)/n.

The spectral mass below a point c, F(c) = #{λ_j < c}/n, is the trace of a step
function, which Gauss quadrature resolves only to the weight of the nodes next to c.
The Chebyshev-Markov-Stieltjes inequalities (Szegő, "Orthogonal Polynomials", 3.41.1;
Golub & Meurant 2010, 6.2) bracket each probe's F_p(c) = Σ_{λ_j<c} (vᵀq_j)²/‖v‖² by

    Σ_{θ_i<c} τ_i − τ_a  ≤  F_p(c)  ≤  Σ_{θ_i<c} τ_i + τ_b,

θ_a the largest node below c and θ_b the smallest at or above it; :func:`mass_below`
returns the bracket's midpoint, the standard error over probes, and the mean half-width
as the quadrature error (a bound, not a standard error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from basinprobe.runtime.substrate.lanczos import quadrature_rows
from basinprobe.runtime.substrate.lockstep import Routine, drive


@dataclass
class Quadrature:
    """Gauss-rule nodes and weights of P probe vectors (rows), padded with zero weights."""

    nodes: torch.Tensor    # (P, m) float64, CPU
    weights: torch.Tensor  # (P, m) float64, CPU; each row sums to 1
    n: int
    matvecs: int

    def per_probe(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """vᵀ f(A) v / ‖v‖² for each probe vector."""
        return (self.weights * f(self.nodes)).sum(dim=1)


def rademacher(n: int, count: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``count`` vectors (rows) of independent ±1 entries, drawn on the CPU."""
    return (torch.randint(0, 2, (count, n), generator=generator) * 2 - 1).to(dtype)


def slq(apply: Callable[[torch.Tensor], torch.Tensor], n: int, probes: int, steps: int,
        generator: torch.Generator, dtype=torch.float64, device="cpu", progress=None) -> Quadrature:
    """The Gauss rules of ``probes`` Rademacher vectors, ``steps`` Lanczos steps each.

    ``apply`` multiplies a block: it maps (probes, n) to (probes, n), row by row, so that the
    probes' products can be computed together where that is cheaper (a batched backward pass).
    """
    return drive(slq_steps(n, probes, steps, generator, dtype, device, progress), apply)


def slq_steps(n: int, probes: int, steps: int, generator: torch.Generator, dtype=torch.float64, device="cpu",
              progress=None) -> Routine:
    """:func:`slq` as a coroutine (:mod:`lockstep`): yields (probes, n) blocks."""
    rules = yield from quadrature_rows(rademacher(n, probes, generator).to(device=device, dtype=dtype), steps,
                                       progress)
    return _quadrature(rules, n, min(steps, n))


def slq_stacked(apply: Callable[[torch.Tensor], torch.Tensor], n: int, probes: int, steps: int,
                generators: list[torch.Generator], dtype=torch.float64, device="cpu",
                progress=None) -> list[Quadrature]:
    """:func:`slq` of m operators at once, operator j's probe vectors drawn from ``generators[j]``
    exactly as :func:`slq` draws them; ``apply`` maps (m, probes, n) to (m, probes, n), the
    block of row j by operator j. All m·probes recurrences advance together."""
    m = len(generators)
    V0 = torch.cat([rademacher(n, probes, g) for g in generators]).to(device=device, dtype=dtype)
    rules = drive(quadrature_rows(V0, steps, progress), lambda V: apply(V.reshape(m, probes, n)).reshape(m * probes, n))
    return [_quadrature(rules[i * probes:(i + 1) * probes], n, min(steps, n)) for i in range(m)]


def _quadrature(rules: list[tuple[torch.Tensor, torch.Tensor]], n: int, steps: int) -> Quadrature:
    """The rules of the probes, padded to ``steps`` nodes each."""
    nodes = torch.zeros(len(rules), steps, dtype=torch.float64)
    weights = torch.zeros(len(rules), steps, dtype=torch.float64)
    for p, (theta, tau) in enumerate(rules):
        nodes[p, : len(theta)], weights[p, : len(tau)] = theta, tau
        # Padding nodes sit at an existing node so that min/max of the nodes stay meaningful.
        nodes[p, len(theta):] = theta[-1]
    return Quadrature(nodes, weights, n, sum(len(theta) for theta, _ in rules))


def trace_function(q: Quadrature, f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``(tr f(A), standard error)`` from the probes' Gauss rules."""
    samples = q.n * q.per_probe(f)
    stderr = float(samples.std(unbiased=True)) / math.sqrt(len(samples)) if len(samples) > 1 else float("inf")
    return float(samples.mean()), stderr


def mass_below(q: Quadrature, c: float) -> tuple[float, float, float]:
    """``(F(c), standard error over probes, quadrature error)`` of the fraction of eigenvalues below ``c``."""
    real = q.weights > 0
    below = (q.nodes < c) & real
    at_or_above = (q.nodes >= c) & real
    inner = (q.weights * below).sum(dim=1)
    ninf = torch.full_like(q.nodes, -math.inf)
    # weight of the largest node below c and of the smallest node at or above c (0 if none)
    a = torch.where(below, q.nodes, ninf).argmax(dim=1, keepdim=True)
    b = torch.where(at_or_above, -q.nodes, ninf).argmax(dim=1, keepdim=True)
    tau_a = torch.where(below.any(dim=1), q.weights.gather(1, a).squeeze(1), torch.zeros_like(inner))
    tau_b = torch.where(at_or_above.any(dim=1), q.weights.gather(1, b).squeeze(1), torch.zeros_like(inner))
    mid = inner + 0.5 * (tau_b - tau_a)
    stderr = float(mid.std(unbiased=True)) / math.sqrt(len(mid)) if len(mid) > 1 else float("inf")
    return float(mid.mean()), stderr, float((0.5 * (tau_a + tau_b)).mean())


def density_grid(nodes: torch.Tensor, size: int, bandwidth: float) -> tuple[torch.Tensor, float]:
    """An evenly spaced grid over the nodes' range padded by 4σ, and σ = bandwidth · range."""
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    sigma = bandwidth * width
    return torch.linspace(lo - 4 * sigma, hi + 4 * sigma, size, dtype=torch.float64), sigma


def spectral_density(nodes: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """φ_σ on ``grid``: the Gaussian-smoothed mixture of nodes with weights, averaged over rows.

    ``nodes``/``weights`` are (P, m) (SLQ) or (1, n) (exact eigenvalues with weights 1/n).
    """
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights[None]).sum(dim=2).mean(dim=1)
