"""The built-in losses, each the mean over the batch."""

import torch
import torch.nn.functional as F


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (outputs - targets)^2, as ``F.mse_loss``."""
    return F.mse_loss(outputs, targets.reshape(outputs.shape))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of logits against integer labels, -mean_i log softmax(z_i)[y_i].

    As ``F.cross_entropy`` to rounding (tested), but written out: under ``vmap`` (stacked models,
    chains) ``F.cross_entropy`` runs a Python decomposition of ``nll_loss``, which made the loss
    10% and its gradient 18% slower (16 stacked models, 128 examples) and, on first use, imports
    sympy (~0.6 s of every process that evaluates a classifier).
    """
    log_p = torch.log_softmax(outputs, dim=-1)
    return -log_p.gather(-1, targets.unsqueeze(-1)).mean()


LOSSES = {"mse": mse, "cross_entropy": cross_entropy}
