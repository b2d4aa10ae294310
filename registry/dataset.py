"""What a dataset factory returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Dataset:
    """A supervised data set split into train and test tensors.

    ``task`` is ``"classification"`` (``y`` holds integer class labels and
    ``n_classes`` is set) or ``"regression"`` (``y`` holds float targets of
    shape ``(n, out)``). ``info`` is stored in the run's attributes, so it
    should hold plain JSON values (the seed, the split sizes, ...).
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    task: str = "regression"
    n_classes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', not {self.task!r}")
        if self.task == "classification" and (self.y_train.is_floating_point() or self.y_test.is_floating_point()):
            raise ValueError("a classification dataset's y must hold integer class labels (one per example), "
                             f"not {self.y_train.dtype}: convert them with y.long()")
        if self.task == "classification" and self.n_classes is None:
            self.n_classes = int(max(self.y_train.max(), self.y_test.max() if len(self.y_test) else 0)) + 1
        if len(self.X_train) != len(self.y_train) or len(self.X_test) != len(self.y_test):
            raise ValueError("X and y must have the same number of rows in each split")

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.X_train, self.y_train
        if name == "test":
            return self.X_test, self.y_test
        raise ValueError(f"unknown split {name!r}: use 'train' or 'test'")

    def to(self, device, dtype) -> "Dataset":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

        return Dataset(
            move(self.X_train), move(self.y_train), move(self.X_test), move(self.y_test),
            self.task, self.n_classes, dict(self.info),
        )
