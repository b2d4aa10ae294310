"""Probe ``behavioral_gradients``: Jacobian rank, behaviour-manifold dimension, information loss.

The behavioral gradient of input ``x_i`` is ``∇_θ f(θ, x_i)``; stacked over ``k``
inputs they form the ``(k·out) × n`` Jacobian ``J``. The parameters that behave
like ``θ`` on those inputs form a manifold of dimension at least ``n − rank J``
(Hebbar 2022, "Information loss → basin flatness"); at a minimum of the MSE
loss ``H = (2/N)·JᵀJ`` + (a term that vanishes with the residuals), so
``rank H = rank J`` there. ``J Jᵀ`` is the empirical NTK (Jacot et al. 2018),
the preconditioner the parameterization applies to the function-space gradient;
where ``J`` loses rank, gradient descent meets critical points that function
space does not have (the parameter-function "disparity").

Rank drops are traced to the hidden layers: inputs whose activations coincide
(``distinct_activations``), units dead on every input (``dead_fraction``) and
units with parallel incoming weights (``duplicate_units``).

The numerics live in :mod:`basinprobe.runtime.substrate.jacobian` and
:mod:`basinprobe.runtime.substrate.activations`; this module translates the
``with:`` block into calls to them and labels the results.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import xarray as xr
from torch.func import functional_call

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.substrate import activations as acts
from basinprobe.runtime.substrate import jacobian as jac

DEFAULT_INPUTS = 512
DENSE_HESSIAN_MAX = 5000
# the loss Hessian on the whole train split, the one the curvature probes share per cell
HESSIAN_ARTIFACT = "hessian.dense"
HESSIAN_ARGS = {"operator": "hessian", "split": "train", "batches": None, "at": None}


class BehavioralGradients(Probe):
    name = "behavioral_gradients"
    description = "rank and singular values of the per-input Jacobian, NTK spectrum, information-loss diagnostics"
    requires = (HESSIAN_ARTIFACT,)   # only with hessian_rank: true (artifact_requests)
    schema = {
        "type": "object",
        "properties": {
            "inputs": {"type": ["integer", "null"], "minimum": 1, "default": None,
                       "description": f"how many inputs of the split (null: all, at most {DEFAULT_INPUTS}); "
                                      "a subset is drawn with the cell's seed; more than the split holds is "
                                      "clamped with a warning"},
            "split": {"enum": ["train", "test"], "default": "train", "description": "which split the inputs come from"},
            "outputs": {"anyOf": [
                {"enum": ["all", "sum"]},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "uniqueItems": True},
            ], "default": "all",
                "description": "which outputs are rows of J: all, a list of output indices, or sum (their sum)"},
            "tol": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": None,
                    "description": "relative singular-value tolerance of the numerical rank "
                                   "(null: max(rows, n)·eps of the dtype)"},
            "per_layer": {"type": "boolean", "default": True,
                          "description": "also layer_rank per parameter tensor and the hidden-layer diagnostics"},
            "chunk": {"type": ["integer", "null"], "minimum": 1, "default": None,
                      "description": "inputs per vmap chunk (null: from memory_mb)"},
            "memory_mb": {"type": "number", "exclusiveMinimum": 0, "default": 1024,
                          "description": "memory budget; above it the Gram matrix replaces J"},
            "dtype": {"enum": ["float64", "model"], "default": "float64",
                      "description": "precision of J and of the rank decision: float64, or the spec's dtype"},
            "activation_tol": {"type": "number", "exclusiveMinimum": 0, "default": 1e-6,
                               "description": "activations closer than this (relative to the layer's largest) "
                                              "count as equal; units below it on every input as dead"},
            "duplicate_tol": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1e-6,
                              "description": "incoming weight rows with cosine >= 1 - duplicate_tol are duplicates"},
            "hessian_rank": {"type": "boolean", "default": False,
                             "description": f"also the rank of the dense loss Hessian (n <= {DENSE_HESSIAN_MAX})"},
            "hessian_tol": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1,
                            "default": None,
                            "description": "relative eigenvalue tolerance of hessian_rank (null: n·eps of the "
                                           "dtype); near but not at a minimum the residual term's eigenvalues "
                                           "(of the order of the residuals) count unless it is above them"},
        },
        "additionalProperties": False,
    }

    def artifact_requests(self, params):
        return [(HESSIAN_ARTIFACT, dict(HESSIAN_ARGS))] if params.get("hessian_rank") else []

    def cost(self, params, n_params, n_train):
        k = min(n_train, params.get("inputs") or DEFAULT_INPUTS)
        outputs = params.get("outputs", "all")
        # rows: the plan does not know the model's outputs; "all" is counted as one per input, a
        # lower bound (a 10-class classifier has ten times the rows)
        rows = len(outputs) if isinstance(outputs, list) else 1
        rows *= k
        # a backward per row; the SVD of J (rows x n, ~4 rows² n flop = 2 rows² forward passes of
        # 2n), again by blocks with per_layer; a dense Hessian when asked
        svds = 2.0 if params.get("per_layer", True) else 1.0
        return 3.0 * rows + svds * 2.0 * min(rows, n_params) ** 2 * max(rows, n_params) / n_params \
            + (4.0 * n_params * n_train if params.get("hessian_rank") else 0.0)

    def run(self, ctx, params):
        if ctx.n_params == 0:
            raise ProbeError("the model has no parameters: its Jacobian is empty; give the model trainable layers")
        if params["hessian_rank"]:
            _check_hessian_size(ctx)   # before the Jacobian, which may take a while
        dtype = torch.float64 if params["dtype"] == "float64" else ctx.dtype
        model = copy.deepcopy(ctx.model).to(dtype).eval()   # eval: dropout off, a deterministic function
        buffers = dict(model.named_buffers())
        theta = {name: t.detach().to(dtype) for name, t in ctx.params.items()}
        X, n_available = _inputs(ctx, params, dtype)
        k = len(X)

        raw = _outputs(model, theta, buffers, X, ctx.batch_size)
        bad = int((~torch.isfinite(raw)).any(dim=1).sum())
        if bad:
            raise ProbeError(f"the model's outputs are NaN or inf on {bad} of the {k} inputs at checkpoint "
                             f"{ctx.checkpoint}; the run may have diverged: lower the learning rate or "
                             "probe earlier checkpoints")
        select, outputs_label = _output_selection(params["outputs"], raw.shape[1])
        out = int(select(raw[:1]).shape[1])

        fn = jac.ModuleNetwork(model, buffers, select)

        n = ctx.n_params
        try:
            plan = jac.plan_jacobian(k, out, n, acts=jac.activation_numel(fn, theta, X),
                                     itemsize=torch.finfo(dtype).bits // 8,
                                     memory_bytes=int(params["memory_mb"] * 2**20), chunk=params["chunk"],
                                     device=ctx.device, in_place=fn.per_example_identity(theta, X))
        except MemoryError as exc:
            raise ProbeError(f"{exc}; lower `inputs`, choose fewer `outputs` (a list, or sum) or raise "
                             "`memory_mb`") from None

        tol = params["tol"]
        if plan.path == "gram" and tol is not None and tol < jac.gram_floor(min(plan.rows, n), dtype):
            ctx.warn(f"tol={tol:g} is below what the Gram path resolves "
                     f"(sqrt(m·eps) = {jac.gram_floor(min(plan.rows, n), dtype):.1e}); that floor is used")
        per_layer = params["per_layer"]
        n_chunks = -(-k // plan.chunk)
        passes = 1 + (len(ctx.param_names) if per_layer and plan.path == "gram" else 0)
        # the direct path's SVDs (of J, then of each layer's block) are steps of the bar too: on a
        # large J they take longer than forming it
        svds = (1 + (len(ctx.param_names) if per_layer else 0)) if plan.path == "direct" else 0
        with ctx.progress(n_chunks * passes + svds, "behavioral gradients") as progress:
            if plan.path == "direct":
                J = jac.jacobian(fn, theta, X, chunk=plan.chunk, mode=plan.mode, progress=progress)
                _check_finite(J, "the Jacobian")
                spectrum = jac.svd_spectrum(J, tol)
                progress.advance(1)
                columns = jac.Columns(theta)
                layers = {}
                for name in ctx.param_names if per_layer else ():
                    layers[name] = jac.svd_spectrum(J[:, columns.slice(name)], tol)
                    progress.advance(1)
                del J
            else:
                spectrum = jac.jacobian_spectrum(fn, theta, X, plan, rtol=tol, progress=progress)
                layers = ({name: jac.jacobian_spectrum(fn, theta, X, plan, names=[name], rtol=tol,
                                                       progress=progress) for name in ctx.param_names}
                          if per_layer else {})
        _check_finite(spectrum.singular_values, "the singular values of the Jacobian")

        variables = _spectrum_variables(ctx, spectrum, n, plan.rows)
        if per_layer:
            variables.update(_layer_variables(layers, {name: theta[name].numel() for name in ctx.param_names}))
            hidden = acts.capture_hidden(model, {**theta, **buffers}, X, batch_size=ctx.batch_size)
            variables.update(_diagnostics(ctx, hidden, theta, params, X))
        if params["hessian_rank"]:
            variables.update(_hessian_variables(ctx, params, k, len(ctx.data.split("train")[0])))

        attrs = {
            "jacobian_path": "direct" if plan.path == "direct" else f"gram_{plan.side}",
            "jacobian_mode": plan.mode, "chunk": plan.chunk, "jvp_chunk": plan.jvp_chunk,
            "memory_budget_mb": float(params["memory_mb"]), "modelled_peak_mb": plan.bytes / 2**20,
            "dtype": str(dtype).removeprefix("torch."), "n_inputs": k, "n_available": n_available,
            "split": params["split"], "outputs": outputs_label, "n_outputs": out,
            "rank_rtol": spectrum.rtol,
            "hidden_layers_from": "hidden_modules" if hasattr(model, "hidden_modules") else "activation modules",
        }
        return xr.Dataset(variables, attrs=attrs)


# --- inputs and outputs -------------------------------------------------------------------
def _inputs(ctx, params, dtype) -> tuple[torch.Tensor, int]:
    X, _ = ctx.data.split(params["split"])
    available = len(X)
    if available == 0:
        raise ProbeError(f"split {params['split']!r} holds no inputs; use split: train or give the data a "
                         "test split (test_fraction)")
    wanted = params["inputs"]
    if wanted is None:
        k = min(available, DEFAULT_INPUTS)
    elif wanted > available:
        ctx.warn(f"inputs={wanted} but split {params['split']!r} holds {available}; all {available} are used")
        k = available
    else:
        k = wanted
    if k < available:
        # a seeded subset, in data order: data sets are often sorted by class
        index = torch.randperm(available, generator=ctx.generator)[:k].sort().values.to(X.device)
        X = X[index]
    return (X.to(dtype) if X.is_floating_point() else X), available


@torch.no_grad()
def _outputs(model, theta, buffers, X, batch_size) -> torch.Tensor:
    parts = [functional_call(model, (theta, buffers), (X[s:s + batch_size],)) for s in range(0, len(X), batch_size)]
    return torch.cat(parts).reshape(len(X), -1)


def _output_selection(outputs, n_outputs: int):
    if outputs == "all":
        return (lambda y: y), "all"
    if outputs == "sum":
        return (lambda y: y.sum(dim=1, keepdim=True)), "sum"
    wrong = [i for i in outputs if i >= n_outputs]
    if wrong:
        raise ProbeError(f"outputs {wrong} are out of range: the model has {n_outputs} outputs "
                         f"(indices 0..{n_outputs - 1})")
    index = list(outputs)
    return (lambda y: y[:, index]), ",".join(map(str, index))


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ProbeError(f"{what} holds NaN or inf although the outputs are finite; the network is not "
                         "differentiable at this point in this dtype: try dtype: float64")


# --- labelled results -----------------------------------------------------------------------
def _spectrum_variables(ctx, spectrum: jac.Spectrum, n: int, rows: int) -> dict:
    sv = spectrum.singular_values.to("cpu", torch.float64)
    ntk = sv ** 2
    rank = spectrum.rank
    sv_coord = {"sv": np.arange(len(sv))}
    if rank:
        condition, condition_attrs = float(ntk[0] / ntk[rank - 1]), {}
    else:
        ctx.warn("the Jacobian is numerically zero (rank 0): ntk_condition is undefined and stored as NaN")
        condition, condition_attrs = float("nan"), {"nan_means": "rank 0: no nonzero NTK eigenvalue"}
    return {
        "singular_values": xr.DataArray(sv.numpy(), dims="sv", coords=sv_coord, attrs={
            "description": f"singular values of J (rows x n = {rows} x {n}), descending "
                           f"({'from the eigenvalues of its Gram matrix' if spectrum.source == 'gram' else 'SVD'})",
            "units": "output / parameter"}),
        "rank": xr.DataArray(rank, attrs={"description": "numerical rank of J: singular values above rank_threshold"}),
        "rank_threshold": xr.DataArray(spectrum.threshold, attrs={
            "description": "absolute singular-value threshold of the rank (rank_rtol x largest)",
            "units": "output / parameter"}),
        "n_params": xr.DataArray(n, attrs={"description": "parameters: columns of J"}),
        "n_rows": xr.DataArray(rows, attrs={"description": "rows of J: inputs x selected outputs"}),
        "manifold_dim_bound": xr.DataArray(n - rank, attrs={
            "description": "n_params - rank: lower bound on the dimension of the set of parameters that "
                           "behave identically on the inputs"}),
        "ntk_eigenvalues": xr.DataArray(ntk.numpy(), dims="sv", coords=sv_coord, attrs={
            "description": "eigenvalues of the empirical NTK Gram J J^T (squared singular values), descending; "
                           "the rows - min(rows, n) further ones are zero",
            "units": "(output / parameter)^2"}),
        "ntk_condition": xr.DataArray(condition, attrs={
            "description": "largest / smallest nonzero (above threshold) NTK eigenvalue", **condition_attrs}),
    }


def _layer_variables(layers: dict, sizes: dict) -> dict:
    names = list(layers)
    coord = {"layer": names}
    return {
        "layer_rank": xr.DataArray(np.array([layers[n].rank for n in names], dtype=np.int64), dims="layer",
                                   coords=coord, attrs={
            "description": "numerical rank of the Jacobian block of each parameter tensor (its own tolerance)"}),
        "layer_n_params": xr.DataArray(np.array([sizes[n] for n in names], dtype=np.int64), dims="layer",
                                       coords=coord, attrs={"description": "parameters in each tensor"}),
    }


def _diagnostics(ctx, hidden: acts.HiddenActivations, theta: dict, params: dict, X: torch.Tensor) -> dict:
    tol, dup_tol = params["activation_tol"], params["duplicate_tol"]
    names = list(hidden.activations)
    units, distinct, rank, dead, duplicates = [], [], [], [], []
    for layer in names:
        A = hidden.activations[layer]
        units.append(A.shape[1])
        distinct.append(acts.distinct_rows(A, tol))
        rank.append(jac.svd_spectrum(A).rank)
        dead.append(float(acts.dead_units(A, tol).double().mean()) if A.shape[1] else 0.0)
        linear = hidden.fed_by.get(layer)
        if linear is not None and f"{linear}.weight" in theta:
            duplicates.append(acts.parallel_pairs(acts.incoming_weights(theta.get, linear), dup_tol))
        else:
            ctx.warn(f"hidden layer {layer!r} is not fed directly by an nn.Linear: its duplicate_units compares "
                     "the units' activation columns over the inputs instead of incoming weights")
            duplicates.append(acts.parallel_pairs(A.T, dup_tol))
    coord = {"hidden_layer": names}

    def per_layer(values, dtype, description):
        return xr.DataArray(np.array(values, dtype=dtype), dims="hidden_layer", coords=coord,
                            attrs={"description": description})

    flat_inputs = X.reshape(len(X), -1).to(torch.float64)
    return {
        "units": per_layer(units, np.int64, "units (activation entries per input) of each hidden layer"),
        "distinct_activations": per_layer(distinct, np.int64,
                                          "distinct activation vectors among the inputs (to activation_tol)"),
        "activation_rank": per_layer(rank, np.int64, "numerical rank of the inputs x units activation matrix"),
        "dead_fraction": per_layer(dead, np.float64, "fraction of units that are zero (to activation_tol) "
                                                     "on every input"),
        "duplicate_units": per_layer(duplicates, np.int64,
                                     "pairs of units whose incoming weight rows [w, b] are parallel "
                                     "(cosine >= 1 - duplicate_tol)"),
        "distinct_inputs": xr.DataArray(acts.distinct_rows(flat_inputs, tol), attrs={
            "description": "distinct input vectors among the inputs (to activation_tol), for comparison"}),
    }


def _check_hessian_size(ctx) -> None:
    n = ctx.n_params
    if n > DENSE_HESSIAN_MAX:
        raise ProbeError(f"hessian_rank needs the dense {n} x {n} Hessian; it is computed up to "
                         f"{DENSE_HESSIAN_MAX} parameters: set hessian_rank: false or use a smaller model")


def _hessian_variables(ctx, params: dict, k: int, n_train: int) -> dict:
    """Numerical rank of the shared dense Hessian (artifact ``hessian.dense``) of the training loss.

    ``rank = #{|λ_i| > rtol·max|λ|}`` with ``rtol = hessian_tol``, by default ``n·eps``, the
    rule of ``numpy.linalg.matrix_rank`` for a symmetric matrix. H covers the whole train
    split; ``rank`` covers the probe's rows.
    """
    if params["split"] != "train" or k < n_train or params["outputs"] != "all":
        ctx.warn(f"hessian_rank is the rank of the Hessian of the loss on all {n_train} training inputs and "
                 f"outputs, while rank is over {k} {params['split']} inputs and outputs {params['outputs']}: "
                 "rank(H) = rank(J) at an MSE minimum holds only with inputs covering the train split, "
                 "split: train and outputs: all")
    try:
        dense = ctx.artifact(HESSIAN_ARTIFACT, **HESSIAN_ARGS)
    except ValueError as exc:   # e.g. an empty train split
        raise ProbeError(f"hessian_rank: {exc}") from None
    _check_finite(dense.values, "the loss Hessian")
    magnitude = dense.values.abs()
    rtol = params["hessian_tol"] or ctx.n_params * torch.finfo(dense.values.dtype).eps
    threshold = rtol * float(magnitude.max())
    return {
        "hessian_rank": xr.DataArray(int((magnitude > threshold).sum()), attrs={
            "description": "numerical rank of the dense Hessian of the training loss (whole train split, "
                           "shared artifact hessian.dense, in the spec's dtype): |eigenvalues| above "
                           "hessian_rank_threshold"}),
        "hessian_rank_threshold": xr.DataArray(threshold, attrs={
            "description": f"absolute eigenvalue threshold of hessian_rank: hessian_tol (default n_params x eps) "
                           f"x max|eigenvalue|, here relative {rtol:.3g}", "units": "loss / parameter^2"}),
    }
