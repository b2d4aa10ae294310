"""Randomized trace estimators from matrix-vector products, with standard errors.

Hutchinson (1989): for probes g with E[g gᵀ] = I (Rademacher),

    tr(A) ≈ (1/m) Σ_i g_iᵀ A g_i,      stderr = std_i(g_iᵀ A g_i)/√m.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: optimal stochastic trace
estimation"): with m products split in thirds, S, G Rademacher (n x m/3),
Q = orth(A S), P = I − QQᵀ,

    tr(A) ≈ tr(Qᵀ A Q) + (3/m) Σ_i (P g_i)ᵀ A (P g_i),

the top of the spectrum captured exactly by the sketch and only the deflated rest
estimated; the standard error is that of the Hutchinson part. When the sketch spans
the whole space (m/3 ≥ n) the estimate is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from basinprobe.runtime.substrate.lockstep import Routine, drive
from basinprobe.runtime.substrate.slq import rademacher


@dataclass
class TraceEstimate:
    value: float
    stderr: float
    matvecs: int
    estimator: str


def _mean_stderr(samples: torch.Tensor) -> tuple[float, float]:
    if len(samples) == 0:
        return 0.0, 0.0
    if len(samples) == 1:
        return float(samples[0]), float("inf")
    return float(samples.mean()), float(samples.std(unbiased=True)) / math.sqrt(len(samples))


def hutchinson(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, samples: int,
               generator: torch.Generator, dtype=torch.float64, device="cpu") -> TraceEstimate:
    """Hutchinson's estimate of tr(A) from ``samples`` Rademacher probes; ``matmat`` maps (n, k) to (n, k)."""
    G = rademacher(n, samples, generator, dtype).T.to(device)
    quad = (G * matmat(G)).sum(dim=0).to("cpu", torch.float64)
    value, stderr = _mean_stderr(quad)
    return TraceEstimate(value, stderr, samples, "hutchinson")


def hutchpp(matmat: Callable[[torch.Tensor], torch.Tensor], n: int, matvecs: int,
            generator: torch.Generator, dtype=torch.float64, device="cpu") -> TraceEstimate:
    """Hutch++ estimate of tr(A) from about ``matvecs`` products (at least 3)."""
    return drive(hutchpp_steps(n, matvecs, generator, dtype, device), matmat)


def hutchpp_steps(n: int, matvecs: int, generator: torch.Generator, dtype=torch.float64, device="cpu") -> Routine:
    """:func:`hutchpp` as a coroutine (:mod:`lockstep`): yields (n, k) blocks, receives A times them."""
    if matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 products, not {matvecs}")
    sketch = min(matvecs // 3, n)
    S = rademacher(n, sketch, generator, dtype).T.to(device)
    Q, _ = torch.linalg.qr((yield S))
    AQ = yield Q
    low_rank = float((Q * AQ).sum().to("cpu", torch.float64))
    if sketch >= n:  # Q spans the whole space: tr(QᵀAQ) = tr(A)
        return TraceEstimate(low_rank, 0.0, 2 * sketch, "hutch++")
    g = max(matvecs - 2 * sketch, 1)
    G = rademacher(n, g, generator, dtype).T.to(device)
    G = G - Q @ (Q.T @ G)
    quad = (G * (yield G)).sum(dim=0).to("cpu", torch.float64)
    rest, stderr = _mean_stderr(quad)
    return TraceEstimate(low_rank + rest, stderr, 2 * sketch + g, "hutch++")
