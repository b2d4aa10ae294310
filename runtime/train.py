"""The ``train:`` block: an ordinary optimizer loop that records checkpoints."""

from __future__ import annotations

import math

import torch
from torch.nn.utils import vector_to_parameters

from basinprobe.registry import Dataset
from basinprobe.runtime.build import flat_parameters


class TrainingDiverged(Exception):
    pass


def make_optimizer(params, opt) -> torch.optim.Optimizer:
    if opt.kind == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0,
                               weight_decay=opt.weight_decay)
    if opt.kind == "adam":
        return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    if opt.kind == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
    raise ValueError(f"unknown optimizer {opt.kind!r}")


def train(model: torch.nn.Module, data: Dataset, loss_fn, cfg, generator: torch.Generator,
          progress=None) -> dict[int, torch.Tensor]:
    """Train ``model`` in place; return ``{step: flat parameters}`` at ``cfg.checkpoint_steps``.

    Minibatches are drawn without replacement from ``generator``, epoch after
    epoch, so a seed fixes the run bit for bit on CPU.
    """
    X, y = data.X_train, data.y_train
    n = len(X)
    batch = min(cfg.batch_size, n)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    wanted = set(cfg.checkpoint_steps)
    trajectory = {0: flat_parameters(model)} if 0 in wanted else {}
    order, cursor = torch.randperm(n, generator=generator), 0
    for step in range(1, cfg.steps + 1):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + batch].to(X.device)
        cursor += batch
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(X[idx]), y[idx])
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(
                f"training diverged at step {step} (loss {loss.item()}); "
                f"lower train.optimizer.lr (now {cfg.optimizer.lr})"
            )
        loss.backward()
        optimizer.step()
        if step in wanted:
            trajectory[step] = flat_parameters(model)
        if progress is not None:
            progress.advance(1)
    return trajectory


def set_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    vector_to_parameters(flat.to(next(model.parameters()).device), model.parameters())
