"""The ``train:`` block: an ordinary optimizer loop that records checkpoints."""

from __future__ import annotations

import math

import torch
from torch.nn.utils import vector_to_parameters

from basinprobe.registry import Dataset
from basinprobe.runtime.build import flat_parameters


class TrainingDiverged(Exception):
    """Training met a non-finite loss; ``reached`` holds the checkpoints stored before it."""

    def __init__(self, message: str, reached: dict[int, torch.Tensor] | None = None):
        super().__init__(message)
        self.reached = dict(reached or {})


class Optimizer:
    """SGD (with momentum, Nesterov), Adam and AdamW: torch.optim's update rules, step for step.

    Written out rather than taken from ``torch.optim`` because building a ``torch.optim``
    optimizer imports ``torch._dynamo``, ~2 s that every training command and every
    dask worker would pay. The arithmetic is that of torch.optim's single-tensor path (the
    one it takes for CPU tensors), so the parameters equal torch.optim's bit for bit on CPU
    (tested). Parameters without a gradient are left alone and do not count a step, as there.
    """

    EPS = 1e-8   # Adam's ε, torch.optim's default

    def __init__(self, params, spec):
        if spec.kind not in ("sgd", "adam", "adamw"):
            raise ValueError(f"unknown optimizer {spec.kind!r}: use sgd, adam or adamw")
        self.params = list(params)
        self.spec = spec
        self.state: list[dict] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        update = self._sgd if self.spec.kind == "sgd" else self._adam
        for p, state in zip(self.params, self.state):
            if p.grad is not None:
                update(p, p.grad, state)

    def _sgd(self, p, grad, state) -> None:
        spec = self.spec
        if spec.weight_decay != 0:
            grad = grad.add(p, alpha=spec.weight_decay)
        if spec.momentum != 0:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = grad.detach().clone()
            else:
                buf.mul_(spec.momentum).add_(grad)
            grad = grad.add(buf, alpha=spec.momentum) if spec.nesterov else buf
        p.add_(grad, alpha=-spec.lr)

    def _adam(self, p, grad, state) -> None:
        spec = self.spec
        beta1, beta2 = spec.betas
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t, exp_avg, exp_avg_sq = float(state["step"]), state["exp_avg"], state["exp_avg_sq"]
        if spec.weight_decay != 0:
            if spec.kind == "adamw":   # decoupled (Loshchilov & Hutter 2019)
                p.mul_(1 - spec.lr * spec.weight_decay)
            else:
                grad = grad.add(p, alpha=spec.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = spec.lr / (1 - beta1 ** t)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add_(self.EPS)
        p.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(params, opt) -> Optimizer:
    """The optimizer an :class:`basinprobe.runtime.spec.OptimizerSpec` names, over ``params``."""
    return Optimizer(params, opt)


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
        optimizer.zero_grad()
        loss = loss_fn(model(X[idx]), y[idx])
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(
                f"training diverged at step {step} (loss {loss.item()}); "
                f"lower train.optimizer.lr (now {cfg.optimizer.lr})", trajectory
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
