"""Probe ``evaluate``: loss and accuracy on the train and test splits."""

from __future__ import annotations

import math

import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy

SPLITS = ["train", "test"]


class Evaluate(Probe):
    """L(θ) = (1/N) Σ ℓ(f_θ(x_i), y_i) over each split; accuracy = mean 1[argmax f_θ(x_i) = y_i]."""

    name = "evaluate"
    batched = True
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
        return self.run_batched([ctx], params)[0]

    def run_batched(self, ctxs, params):
        """All cells at once: one vmapped forward per data batch over the stacked parameters."""
        splits = params["splits"]
        first = ctxs[0]
        flats = torch.stack([ctx.flat_params for ctx in ctxs])
        losses = torch.full((len(ctxs), len(splits)), math.nan, dtype=torch.float64)
        accuracies = torch.full_like(losses, math.nan)
        for j, split in enumerate(splits):
            if len(first.data.split(split)[0]) == 0:
                continue
            loss, accuracy = stacked_loss_and_accuracy(first, flats, split)
            losses[:, j] = loss.cpu()
            if accuracy is not None:
                accuracies[:, j] = accuracy.cpu()
        results = []
        for i, ctx in enumerate(ctxs):
            for j, split in enumerate(splits):
                if losses[i, j].isinf() or (losses[i, j].isnan() and len(ctx.data.split(split)[0])):
                    raise ProbeError(f"the loss on the {split} split is {float(losses[i, j])}: "
                                     "the model's outputs are not finite")
            data = {"loss": ("split", losses[i].tolist(), {"description": "mean loss over the split",
                                                          "nan_means": "the split is empty"})}
            if ctx.task == "classification":
                data["accuracy"] = ("split", accuracies[i].tolist(),
                                    {"description": "fraction of examples classified correctly",
                                     "units": "fraction", "nan_means": "the split is empty"})
            results.append(xr.Dataset(data, coords={"split": splits}))
        return results
