"""The volume of a loss sublevel set around a point, in parameter units.

The set is S_ε = {w : L(w) − L(w*) ≤ ε} restricted to the ball ‖w − w*‖ ≤ R, and of it
the part reached from w* along straight rays before the loss first exceeds the level
(the connected, star-shaped part through w*).

Quadratic estimate. Near a minimum L(w*+δ) ≈ L(w*) + ½ δᵀHδ, so S_ε is an ellipsoid with
semi-axes a_i = √(2ε/λ_i) along the eigenvectors of H. The stiff directions S are those
with a_i < R (λ_i > 2ε/R²) and λ_i > δ_floor; the others (flat, negative, or floored) are
cut by the ball alone. For a_i ≪ R the set is then the stiff ellipsoid times the ball of
radius R in the flat subspace, whose volume is::

    log V = log V_s(1) + Σ_{i∈S} log a_i + log V_{d−s}(1) + (d − s) log R,     s = |S|,

with V_k(1) = π^{k/2}/Γ(k/2 + 1) the volume of the unit k-ball. With no flat direction
this is the ellipsoid, log V_d(1) + Σ_i log a_i = log V_d(1) + (d/2) log 2ε − ½ log det H,
and with no stiff one the ball. (Capping the flat semi-axes at R inside one d-dimensional
ellipsoid, log V_d(1) + Σ_i log min(a_i, R), would instead undercount the product by
V_s V_{d−s}/V_d, e.g. a factor 2 for s = d − s = 2, and disagree with the Monte-Carlo
estimate.) Σ_{i∈S} log a_i + (d − s) log R = tr f(H) and s = tr 1_S(H): exact from a dense
spectrum, or by stochastic Lanczos quadrature. Flat minima owe their volume to the many
small eigenvalues in this sum.

Monte-Carlo estimate. In polar coordinates the volume of a star-shaped set whose ray
in direction u ends at r(u) is ∫ r(u)^d/d dσ(u) = V_d(1)·E_u[r(u)^d] for u uniform on
the sphere, so with M directions::

    log V = log V_d(1) + logsumexp_i(d log r_i) − log M,

computed in log space since r^d under- or overflows for any real d. Its standard
error is the delta-method one, std_i(w_i)/(√M · mean_i w_i) with w_i = r_i^d/max_j r_j^d;
in high dimension a few long rays dominate, and ``effective_sample_size`` says how many.
r(u) is found by doubling from R·2^-levels until the loss exceeds the level (or R is
reached), then bisection, batched over directions with ``vmap``.
(Volume in parameter space as a measure of flatness: Hochreiter & Schmidhuber 1997,
"Flat minima"; Huang et al. 2020, "Understanding generalization through visualizations";
the quadratic ellipsoid and its log-determinant: Wu, Zhu & E 2017.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import vmap


def log_unit_ball_volume(d: int) -> float:
    """log V_d(1) = (d/2) log π − log Γ(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def stiff(eigenvalues: torch.Tensor, epsilon: float, radius: float, floor: float = 0.0) -> torch.Tensor:
    """1 where the ellipsoid's semi-axis √(2ε/λ) is shorter than R and λ > floor, else 0."""
    return (eigenvalues > max(floor, 2 * epsilon / radius**2)).to(torch.float64)


def quadratic_log_radius(eigenvalues: torch.Tensor, epsilon: float, radius: float, floor: float = 0.0) -> torch.Tensor:
    """f(λ) = log √(2ε/λ) in stiff directions, log R in the others (flat within the ball)."""
    flat = stiff(eigenvalues, epsilon, radius, floor) == 0
    safe = torch.where(flat, torch.ones_like(eigenvalues), eigenvalues)
    return torch.where(flat, torch.full_like(eigenvalues, math.log(radius)), 0.5 * torch.log(2 * epsilon / safe))


def quadratic_log_volume(log_radius_sum, stiff_count, d: int):
    """log V of (stiff ellipsoid) x (flat R-ball) from tr f(H) and s = tr 1_S(H).

    Either may be a float (dense spectrum) or a tensor of per-probe SLQ estimates;
    a fractional s (an SLQ estimate) interpolates V_s through the Gamma function.
    """
    if isinstance(stiff_count, torch.Tensor):
        s = stiff_count.clamp(0, d)
        lgamma = torch.lgamma
    else:
        s = min(max(stiff_count, 0.0), float(d))
        lgamma = math.lgamma
    log_balls = 0.5 * d * math.log(math.pi) - lgamma(0.5 * s + 1) - lgamma(0.5 * (d - s) + 1)
    return log_balls + log_radius_sum


def batched_loss(ctx, X: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None) -> Callable:
    """``W (B, n) -> (B,)``: the mean loss over (X, y) at each row of W, vmapped in chunks."""
    if chunk_size is None:
        # ~2^24 floats per chunk: 256 activations per example (a rough guess) and the row of W.
        chunk_size = max(1, 2**24 // (len(X) * 256 + ctx.n_params))

    def one(w):
        return ctx.loss_fn(ctx.forward(w, X), y)

    many = vmap(one, chunk_size=chunk_size)

    def losses(W: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return many(W)

    return losses


@dataclass
class RayRadii:
    """r(u) per direction (rows) and level (columns), and whether the ray reached R."""

    radii: torch.Tensor    # (M, E) float64
    capped: torch.Tensor   # (M, E) bool
    evaluations: int       # loss evaluations spent


def ray_radii(losses: Callable, center: torch.Tensor, directions: torch.Tensor, levels: list[float],
              radius: float, base_loss: float, scan_levels: int = 24, bisections: int = 32,
              progress=None) -> RayRadii:
    """The first radius along each unit direction where L(w* + r u) − L(w*) exceeds each level.

    The scan doubles r from R·2^-scan_levels; a ray that never exceeds a level within R
    gets r = R (capped). ``losses`` maps (B, n) parameter rows to (B,) losses.
    """
    M, E = directions.shape[0], len(levels)
    eps = torch.tensor(levels, dtype=torch.float64)
    lo = torch.zeros(M, E, dtype=torch.float64)
    hi = torch.full((M, E), math.inf, dtype=torch.float64)
    evaluations = 0

    def excess(idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        nonlocal evaluations
        W = center[None] + r.to(center)[:, None] * directions[idx]
        evaluations += len(idx)
        # a loss that overflowed to NaN has certainly left the sublevel set
        return torch.nan_to_num(losses(W).to("cpu", torch.float64), nan=math.inf) - base_loss

    for j in range(scan_levels + 1):
        open_rays = torch.isinf(hi).any(dim=1).nonzero().flatten()
        if len(open_rays) == 0:
            break
        r = radius * 2.0 ** (j - scan_levels)
        above = excess(open_rays, torch.full((len(open_rays),), r, dtype=torch.float64))[:, None] > eps[None]
        rows_hi, rows_lo = hi[open_rays], lo[open_rays]
        newly = above & torch.isinf(rows_hi)
        rows_hi[newly] = r
        rows_lo[~above & torch.isinf(rows_hi)] = r
        hi[open_rays], lo[open_rays] = rows_hi, rows_lo
        if progress is not None:
            progress.advance(1)
    capped = torch.isinf(hi)
    pairs = (~capped).nonzero()
    if len(pairs):
        ray, level = pairs[:, 0], pairs[:, 1]
        a, b = lo[ray, level], hi[ray, level]
        for _ in range(bisections):
            mid = 0.5 * (a + b)
            above = excess(ray, mid) > eps[level]
            b = torch.where(above, mid, b)
            a = torch.where(above, a, mid)
            if progress is not None:
                progress.advance(1)
        hi[ray, level] = 0.5 * (a + b)
    hi[capped] = radius
    return RayRadii(hi, capped, evaluations)


def monte_carlo_log_volume(log_radii: torch.Tensor, d: int) -> tuple[float, float, float]:
    """``(log V, stderr, effective sample size)`` from log r(u) of M uniform directions."""
    a = d * log_radii.to(torch.float64)
    w = torch.exp(a - a.max())
    M = len(a)
    log_v = log_unit_ball_volume(d) + float(torch.logsumexp(a, 0)) - math.log(M)
    stderr = float(w.std(unbiased=True) / (math.sqrt(M) * w.mean())) if M > 1 else math.inf
    ess = float(w.sum() ** 2 / (w * w).sum())
    return log_v, stderr, ess


def uniform_directions(count: int, n: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """``count`` directions uniform on the unit sphere in R^n (normalized Gaussians), drawn on the CPU."""
    g = torch.randn(count, n, generator=generator, dtype=torch.float64)
    return (g / g.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
