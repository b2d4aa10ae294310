"""Probe ``lottery_subspace``: training in small subspaces, their stability over training, and
pruning by subspace.

Trains θ = θ0 + P z with only z free (Li et al. 2018, intrinsic dimension) for every basis
(random, top Hessian eigenvectors, principal directions of the training trajectory — the
lottery subspace of Larsen et al. 2022 — or of minibatch gradients), every dim and every
repeat, and reports the smallest dim reaching ``threshold`` of the unrestricted model
(``dim90``). Optionally: the overlap ‖U_aᵀU_b‖_F²/k of this checkpoint's top-k Hessian
eigenspace with every other checkpoint's, the fraction of the gradient inside the top-k
eigenspace (Gur-Ari et al. 2018), and pruning by weight, by neuron and by per-layer SVD at
equal parameter budgets. Numerics: :mod:`basinprobe.runtime.substrate.subspace` and
:mod:`basinprobe.runtime.substrate.pruning`; the eigenvectors come from the curvature
engine (``hessian.eigen``).

Stability is measured from the cell: the context holds every stored checkpoint of the run
(``ctx.trajectory``) and ``hessian.eigen`` takes ``at=step``, so each cell compares its own
eigenspace with those of all checkpoints and the result is per cell, like every other
variable of the probe.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.spec import OptimizerSpec
from basinprobe.runtime.substrate import pruning, subspace
from basinprobe.runtime.substrate.curvature import choose_method
from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy

BASES = ("random", "hessian", "trajectory", "gradient")
MODELS_PER_EVALUATION = 64
UNAVAILABLE = "the basis has fewer directions than this dim (trajectory: checkpoints − 1; gradient: minibatches)"
DIVERGED = "training in this subspace diverged (the loss became NaN/inf); lower lr"
NOT_REACHED = "no dim in dims reached the threshold"

_K = {"type": "integer", "minimum": 1}


class LotterySubspace(Probe):
    name = "lottery_subspace"
    description = ("training in random / Hessian / trajectory / gradient subspaces (intrinsic dimension, dim90), "
                   "Hessian eigenspace stability over checkpoints, gradient overlap, pruning by subspace")
    schema = {
        "type": "object",
        "properties": {
            "dims": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "uniqueItems": True,
                     "default": [2, 8, 32], "description": "subspace dimensions d to train in"},
            "bases": {"type": "array", "items": {"enum": list(BASES)}, "minItems": 1, "uniqueItems": True,
                      "default": ["random"],
                      "description": "random (unit-norm Gaussian columns, or sparse: see projection); hessian (top-d "
                                     "eigenvectors at the anchor); trajectory (top-d principal directions of the "
                                     "training run's displacements θ_t − θ_0); gradient (top-d principal directions "
                                     "of minibatch gradients at the anchor)"},
            "anchor": {"enum": ["init", "cell"], "default": "init",
                       "description": "θ0 of the subspace: the run's initialization (Li et al.) or this cell's "
                                      "parameters"},
            "repeats": {"type": "integer", "minimum": 1, "default": 4,
                        "description": "independent random bases, trained together (deterministic bases train once)"},
            "optimizer": {"enum": ["sgd", "adam", "adamw"], "default": "adam",
                          "description": "optimizer of z (and of the unrestricted model)"},
            "lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.01, "description": "learning rate"},
            "momentum": {"type": "number", "minimum": 0, "default": 0.0, "description": "SGD momentum"},
            "weight_decay": {"type": "number", "minimum": 0, "default": 0.0, "description": "weight decay on z"},
            "steps": {"type": "integer", "minimum": 1, "default": 500, "description": "optimizer steps"},
            "batch_size": {"anyOf": [{"enum": ["data", "full"]}, {"type": "integer", "minimum": 1}],
                           "default": "data",
                           "description": "examples per step: the spec's data.batch_size, the full training set, "
                                          "or a number"},
            "split": {"enum": ["train", "test"], "default": "train",
                      "description": "split on which loss, accuracy and pruning are measured (training is always "
                                     "on train)"},
            "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.9,
                          "description": "dim90: fraction of the unrestricted model's accuracy (classification) or "
                                         "loss reduction from θ0 (regression) a dim must reach"},
            "projection": {"enum": ["auto", "dense", "sparse"], "default": "auto",
                           "description": "random basis: dense Gaussian columns, a very sparse projection (⌈√n⌉ "
                                          "nonzeros per column), or auto: dense unless it exceeds max_dense_mb"},
            "max_dense_mb": {"type": "number", "exclusiveMinimum": 0, "default": 1024,
                             "description": "memory budget of a dense random projection (repeats·n·max(dims) "
                                            "numbers) before auto switches to sparse"},
            "gradient_batches": {"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}], "default": "auto",
                                 "description": "minibatch gradients whose principal directions form the gradient "
                                                "basis; auto = 2·max(dims)"},
            "curvature": {"enum": ["hessian", "ggn"], "default": "hessian",
                          "description": "operator whose top eigenvectors form the hessian basis, the stability "
                                         "spaces and the gradient_overlap space"},
            "eigensolver": {"enum": ["auto", "lanczos", "dense"], "default": "auto",
                            "description": "how hessian.eigen finds the top eigenvectors: Lanczos (about 4k + 30 "
                                           "curvature products), the dense matrix (n products), or auto: Lanczos when "
                                           "10·k + 100 < n"},
            "stability": {"anyOf": [{"const": False}, {
                "type": "object",
                "properties": {"k": {"anyOf": [_K, {"type": "array", "items": _K, "minItems": 1,
                                                    "uniqueItems": True}],
                                     "description": "size of the top eigenspace; a list adds a dim k"}},
                "required": ["k"], "additionalProperties": False}],
                "default": False,
                "description": "subspace_overlap: top-k eigenspace overlap of this cell with every stored "
                               "checkpoint of the run"},
            "gradient_overlap": {"anyOf": [{"const": False}, {
                "type": "object",
                "properties": {"k": {"anyOf": [{"const": "auto"}, _K], "default": "auto",
                                     "description": "size of the top eigenspace; auto = number of classes "
                                                    "(outputs for regression)"}},
                "additionalProperties": False}],
                "default": False,
                "description": "fraction ‖P_top g‖²/‖g‖² of the full-batch gradient in the top-k eigenspace"},
            "prune": {"anyOf": [{"const": False}, {
                "type": "object",
                "properties": {
                    "keep": {"type": "array", "minItems": 1, "uniqueItems": True,
                             "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                             "description": "fractions of hidden units kept; magnitude and subspace pruning get "
                                            "the same per-layer weight budget"},
                    "methods": {"type": "array", "items": {"enum": list(pruning.METHODS)}, "minItems": 1,
                                "uniqueItems": True, "default": list(pruning.METHODS),
                                "description": "magnitude (per weight), neuron (whole hidden units), subspace "
                                               "(per-layer SVD truncation)"},
                },
                "required": ["keep"], "additionalProperties": False}],
                "default": False,
                "description": "prune this cell's parameters at equal per-layer budgets"},
        },
        "additionalProperties": False,
    }

    def artifact_requests(self, params):
        requests = []
        common = {"which": "top", "operator": params.get("curvature", "hessian")}
        if "hessian" in params.get("bases", []):
            requests.append(("hessian.eigen", {**common, "k": max(params.get("dims", [1])), "at": params["anchor"]}))
        if params.get("stability", False) is not False:
            k = params["stability"]["k"]
            requests.append(("hessian.eigen", {**common, "k": max(k) if isinstance(k, list) else k,
                                               "at": "every checkpoint"}))
        if params.get("gradient_overlap", False) is not False:
            requests.append(("hessian.eigen", {**common, "k": params["gradient_overlap"].get("k", "auto")}))
            requests.append(("hessian.operator", {}))  # its gradient
        return requests

    def cost(self, params, n_params, n_train):
        batch = params.get("batch_size", "data")
        batch = n_train if not isinstance(batch, int) else min(batch, n_train)
        bases = params.get("bases", ["random"])
        models = 1 + len(params.get("dims", [])) * sum(params.get("repeats", 4) if b == "random" else 1 for b in bases)
        return 3.0 * params.get("steps", 500) * batch * models

    def check(self, params, n_params, n_train):
        _check_params(params, sorted(int(d) for d in params["dims"]), n_params)

    def run(self, ctx, params):
        dims = sorted(int(d) for d in params["dims"])
        bases = list(params["bases"])
        n = ctx.n_params
        _check(ctx, params, dims)
        X, y = ctx.data.X_train, ctx.data.y_train
        batch_size = {"data": ctx.batch_size, "full": len(X)}.get(params["batch_size"], params["batch_size"])
        batch_size = min(int(batch_size), len(X))
        optimizer = OptimizerSpec(kind=params["optimizer"], lr=float(params["lr"]), momentum=float(params["momentum"]),
                                  nesterov=False, weight_decay=float(params["weight_decay"]), betas=(0.9, 0.999))
        init_step = min(ctx.trajectory)
        anchor_at = None if params["anchor"] == "cell" or init_step == ctx.checkpoint else init_step
        theta0 = ctx.flat_params if anchor_at is None else ctx.trajectory[anchor_at]
        split = params["split"]
        classification = ctx.task == "classification"
        repeats = params["repeats"]
        attrs = {"anchor": params["anchor"], "batch_size": batch_size, "n_params": n, "split": split,
                 "anchor_checkpoint": int(ctx.checkpoint if anchor_at is None else anchor_at)}

        def train(projection, train_dims, bar):
            # Every run draws the same minibatch sequence: the bases and the full model see the same data.
            generator = _generator(ctx, 0)
            return subspace.train_in_subspace(ctx.forward, ctx.loss_fn, theta0, projection, train_dims, X, y,
                                              optimizer, params["steps"], batch_size, generator,
                                              compile=ctx.compile, progress=bar)

        def evaluate(flats):
            loss, accuracy = stacked_loss_and_accuracy(ctx, flats, split, models_per_chunk=MODELS_PER_EVALUATION)
            return loss.cpu().numpy(), None if accuracy is None else accuracy.cpu().numpy()

        anchor_loss, anchor_accuracy = evaluate(theta0[None])
        shape = (len(bases), len(dims), repeats)
        loss = np.full(shape, np.nan)
        accuracy = np.full(shape, np.nan)
        unavailable = np.zeros(shape, dtype=bool)
        diverged = np.zeros(shape, dtype=bool)
        total = params["steps"] * (1 + len(bases))
        with ctx.progress(total, f"lottery_subspace: {len(bases)} bases x {len(dims)} dims") as bar:
            full = train(subspace.IdentityProjection(n), [n], bar)
            if bool(full.diverged.any()):
                raise ProbeError(f"training the unrestricted model diverged (loss NaN/inf) at lr {params['lr']}; "
                                 "lower lr")
            full_loss, full_accuracy = evaluate(full.params[0])
            for i, basis in enumerate(bases):
                projection = self._basis(ctx, params, basis, dims, theta0, anchor_at, attrs, batch_size)
                usable = [d for d in dims if d <= projection.dim]
                if len(usable) < len(dims):
                    ctx.warn(f"the {basis} basis has {projection.dim} directions; dims "
                             f"{[d for d in dims if d > projection.dim]} are left NaN ({UNAVAILABLE})")
                    unavailable[i, len(usable):] = True
                if not usable:
                    bar.advance(params["steps"])
                    continue
                run = train(projection, usable, bar)
                g, s = run.params.shape[:2]
                run_loss, run_accuracy = evaluate(run.params.reshape(g * s, n))
                # (g, s) -> (dims, repeats); a deterministic basis (g = 1) is the same in every repeat.
                loss[i, :s] = np.broadcast_to(run_loss.reshape(g, s).T, (s, repeats))
                if run_accuracy is not None:
                    accuracy[i, :s] = np.broadcast_to(run_accuracy.reshape(g, s).T, (s, repeats))
                diverged[i, :s] = np.broadcast_to(run.diverged.cpu().numpy().T, (s, repeats))
                attrs[f"projection_{basis}"] = projection.kind
                attrs[f"projection_bytes_{basis}"] = int(projection.nbytes)
        bad = diverged | ~np.isfinite(loss) & ~unavailable
        if bad.any():
            ctx.warn(f"{int(bad.sum())} subspace runs diverged and are stored as NaN (see {DIVERGED!r}); lower lr")
            loss[bad] = np.nan
            accuracy[bad] = np.nan

        dim90 = self._dim90(ctx, params, bases, dims, loss, accuracy, float(anchor_loss[0]), float(full_loss[0]),
                            None if full_accuracy is None else float(full_accuracy[0]), attrs)
        nan_means = f"{UNAVAILABLE}; or {DIVERGED}"
        data_vars = {
            "loss": xr.DataArray(loss, dims=("basis", "subspace_dim", "repeat"), attrs={
                "description": f"{split} loss after training θ0 + P z in the first subspace_dim directions of the "
                               "basis (deterministic bases: the same in every repeat)", "units": "loss",
                "nan_means": nan_means}),
            "full_loss": xr.DataArray(float(full_loss[0]), attrs={
                "description": f"{split} loss of the unrestricted model trained from θ0 the same way",
                "units": "loss"}),
            "anchor_loss": xr.DataArray(float(anchor_loss[0]), attrs={
                "description": f"{split} loss at θ0 (the anchor) before training", "units": "loss"}),
            "dim90": xr.DataArray(dim90, dims=("basis",), attrs={
                "description": f"smallest dim reaching threshold {params['threshold']} of the unrestricted model "
                               f"({attrs['dim90_metric']})", "nan_means": NOT_REACHED}),
        }
        if classification:
            data_vars["accuracy"] = xr.DataArray(accuracy, dims=("basis", "subspace_dim", "repeat"), attrs={
                "description": f"{split} accuracy after training in the subspace", "nan_means": nan_means})
            data_vars["full_accuracy"] = xr.DataArray(float(full_accuracy[0]), attrs={
                "description": f"{split} accuracy of the unrestricted model trained the same way"})
            data_vars["anchor_accuracy"] = xr.DataArray(float(anchor_accuracy[0]), attrs={
                "description": f"{split} accuracy at θ0 (the anchor) before training"})
        coords = {"basis": bases, "subspace_dim": dims, "repeat": np.arange(repeats)}
        if params["stability"] is not False:
            data_vars.update(self._stability(ctx, params, coords))
        if params["gradient_overlap"] is not False:
            data_vars.update(self._gradient_overlap(ctx, params, attrs))
        if params["prune"] is not False:
            data_vars.update(self._prune(ctx, params, coords, attrs))
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    # --- bases ------------------------------------------------------------------------------
    def _basis(self, ctx, params, basis, dims, theta0, anchor_at, attrs, batch_size) -> subspace.Projection:
        n, dmax = ctx.n_params, max(dims)
        if basis == "random":
            dense_bytes = params["repeats"] * n * dmax * torch.empty((), dtype=ctx.dtype).element_size()
            kind = params["projection"]
            if kind == "auto":
                kind = "dense" if dense_bytes <= params["max_dense_mb"] * 2**20 else "sparse"
            elif kind == "dense" and dense_bytes > params["max_dense_mb"] * 2**20:
                raise ProbeError(f"a dense random projection needs {dense_bytes / 2**20:.0f} MB > max_dense_mb "
                                 f"{params['max_dense_mb']}; use projection: sparse (or auto), or raise max_dense_mb")
            if kind == "dense":
                return subspace.DenseProjection(subspace.random_dense_basis(
                    n, dmax, params["repeats"], _generator(ctx, 1), ctx.dtype, ctx.device))
            return subspace.SparseProjection(n, dmax, params["repeats"], _generator(ctx, 1), ctx.dtype, ctx.device)
        if basis == "hessian":
            eigen = _eigen(ctx, params, dmax, anchor_at)
            if not eigen.converged:
                ctx.warn(f"the top-{dmax} {params['curvature']} eigenvectors did not converge; the hessian basis "
                         "is approximate")
            attrs["hessian_method"] = eigen.method
            return subspace.DenseProjection(eigen.vectors[:, :dmax])
        if basis == "trajectory":
            directions = subspace.principal_directions(subspace.trajectory_displacements(ctx.trajectory), dmax)
            attrs["trajectory_checkpoints"] = len(ctx.trajectory)
            return subspace.DenseProjection(directions)
        count = 2 * dmax if params["gradient_batches"] == "auto" else params["gradient_batches"]
        gradients = subspace.minibatch_gradients(ctx.forward, ctx.loss_fn, theta0, ctx.data.X_train,
                                                 ctx.data.y_train, count, batch_size, _generator(ctx, 2))
        if not torch.isfinite(gradients).all():
            raise ProbeError("a minibatch gradient at the anchor is NaN/inf; the gradient basis needs finite "
                             "gradients")
        attrs["gradient_batches"] = int(count)
        return subspace.DenseProjection(subspace.principal_directions(gradients, dmax))

    def _dim90(self, ctx, params, bases, dims, loss, accuracy, anchor_loss, full_loss, full_accuracy, attrs):
        threshold = params["threshold"]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (unavailable dims) give NaN means
            if ctx.task == "classification":
                attrs["dim90_metric"] = "mean accuracy over repeats ≥ threshold × full_accuracy"
                reached = np.nanmean(accuracy, axis=2) >= threshold * full_accuracy
            else:
                attrs["dim90_metric"] = ("mean over repeats of (anchor_loss − loss)/(anchor_loss − full_loss) ≥ "
                                         "threshold")
                if not anchor_loss > full_loss:
                    ctx.warn(f"the unrestricted model did not lower the loss from θ0 ({anchor_loss:.4g} -> "
                             f"{full_loss:.4g}); dim90 is undefined and stored as NaN")
                    return np.full(len(bases), np.nan)
                reached = (anchor_loss - np.nanmean(loss, axis=2)) / (anchor_loss - full_loss) >= threshold
        dim90 = np.full(len(bases), np.nan)
        for i in range(len(bases)):
            hits = np.flatnonzero(reached[i])
            if len(hits):
                dim90[i] = dims[hits[0]]
        return dim90

    # --- stability, gradient overlap, pruning ------------------------------------------------
    def _eigenvectors(self, ctx, params, k, at=None):
        if k > ctx.n_params:
            raise ProbeError(f"k = {k} exceeds the model's {ctx.n_params} parameters; use k ≤ {ctx.n_params}")
        at = None if at == ctx.checkpoint else at
        return _eigen(ctx, params, k, at).vectors

    def _stability(self, ctx, params, coords):
        k = params["stability"]["k"]
        ks = sorted(k) if isinstance(k, list) else [k]
        own = self._eigenvectors(ctx, params, max(ks))
        steps = sorted(ctx.trajectory)
        overlap = np.zeros((len(steps), len(ks)))
        for b, step in enumerate(steps):
            other = self._eigenvectors(ctx, params, max(ks), at=step)
            for j, kk in enumerate(ks):
                overlap[b, j] = subspace.subspace_overlap(own[:, :kk], other[:, :kk])
        coords["checkpoint_b"] = steps
        description = (f"‖U_aᵀU_b‖_F²/k: overlap of this checkpoint's top-k {params['curvature']} eigenspace with that "
                       "of checkpoint_b (1 = the same space, k/n = chance)")
        if isinstance(k, list):
            coords["k"] = ks
            return {"subspace_overlap": xr.DataArray(overlap, dims=("checkpoint_b", "k"),
                                                     attrs={"description": description})}
        return {"subspace_overlap": xr.DataArray(overlap[:, 0], dims=("checkpoint_b",),
                                                 attrs={"description": description, "k": k})}

    def _gradient_overlap(self, ctx, params, attrs):
        k = params["gradient_overlap"].get("k", "auto")
        if k == "auto":
            k = ctx.data.n_classes if ctx.task == "classification" else int(np.prod(ctx.data.y_train.shape[1:]))
        U = self._eigenvectors(ctx, params, int(k))
        gradient = ctx.artifact("hessian.operator").gradient.detach().reshape(-1)  # the full-batch gradient
        attrs["gradient_overlap_k"] = int(k)
        norm = float(gradient.norm())
        if not math.isfinite(norm):
            raise ProbeError("the full-batch gradient is NaN/inf at this checkpoint; gradient_overlap needs a finite "
                             "loss")
        value = subspace.projected_fraction(U, gradient) if norm > 0 else math.nan
        return {"gradient_overlap": xr.DataArray(value, attrs={
            "description": f"‖U_kᵀg‖²/‖g‖²: fraction of the full-batch training gradient's squared norm in the top-{k} "
                           f"{params['curvature']} eigenspace (k/n = chance)", "k": int(k),
            "nan_means": "the gradient is exactly zero"})}

    def _prune(self, ctx, params, coords, attrs):
        keep = sorted(float(f) for f in params["prune"]["keep"])
        methods = list(params["prune"].get("methods", pruning.METHODS))
        try:
            layers = pruning.linear_chain(ctx.model)
        except ValueError as exc:
            raise ProbeError(f"prune: {exc}") from None
        flats, spent = [], np.zeros((len(methods), len(keep)), dtype=np.int64)
        for i, method in enumerate(methods):
            for j, fraction in enumerate(keep):
                pruned, spent[i, j] = pruning.prune(ctx.params, layers, method, fraction)
                flats.append(ctx.flatten(pruned))
        loss, accuracy = stacked_loss_and_accuracy(ctx, torch.stack(flats), params["split"],
                                                   models_per_chunk=MODELS_PER_EVALUATION)
        shape = (len(methods), len(keep))
        coords.update({"pruning": methods, "keep": keep})
        attrs["prune_weights_total"] = int(sum(layer.out_features * layer.in_features for layer in layers))
        out = {
            "prune_loss": xr.DataArray(loss.cpu().numpy().reshape(shape), dims=("pruning", "keep"), attrs={
                "description": f"{params['split']} loss of this cell's parameters pruned at equal per-layer weight "
                               "budgets (keep = fraction of hidden units neuron pruning keeps)", "units": "loss"}),
            "prune_params": xr.DataArray(spent, dims=("pruning", "keep"), attrs={
                "description": "weight-matrix entries the pruned model spends (subspace: min(r·(m+n), m·n) per "
                               "layer)",
                "units": "parameters"}),
        }
        if not np.isfinite(out["prune_loss"].values).all():
            raise ProbeError("a pruned model's loss is NaN/inf; the unpruned model's loss must be finite")
        if accuracy is not None:
            out["prune_accuracy"] = xr.DataArray(accuracy.cpu().numpy().reshape(shape), dims=("pruning", "keep"),
                                                 attrs={"description": f"{params['split']} accuracy of the pruned "
                                                                       "model"})
        return out


def _eigen(ctx, params, k: int, at: int | None):
    """Top-k eigenpairs from the curvature engine, shared with any probe asking the same of the cell."""
    return ctx.artifact("hessian.eigen", k=k, which="top", operator=params["curvature"], at=at,
                        method=choose_method(params["eigensolver"], ctx.n_params, k, extremes_only=True))


def _generator(ctx, stream: int) -> torch.Generator:
    """Stream 0: minibatch order; 1: random bases; 2: gradient-basis minibatches. Seeded from the
    entry's seed, so a run does not depend on what consumed ``ctx.generator`` before it."""
    return torch.Generator().manual_seed(ctx.seed + stream)


def _check_params(params, dims, n: int) -> None:
    """Bad parameters the schema cannot see (it does not know the model's size)."""
    if dims[-1] > n:
        raise ProbeError(f"dims: {dims[-1]} is larger than the model's {n} parameters; use dims ≤ {n}")
    if not 0 < params["threshold"] <= 1:
        raise ProbeError(f"threshold must lie in (0, 1], not {params['threshold']}")
    if params["prune"] is not False:
        bad = [f for f in params["prune"]["keep"] if not 0 < f <= 1]
        if bad:
            raise ProbeError(f"prune.keep fractions must lie in (0, 1], not {bad}")
    for key in ("lr", "momentum", "weight_decay", "max_dense_mb"):
        if not math.isfinite(params[key]):
            raise ProbeError(f"{key} must be a finite number, not {params[key]}")


def _check(ctx, params, dims) -> None:
    """Bad input the schema cannot see (it knows neither the model nor the run)."""
    _check_params(params, dims, ctx.n_params)
    if "trajectory" in params["bases"] and len(ctx.trajectory) < 2:
        raise ProbeError("the trajectory basis needs the stored checkpoints of a training run, and this cell has one "
                         "checkpoint: add a `train:` block with `checkpoints: {every: N}` (each checkpoint after the "
                         "first adds a direction), or load several model.checkpoints")
    X, _ = ctx.data.split(params["split"])
    if len(X) == 0:
        raise ProbeError(f"the {params['split']!r} split is empty; use split: train or give the data a test_fraction")
