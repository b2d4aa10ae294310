"""The context of one cell: what a probe's ``run(ctx, params)`` works with.

It implements the protocol of :mod:`basinprobe.registry.context`.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Callable, Iterator

import torch
from torch.func import functional_call

from basinprobe.registry import Dataset
from basinprobe.runtime import artifacts


class ProbeWarning(RuntimeWarning):
    """What ``ctx.warn`` issues. The runtime also records the message with the cell (the group's
    ``warnings`` attr) and the command line prints it once, labelled with its cell."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def null_progress(total: int, description: str):
    yield _NullProgress()


class CellContext:
    def __init__(
        self,
        model: torch.nn.Module,
        flat_params: torch.Tensor,
        data: Dataset,
        loss_fn: Callable,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        cell: dict | None = None,
        checkpoint: int = 0,
        trajectory: dict[int, torch.Tensor] | None = None,
        batch_size: int | None = None,
        progress_factory: Callable = null_progress,
        compile: bool = False,
        run_seed: int | None = None,
        run_artifacts: dict | None = None,
    ):
        self.compile = compile  # wrap hot inner loops in torch.compile (substrate.compiled)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype)
        self.param_names = [name for name, _ in self.model.named_parameters()]
        self.param_shapes = [p.shape for _, p in self.model.named_parameters()]
        self._numels = [p.numel() for _, p in self.model.named_parameters()]
        self.n_params = sum(self._numels)
        self.flat_params = flat_params.detach().to(device=self.device, dtype=dtype)
        if self.flat_params.numel() != self.n_params:
            raise ValueError(f"{self.flat_params.numel()} parameters given for a model with {self.n_params}")
        self.params = {k: v.detach() for k, v in self.unflatten(self.flat_params).items()}
        self.buffers = dict(self.model.named_buffers())
        self.data = data.to(self.device, dtype)
        self.task = data.task
        self.loss_fn = loss_fn
        self.batch_size = batch_size or len(data.X_train)
        self.cell_seed = seed  # artifacts seed themselves from this, so sharing does not depend on order
        # artifacts at a checkpoint of the training run seed themselves from the run and are
        # cached for all of the run's cells (artifacts.RUN_SHARED)
        self.run_seed = seed if run_seed is None else run_seed
        self._run_artifacts = {} if run_artifacts is None else run_artifacts
        self.begin_entry(seed)
        self.cell = dict(cell or {})
        self.checkpoint = checkpoint
        self.trajectory = {
            int(k): v.detach().to(device=self.device, dtype=dtype) for k, v in (trajectory or {checkpoint: flat_params}).items()
        }
        self.init_params = self.trajectory[min(self.trajectory)]
        self._progress_factory = progress_factory
        self._artifacts: dict = {}

    def begin_entry(self, seed: int) -> None:
        """Start a probe entry: its own seeded generator, its own warnings."""
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.warnings = []

    # --- parameters -------------------------------------------------------------------
    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[name].reshape(-1) for name in self.param_names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(flat, self._numels)
        return {name: piece.view(shape) for name, piece, shape in zip(self.param_names, pieces, self.param_shapes)}

    def _as_dict(self, params) -> dict[str, torch.Tensor]:
        if params is None:
            return self.params
        if isinstance(params, torch.Tensor):
            return self.unflatten(params)
        return params

    def forward(self, params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (self._as_dict(params), self.buffers), (x,))

    # --- data and loss ------------------------------------------------------------------
    def batches(self, split: str = "train", batch_size: int | None = None, shuffle: bool = False) -> Iterator:
        X, y = self.data.split(split)
        size = batch_size or self.batch_size
        order = torch.randperm(len(X), generator=self.generator).to(self.device) if shuffle else None
        for start in range(0, len(X), size):
            if order is None:
                yield X[start:start + size], y[start:start + size]
            else:
                idx = order[start:start + size]
                yield X[idx], y[idx]

    def loss(self, params=None, split: str = "train") -> torch.Tensor:
        params = self._as_dict(params)
        X, _ = self.data.split(split)
        total = 0.0
        for xb, yb in self.batches(split):
            total = total + self.loss_fn(self.forward(params, xb), yb) * len(xb)
        return total / len(X)

    @torch.no_grad()
    def accuracy(self, params=None, split: str = "train") -> float | None:
        if self.task != "classification":
            return None
        params = self._as_dict(params)
        X, _ = self.data.split(split)
        if len(X) == 0:
            return float("nan")
        correct = 0
        for xb, yb in self.batches(split):
            correct += int((self.forward(params, xb).argmax(-1) == yb).sum())
        return correct / len(X)

    # --- shared pieces ------------------------------------------------------------------
    def artifact(self, name: str, **kwargs):
        key, run_shared = artifacts.request(name, kwargs)
        cache = self._run_artifacts if run_shared else self._artifacts
        if key not in cache:
            cache[key] = artifacts.producer(name)(self, **kwargs)
        return cache[key]

    def progress(self, total: int, description: str):
        return self._progress_factory(total, description)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, ProbeWarning, stacklevel=2)


class Member:
    """One cell of a group: its coordinates and a lazily built :class:`CellContext`."""

    def __init__(self, coords: dict, checkpoint: int, build: Callable[[], CellContext]):
        self.coords, self.checkpoint, self._build, self._context = coords, checkpoint, build, None

    def context(self) -> CellContext:
        if self._context is None:
            self._context = self._build()
        return self._context


class GroupContext:
    """The context of a group-scoped probe: the member cells and the shared services."""

    def __init__(self, members: list[Member], coords: dict, spanned: list[str], *, device, dtype, seed: int,
                 progress_factory: Callable = null_progress):
        self.members, self.coords, self.spanned = members, dict(coords), list(spanned)
        self.device, self.dtype = torch.device(device), dtype
        self._progress_factory = progress_factory
        self.begin_entry(seed)

    def begin_entry(self, seed: int) -> None:
        """Start a run: its own seeded generator, its own warnings."""
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.warnings: list[str] = []

    def progress(self, total: int, description: str):
        return self._progress_factory(total, description)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, ProbeWarning, stacklevel=2)
