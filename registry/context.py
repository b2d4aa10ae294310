"""What ``Probe.run(ctx, params)`` receives: the context of one cell.

The runtime implements this protocol (``basinprobe.runtime.context.CellContext``);
it is written out here so a plugin author can read the whole surface in one place.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Iterator, Protocol

import torch

from basinprobe.registry.dataset import Dataset


class Progress(Protocol):
    def advance(self, n: int = 1) -> None: ...


class Context(Protocol):
    # --- where and how --------------------------------------------------------------
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator      # seeded from (spec seed, cell, probe entry name)
    seed: int                       # the integer that seeded ``generator``
    cell: dict[str, Any]            # the cell's coordinates: sweep axes and ``checkpoint``
    checkpoint: int                 # training step of this cell (0 if untrained)
    compile: bool                   # the spec asked for torch.compile of hot loops (execution.compile)

    # --- the model, functionally ------------------------------------------------------
    model: torch.nn.Module          # on device/dtype; its own tensors are not the cell's parameters
    params: dict[str, torch.Tensor]   # the cell's parameters by name (detached)
    flat_params: torch.Tensor         # the same, as one 1-D vector (n_params,)
    param_names: list[str]
    param_shapes: list[torch.Size]
    n_params: int

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dict of tensors -> one vector, in ``param_names`` order."""

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vector -> dict of views shaped like the parameters (differentiable)."""

    def forward(self, params: dict[str, torch.Tensor] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's outputs at ``params`` (a dict or a flat vector), via ``functional_call``.

        Works under ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ...).
        """

    # --- data and loss ------------------------------------------------------------------
    data: Dataset                   # on device; floats in ``dtype``
    task: str                       # "classification" | "regression"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # mean over the batch
    batch_size: int                 # the spec's data.batch_size

    def batches(self, split: str = "train", batch_size: int | None = None,
                shuffle: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Minibatches of a split (``shuffle`` draws from ``generator``)."""

    def loss(self, params: dict[str, torch.Tensor] | torch.Tensor | None = None,
             split: str = "train") -> torch.Tensor:
        """The mean loss over a whole split at ``params`` (default: the cell's), batched;
        differentiable in ``params``."""

    def accuracy(self, params: dict[str, torch.Tensor] | torch.Tensor | None = None,
                 split: str = "train") -> float | None:
        """Accuracy over a split (classification only, else ``None``)."""

    # --- the training run ---------------------------------------------------------------
    trajectory: dict[int, torch.Tensor]   # step -> flat parameters, every stored checkpoint
    init_params: torch.Tensor             # flat parameters at step 0 (initialization)

    # --- shared pieces, progress, warnings ---------------------------------------------
    def artifact(self, name: str, **kwargs) -> Any:
        """A shared artifact of the runtime's substrate (computed once per cell per arguments; those
        registered ``run_shared``, asked ``at`` a checkpoint, once per training run)."""

    def progress(self, total: int, description: str) -> AbstractContextManager[Progress]:
        """A progress bar for long loops inside a probe."""

    def warn(self, message: str) -> None:
        """Record a warning: printed, and stored in the group's ``warnings`` attr."""


class Member(Protocol):
    """One cell of a group."""

    coords: dict[str, Any]          # all its cell coordinates (sweep axes and ``checkpoint``)
    checkpoint: int

    def context(self) -> Context:
        """The cell's full :class:`Context` (built on first use)."""


class GroupContext(Protocol):
    """What ``run(ctx, params)`` receives for a probe with ``scope = "group"``."""

    members: list[Member]           # the cells of this group, in sweep order then checkpoint order
    coords: dict[str, Any]          # the cell coordinates shared by all members (the group's own)
    spanned: list[str]              # the cell dims the group spans
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    seed: int

    def progress(self, total: int, description: str) -> AbstractContextManager[Progress]: ...

    def warn(self, message: str) -> None: ...
