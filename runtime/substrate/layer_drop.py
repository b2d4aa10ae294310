"""Dropping a layer: the loss of the network with one hidden layer replaced by the identity.

For a layer h_ℓ = g_ℓ(h_{ℓ−1}) whose input and output widths are equal, dropping it
gives the network with h_ℓ = h_{ℓ−1}; for a residual block h_ℓ = h_{ℓ−1} + f_ℓ(h_{ℓ−1}),
dropping it is the same as removing its branch f_ℓ. The cost of the drop is
L(dropped) − L(full) (Veit, Wilber & Belongie 2016, "Residual Networks Behave Like
Ensembles of Relatively Shallow Networks"; Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers").

**Which layers.** For an ``nn.Sequential`` of ``nn.Linear`` layers and activations
(``mlp``, ``deep_linear``) every hidden ``nn.Linear`` with as many outputs as inputs
(not the output layer), together with the activation that follows it, is droppable;
it is labelled ``linear{k}``, k counting the linear layers from 0. Any other model
declares its droppable layers as an attribute mapping a label to the submodules
that become ``nn.Identity``, e.g. for residual blocks::

    self.droppable_layers = {"block1": ["blocks.1"], "block2": ["blocks.2"]}
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from basinprobe.registry import ProbeError
from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy

HOW_TO_DECLARE = ("declare them on the model: model.droppable_layers = {label: [submodule names that become "
                  "nn.Identity]} (see basinprobe.runtime.substrate.layer_drop)")


def droppable_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{label: [submodule names]}``: declared (``model.droppable_layers``) or derived for a Sequential MLP."""
    declared = getattr(model, "droppable_layers", None)
    if callable(declared):
        declared = declared()
    if declared is not None:
        layers = {str(label): [str(m) for m in modules] for label, modules in dict(declared).items()}
        known = dict(model.named_modules())
        for label, modules in layers.items():
            missing = [m for m in modules if m not in known or m == ""]
            if missing or not modules:
                raise ProbeError(f"droppable_layers[{label!r}] names {missing or 'no'} submodules the model does not "
                                 f"have; {HOW_TO_DECLARE}")
        return layers
    if isinstance(model, nn.Sequential):
        children = list(model.named_children())
        linears = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
        layers = {}
        for k, i in enumerate(linears[:-1]):      # the output layer is not a hidden layer
            layer = children[i][1]
            if layer.in_features == layer.out_features:
                end = linears[k + 1]
                layers[f"linear{k}"] = [name for name, _ in children[i:end]]
        return layers
    raise ProbeError(f"the droppable layers of a {type(model).__name__} cannot be determined (layer_drop knows "
                     f"nn.Sequential MLPs); {HOW_TO_DECLARE}, or set layer_drop: false")


def without(model: nn.Module, modules: list[str]) -> nn.Module:
    """A copy of ``model`` with each named submodule replaced by ``nn.Identity``."""
    dropped = copy.deepcopy(model)
    for path in modules:
        parent_path, _, child = path.rpartition(".")
        parent = dropped.get_submodule(parent_path) if parent_path else dropped
        setattr(parent, child, nn.Identity())
    return dropped


class _DroppedView:
    """What ``stacked_loss_and_accuracy`` reads from a context, with the forward of a dropped model."""

    def __init__(self, ctx, model: nn.Module):
        self._ctx, self._model = ctx, model
        self._kept = [name for name, _ in model.named_parameters()]
        self._buffers = dict(model.named_buffers())
        self.data, self.loss_fn, self.task = ctx.data, ctx.loss_fn, ctx.task

    def batches(self, split: str = "train", batch_size: int | None = None):
        return self._ctx.batches(split, batch_size)

    def forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self._ctx.unflatten(flat)
        return functional_call(self._model, ({k: params[k] for k in self._kept}, self._buffers), (x,))


def layer_drop_loss_and_accuracy(ctx, flat: torch.Tensor, modules: list[str], split: str = "train"
                                 ) -> tuple[float, float | None]:
    """Loss (and accuracy) over ``split`` of ``ctx``'s model at ``flat`` with ``modules`` replaced by identity."""
    view = _DroppedView(ctx, without(ctx.model, modules))
    try:
        loss, accuracy = stacked_loss_and_accuracy(view, flat[None], split)
    except RuntimeError as exc:
        raise ProbeError(f"dropping {', '.join(modules)} breaks the forward pass ({exc}); a droppable layer must "
                         f"map its input to an output of the same shape") from None
    return float(loss[0]), None if accuracy is None else float(accuracy[0])

