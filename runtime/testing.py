"""Helpers for tests of probes and plugins: a cell context without a spec."""

from __future__ import annotations

import torch
from torch.nn.utils import parameters_to_vector

from basinprobe.registry import Dataset
from basinprobe.runtime.context import CellContext


def make_context(model: torch.nn.Module, data: Dataset, loss_fn, *, dtype=torch.float64,
                 device="cpu", seed: int = 0, trajectory: dict | None = None,
                 batch_size: int | None = None) -> CellContext:
    """A :class:`CellContext` for ``model`` at its current parameters."""
    model = model.to(device=device, dtype=dtype)
    flat = parameters_to_vector(model.parameters()).detach()
    return CellContext(model, flat, data, loss_fn, device=device, dtype=dtype, seed=seed,
                       trajectory=trajectory, batch_size=batch_size)


def regression_data(X: torch.Tensor, y: torch.Tensor, X_test=None, y_test=None) -> Dataset:
    """A regression :class:`Dataset` from tensors (test split defaults to empty)."""
    if y.dim() == 1:
        y = y[:, None]
    X_test = X[:0] if X_test is None else X_test
    y_test = y[:0] if y_test is None else (y_test[:, None] if y_test.dim() == 1 else y_test)
    return Dataset(X, y, X_test, y_test, task="regression")


def fit(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn, *, steps: int = 300,
        lr: float = 0.01) -> torch.nn.Module:
    """Train ``model`` in place by full-batch Adam (a solution to probe around); returns it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()
    return model
