"""Probe ``evaluate``: loss and accuracy on the train and test splits."""

from __future__ import annotations

import math

import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError

SPLITS = ["train", "test"]


class Evaluate(Probe):
    """L(θ) = (1/N) Σ ℓ(f_θ(x_i), y_i) over each split; accuracy = mean 1[argmax f_θ(x_i) = y_i]."""

    name = "evaluate"
    description = "loss and accuracy (classification) on the train and test splits"
    schema = {
        "type": "object",
        "properties": {
            "splits": {"type": "array", "items": {"enum": SPLITS}, "minItems": 1, "uniqueItems": True,
                       "default": SPLITS, "description": "which splits to evaluate"},
        },
        "additionalProperties": False,
    }

    def cost(self, params, n_params, n_train):
        return 1.25 * n_train * len(params["splits"])  # one forward over train (+ test, ~25% of it)

    def run(self, ctx, params):
        splits = params["splits"]
        losses, accuracies = [], []
        with torch.no_grad():
            for split in splits:
                if len(ctx.data.split(split)[0]) == 0:
                    losses.append(math.nan)
                    accuracies.append(math.nan)
                    continue
                loss = float(ctx.loss(split=split))
                if not math.isfinite(loss):
                    raise ProbeError(f"the loss on the {split} split is {loss}: the model's outputs are not finite")
                losses.append(loss)
                accuracies.append(ctx.accuracy(split=split))
        data = {"loss": ("split", losses, {"description": "mean loss over the split",
                                           "nan_means": "the split is empty"})}
        if ctx.task == "classification":
            data["accuracy"] = ("split", accuracies, {"description": "fraction of examples classified correctly",
                                                      "units": "fraction", "nan_means": "the split is empty"})
        return xr.Dataset(data, coords={"split": splits})
