"""Linear paths between parameter vectors, their loss profiles, barriers and monotonicity.

The straight path from θ_a to θ_b is θ(α) = (1 − α)·θ_a + α·θ_b, α ∈ [0, 1]. All points
of a path are evaluated together: the (m, n) stack of θ(α_k) goes through
:func:`basinprobe.runtime.substrate.evaluation.stacked_loss_and_accuracy` (one vmapped
forward per data batch).

Barriers, with L(α) the loss along the path (α_0 = 0 and α_{m−1} = 1 on the grid):

    barrier      = max_α  L(α) − [(1 − α)·L(0) + α·L(1)]     (the straight-line convention:
                   height above the chord; Frankle et al. 2020, "Linear Mode Connectivity and
                   the Lottery Ticket Hypothesis"; Ainsworth et al. 2023)
    barrier_mean = max_α  L(α) − ½·(L(0) + L(1))              (Entezari et al. 2022, "The Role of
                   Permutation Invariance in Linear Mode Connectivity of Neural Networks")

Both include the endpoints, where the chord equals L, so ``barrier`` ≥ 0 and a convex L
has ``barrier`` = 0 and ``barrier_mean`` = |L(0) − L(1)|/2 (a convex function on a segment
peaks at an end).

Monotonic linear interpolation (Goodfellow, Vinyals & Saxe 2015; Lucas et al. 2021,
"Analyzing Monotonic Linear Interpolation in Neural Network Loss Landscapes") looks at
the path from the initialization θ_0 to the trained θ_T. Its largest bump is

    max_bump = max_{i < j} L(α_j) − L(α_i)   (≥ 0; 0 exactly when L is non-increasing),

the largest rise of the loss met on the way from θ_0 to θ_T; the path is monotone when
max_bump ≤ tolerance.
"""

from __future__ import annotations

import numpy as np
import torch

from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy


def linear_path(theta_a: torch.Tensor, theta_b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The (m, n) stack of (1 − α_k)·θ_a + α_k·θ_b."""
    alphas = alphas.to(device=theta_a.device, dtype=theta_a.dtype)[:, None]
    return (1 - alphas) * theta_a[None] + alphas * theta_b[None]


def path_loss_and_accuracy(ctx, theta_a: torch.Tensor, theta_b: torch.Tensor, alphas: torch.Tensor,
                           split: str = "train", models_per_chunk: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (and accuracy, for classification) at every point of the straight path, as float64 arrays."""
    loss, accuracy = stacked_loss_and_accuracy(ctx, linear_path(theta_a, theta_b, alphas), split,
                                               models_per_chunk=models_per_chunk)
    return loss.cpu().numpy(), None if accuracy is None else accuracy.cpu().numpy()


def _endpoints(alphas: np.ndarray) -> None:
    if not (alphas[0] == 0.0 and alphas[-1] == 1.0):
        raise ValueError("a barrier needs the path's endpoints: alphas must start at 0 and end at 1")


def barrier(losses, alphas) -> float:
    """max_α L(α) − [(1 − α)·L(0) + α·L(1)]: the height of the path above its chord."""
    losses, alphas = np.asarray(losses, dtype=np.float64), np.asarray(alphas, dtype=np.float64)
    _endpoints(alphas)
    chord = (1 - alphas) * losses[0] + alphas * losses[-1]
    return float(np.max(losses - chord))


def barrier_mean(losses, alphas) -> float:
    """max_α L(α) − ½·(L(0) + L(1)): the height of the path above the mean of its endpoints."""
    losses, alphas = np.asarray(losses, dtype=np.float64), np.asarray(alphas, dtype=np.float64)
    _endpoints(alphas)
    return float(np.max(losses) - 0.5 * (losses[0] + losses[-1]))


def max_bump(losses) -> float:
    """max_{i<j} L_j − L_i (≥ 0): the largest rise of the loss along the path, in path order."""
    losses = np.asarray(losses, dtype=np.float64)
    lowest_so_far = np.minimum.accumulate(losses)
    return float(max(0.0, np.max(losses[1:] - lowest_so_far[:-1]))) if len(losses) > 1 else 0.0
