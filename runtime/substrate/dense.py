"""The explicit curvature matrix and its full eigendecomposition, for small models.

Hessian: ``torch.func.hessian`` of the flat-parameter loss, i.e. jacfwd(jacrev(L)):
column j is the forward-over-reverse product ∇²L(θ) e_j = ∂/∂t ∇L(θ + t e_j)|_{t=0}.
The columns are computed ``chunk_size`` at a time under ``vmap`` (the same transform
``torch.func.hessian`` applies to all n at once) so memory stays bounded, and the
batches of the loss are accumulated as in :mod:`hvp`::

    H = Σ_b (N_b/N) ∇²ℓ_b(θ).

Gauss-Newton: G = A I through the GGN operator's products.
Either is symmetrized, (M + Mᵀ)/2, before ``torch.linalg.eigh``.

The ``hessian.dense`` artifact forms the matrix from the operator's products
(:func:`dense_operator`; columns a block at a time over stacked copies of the model), which
measured 2.8x faster than the jvp-of-jacrev columns, before the copies, on a
387-parameter MLP on CPU; :func:`dense_hessian` is the independent reference.

Below ``DENSE_THRESHOLD`` parameters this is cheaper and exact, so the curvature
artifacts take this path automatically (``method="auto"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jacrev, jvp, vmap

from basinprobe.runtime.substrate.hvp import CurvatureOperator, loss_batches

# The columns of one model's Hessian on CPU are taken REPLICA_ROWS / n_examples at a time (at most
# MAX_REPLICAS) as products of a stack of copies of the model: one double backward through a graph
# of that many examples replaces as many small ones (see dense_operator).
REPLICA_ROWS = 8192
MAX_REPLICAS = 32

# n_params at or below which "auto" forms the matrix: eigh of 1500 x 1500 takes ~0.5 s
# on one CPU core, and the matrix 18 MB in float64.
DENSE_THRESHOLD = 1500


@dataclass
class DenseSpectrum:
    """The explicit matrix, its eigenvalues (ascending) and orthonormal eigenvectors (columns)."""

    matrix: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor
    matvecs: int  # products (columns) it took to form the matrix


def dense_hessian(ctx, params: torch.Tensor | None = None, split: str = "train", batches: int | None = None,
                  batch_size: int | None = None, chunk_size: int = 32) -> torch.Tensor:
    """The n x n Hessian of ``ctx``'s loss at ``params`` (default: the cell's)."""
    theta = (ctx.flat_params if params is None else params).detach().to(ctx.device, ctx.dtype)
    n = theta.numel()
    H = torch.zeros(n, n, dtype=ctx.dtype, device=ctx.device)
    eye = torch.eye(n, dtype=ctx.dtype, device=ctx.device)
    for xb, yb, weight in loss_batches(ctx, split, batches, batch_size):
        def loss(t, xb=xb, yb=yb):
            return ctx.loss_fn(ctx.forward(t, xb), yb)

        def column(e, loss=loss):
            # jvp of jacrev, as torch.func.hessian: jvp of torch.func.grad trips over
            # a ZeroTensor in mse_loss's double backward (torch 2.13).
            return jvp(jacrev(loss), (theta,), (e,))[1]

        H += weight * vmap(column, chunk_size=chunk_size)(eye)
    return H


def dense_operator(op: CurvatureOperator, chunk_size: int = 64) -> torch.Tensor:
    """The n x n matrix of a curvature operator, from its products with the identity
    ((m, n, n) for stacked models).

    For one model's operator on CPU, c columns at a time are the product of a stack of c
    copies of the model with c unit vectors (c from ``REPLICA_ROWS``): the same arithmetic
    as c products, in one pass of larger kernels. Against one product per column (tanh
    MLPs, float64, torch 2.13, 2 CPU threads): 2.8x faster for 387 and 1443 parameters on
    192-256 examples (32 copies), 1.7-1.8x for 1443-1667 parameters on 1024-2048 examples
    (4-8 copies); 3.5x for the Gauss-Newton matrix of the 387-parameter MLP.
    """
    copies = min(MAX_REPLICAS, op.n, REPLICA_ROWS // max(op.n_examples, 1))
    stack = op.replica(copies) if not op.stacked and op.device.type == "cpu" and copies > 1 else None
    eye = torch.eye(op.n, dtype=op.dtype, device=op.device)
    if stack is not None:
        op.count += op.n
        return op.through_copies(stack, eye)
    # stacked models, or a model vmap cannot stack: a product a column
    if op.stacked:
        eye = eye.expand(op.params.shape[0], op.n, op.n)
    return torch.cat([op.matmat(eye[..., i:i + chunk_size]) for i in range(0, op.n, chunk_size)], dim=-1)


def spectrum(matrix: torch.Tensor, matvecs: int) -> DenseSpectrum:
    """Eigendecomposition of the symmetrized matrix."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = torch.linalg.eigh(sym)
    return DenseSpectrum(sym, values, vectors, matvecs)


def spectra(matrices: torch.Tensor, matvecs: int) -> list[DenseSpectrum]:
    """:func:`spectrum` of each of a stack of matrices (m, n, n), with one batched ``eigh``."""
    sym = 0.5 * (matrices + matrices.mT)
    values, vectors = torch.linalg.eigh(sym)
    return [DenseSpectrum(sym[j], values[j], vectors[j], matvecs) for j in range(len(sym))]
