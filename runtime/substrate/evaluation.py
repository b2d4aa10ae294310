"""Loss and accuracy at many parameter vectors at once.

For a stack Θ = (θ_1, ..., θ_m) of flat parameter vectors, computes
L(θ_j) = (1/N) Σ_i ℓ(f_{θ_j}(x_i), y_i) for every j with one batched forward per
data batch: ``torch.func.vmap`` over ``functional_call``. Used for cells that share
an architecture (batched cells), points along an interpolation path, and any probe
that evaluates many models.
"""

from __future__ import annotations

import torch
from torch.func import vmap


@torch.no_grad()
def stacked_loss_and_accuracy(ctx, flats: torch.Tensor, split: str = "train", batch_size: int | None = None,
                              models_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss (m,), accuracy (m,) or None)`` over a whole split for each row of ``flats`` (m, n).

    ``models_per_chunk`` bounds memory (activations scale with models x batch).
    """
    X, _ = ctx.data.split(split)
    m = flats.shape[0]
    chunk = models_per_chunk or m
    loss_sum = torch.zeros(m, dtype=torch.float64, device=flats.device)
    correct = torch.zeros(m, dtype=torch.float64, device=flats.device)
    forward = vmap(lambda flat, x: ctx.forward(flat, x), in_dims=(0, None))
    per_model_loss = vmap(ctx.loss_fn, in_dims=(0, None))
    for xb, yb in ctx.batches(split, batch_size):
        for start in range(0, m, chunk):
            outputs = forward(flats[start:start + chunk], xb)
            loss_sum[start:start + chunk] += per_model_loss(outputs, yb).double() * len(xb)
            if ctx.task == "classification":
                correct[start:start + chunk] += (outputs.argmax(-1) == yb).sum(-1).double()
    n = len(X)
    accuracy = correct / n if ctx.task == "classification" else None
    return loss_sum / n, accuracy
