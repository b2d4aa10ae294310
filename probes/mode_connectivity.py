"""Probe ``mode_connectivity``: loss barriers on straight paths between solutions, with and
without weight matching of hidden units; monotonic linear interpolation from the
initialization; the cost of dropping a layer.

The probe compares cells, so it is group-scoped: ``pairs: {sweep: seed}`` runs once per
checkpoint (and per value of the other sweep axes) over the cells that differ in
``seed``; ``pairs: checkpoints`` runs once per sweep point over its checkpoints. For a
pair (θ_a, θ_b) and an alignment π (identity, or weight matching),

    L(α) = L((1 − α)·θ_a + α·π(θ_b)),
    barrier      = max_α L(α) − [(1 − α)·L(0) + α·L(1)],
    barrier_mean = max_α L(α) − ½·(L(0) + L(1)).

The numerics live in :mod:`basinprobe.runtime.substrate.interpolation` (paths, barriers,
bumps; the whole path is one vmapped evaluation), :mod:`...substrate.permutation`
(weight matching, Ainsworth et al. 2023) and :mod:`...substrate.layer_drop`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.spec import coordinate_label
from basinprobe.runtime.substrate import interpolation, layer_drop, permutation
from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy

NONE, WEIGHT_MATCHING = "none", "weight_matching"
CHECKPOINTS = "checkpoints"

ENDPOINT = {"type": "object", "minProperties": 1,
            "description": "one end of a pair: cell coordinates, e.g. {seed: 0} or {seed: 0, checkpoint: 300}"}


class ModeConnectivity(Probe):
    name = "mode_connectivity"
    scope = "group"
    description = ("loss barriers on straight paths between models (seeds, checkpoints), with weight matching; "
                   "monotonic interpolation from init; layer dropping")
    schema = {
        "type": "object",
        "properties": {
            "pairs": {
                # One schema whose keywords each apply to one JSON type (pattern: strings, properties:
                # objects, items: arrays), so a wrong value gets a precise error instead of anyOf's "not valid
                # under any of the given schemas".
                "type": ["string", "object", "array", "null"],
                "pattern": f"^{CHECKPOINTS}$",
                "properties": {"sweep": {"type": "string", "description": "the sweep axis to pair along"}},
                "required": ["sweep"],
                "additionalProperties": False,
                "minItems": 1,
                "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": ENDPOINT},
                "default": None,
                "description": "models to connect: 'checkpoints' (every pair of a run's checkpoints), {sweep: AXIS} "
                               "(every pair of sweep points along AXIS, at the same checkpoint), or a list of "
                               "[endpoint, endpoint] pairs of cell coordinates; null: no pairs",
            },
            "init_to_final": {"type": "boolean", "default": False,
                              "description": "monotonic linear interpolation from each run's initialization "
                                             "(checkpoint 0) to each probed checkpoint"},
            "alphas": {"type": ["integer", "array"], "minimum": 3, "minItems": 3,
                       "items": {"type": "number", "minimum": 0, "maximum": 1}, "default": 25,
                       "description": "points on the path: a count n (n evenly spaced points on [0, 1], both ends "
                                      "included) or an increasing list from 0 to 1"},
            "data": {"enum": ["train", "test"], "default": "train", "description": "the split the loss is taken on"},
            "metric": {"type": "array", "items": {"enum": ["loss", "accuracy"]}, "minItems": 1, "uniqueItems": True,
                       "default": ["loss", "accuracy"],
                       "description": "paths to store; accuracy is stored for classification tasks only"},
            "align": {"type": "array", "items": {"enum": [NONE, WEIGHT_MATCHING]}, "minItems": 1,
                      "uniqueItems": True, "default": [NONE, WEIGHT_MATCHING],
                      "description": "alignments of θ_b to θ_a: none (as trained) and/or weight_matching "
                                     "(hidden-unit permutation maximizing ⟨θ_a, π(θ_b)⟩)"},
            "max_rounds": {"type": "integer", "minimum": 1, "default": 100,
                           "description": "bound on weight matching's rounds of coordinate descent over layers"},
            "layer_drop": {"type": "boolean", "default": False,
                           "description": "loss with each droppable hidden layer replaced by the identity"},
            "monotone_rtol": {"type": "number", "minimum": 0, "default": 1e-6,
                              "description": "an init-to-final path is monotone when its largest bump is at most "
                                             "this times the largest |loss| on it (rounding)"},
        },
        "additionalProperties": False,
    }

    # --- planning -------------------------------------------------------------------------
    def spans(self, params, cell_dims):
        alphas_of(params["alphas"])
        pairs = params["pairs"]
        if pairs is None and not params["init_to_final"] and not params["layer_drop"]:
            raise ProbeError("nothing to measure: give pairs (checkpoints, {sweep: AXIS} or a list of pairs), "
                             "init_to_final: true, or layer_drop: true")
        sweep_axes = [d for d in cell_dims if d != "checkpoint"]
        if pairs is None:
            return []
        if pairs == CHECKPOINTS:
            return ["checkpoint"]
        if isinstance(pairs, dict):
            axis = pairs["sweep"]
            if axis == "checkpoint":
                raise ProbeError("pairs: {sweep: checkpoint}: checkpoints are not a sweep axis; "
                                 "use pairs: checkpoints")
            if axis not in sweep_axes:
                raise ProbeError(f"pairs: {{sweep: {axis}}}: this spec has no sweep axis {axis!r} (sweep axes: "
                                 f"{', '.join(sweep_axes) or 'none'}); add {axis} to sweep: or pair along an axis "
                                 f"it has")
            return [axis]
        spanned: list[str] = []
        for k, (a, b) in enumerate(pairs):
            for key in [*a, *b]:
                if key not in cell_dims:
                    raise ProbeError(f"pairs[{k}] names {key!r}, which is not a cell dim of this spec (cell dims: "
                                     f"{', '.join(cell_dims)}); name sweep axes or checkpoint")
                if key not in spanned:
                    spanned.append(key)
        return [d for d in cell_dims if d in spanned]

    def cost(self, params, n_params, n_train):
        return float(len(alphas_of(params["alphas"])) * n_train * len(params["align"]))

    # --- measuring ------------------------------------------------------------------------
    def run(self, ctx, params):
        alphas = alphas_of(params["alphas"])
        members = list(ctx.members)
        spanned = list(ctx.spanned)
        pairs = _pair_indices(params["pairs"], members, spanned)
        split = params["data"]
        contexts = [m.context() for m in members]
        _check_comparable(contexts, members, spanned, split)
        classification = contexts[0].task == "classification"
        metrics = [m for m in params["metric"] if m == "loss" or classification]
        parts, attrs = [], {"metrics": metrics}
        work = len(pairs) * len(params["align"]) + len(members) * (params["init_to_final"] + params["layer_drop"])
        with ctx.progress(work, f"mode_connectivity: {len(pairs)} pairs x {len(params['align'])} alignments") as bar:
            if pairs:
                parts.append(self._pairs(ctx, contexts, members, spanned, pairs, alphas, params, metrics, bar))
                attrs["pair_labels"] = "pair is 'a-b'; a and b name the endpoints by " + (
                    spanned[0] if len(spanned) == 1 else ", ".join(spanned))
            if params["init_to_final"]:
                parts.append(self._mli(contexts, members, spanned, alphas, params, bar))
            if params["layer_drop"]:
                drop = self._layer_drop(ctx, contexts, members, spanned, split, classification, bar)
                if drop is not None:
                    parts.append(drop)
        result = xr.merge(parts, join="exact", compat="no_conflicts", combine_attrs="override")
        result.attrs = attrs
        return result

    def _pairs(self, ctx, contexts, members, spanned, pairs, alphas, params, metrics, bar) -> xr.Dataset:
        aligns, split = params["align"], params["data"]
        alpha_t = torch.tensor(alphas, dtype=torch.float64)
        shape = (len(pairs), len(aligns))
        loss_path, acc_path = np.zeros(shape + (len(alphas),)), np.zeros(shape + (len(alphas),))
        barrier, barrier_mean = np.zeros(shape), np.zeros(shape)
        acc_barrier, distance = np.zeros(shape), np.zeros(shape)
        rounds = np.zeros(len(pairs), dtype=np.int64)
        axes = permutation.hidden_axes(contexts[0].model) if WEIGHT_MATCHING in aligns else None
        for p, (i, j) in enumerate(pairs):
            cell = contexts[i]
            theta_a, theta_b = cell.flat_params, contexts[j].flat_params
            for q, align in enumerate(aligns):
                if align == WEIGHT_MATCHING:
                    match = permutation.weight_matching(cell.params, contexts[j].params, axes,
                                                        max_rounds=params["max_rounds"], generator=ctx.generator)
                    rounds[p] = match.rounds
                    if not match.converged:
                        ctx.warn(f"weight matching of {_name(members[j], spanned)} to {_name(members[i], spanned)} "
                                 f"still improved after max_rounds={params['max_rounds']}; raise max_rounds")
                    aligned = cell.flatten(match.params)
                else:
                    aligned = theta_b
                distance[p, q] = float(torch.sum((theta_a - aligned).double() ** 2))
                losses, accuracy = interpolation.path_loss_and_accuracy(cell, theta_a, aligned, alpha_t, split)
                _finite(losses, alphas, f"from {_name(members[i], spanned)} to {_name(members[j], spanned)} "
                                        f"(align: {align})")
                loss_path[p, q], barrier[p, q] = losses, interpolation.barrier(losses, alphas)
                barrier_mean[p, q] = interpolation.barrier_mean(losses, alphas)
                if accuracy is not None:
                    acc_path[p, q] = accuracy
                    # The accuracy barrier is the drop below the chord: the barrier of the error 1 − accuracy.
                    acc_barrier[p, q] = interpolation.barrier(1.0 - accuracy, alphas)
                bar.advance(1)
        a = [_label(members[i], spanned) for i, _ in pairs]
        b = [_label(members[j], spanned) for _, j in pairs]
        coords = {"pair": [f"{x}-{y}" for x, y in zip(a, b)], "a": ("pair", a), "b": ("pair", b),
                  "align": list(aligns), "alpha": alphas}
        pa, paa = ("pair", "align"), ("pair", "align", "alpha")
        data = {
            "barrier": (pa, barrier, {"description": "max over α of L(α) − [(1 − α)·L(0) + α·L(1)]: height of the "
                                                     "loss path above the straight line between its ends",
                                      "units": "loss"}),
            "barrier_mean": (pa, barrier_mean, {"description": "max over α of L(α) − (L(0) + L(1))/2",
                                                "units": "loss"}),
            "permutation_distance": (pa, distance, {"description": "‖θ_a − π(θ_b)‖², π the alignment "
                                                                   "(identity for none)",
                                                    "units": "squared parameter norm"}),
        }
        if "loss" in metrics:
            data["loss_path"] = (paa, loss_path, {"description": f"{split} loss at (1 − α)·θ_a + α·π(θ_b)",
                                                  "units": "loss"})
        if "accuracy" in metrics:
            data["accuracy_path"] = (paa, acc_path, {"description": f"{split} accuracy at (1 − α)·θ_a + α·π(θ_b)",
                                                     "units": "fraction"})
            data["accuracy_barrier"] = (pa, acc_barrier, {
                "description": "max over α of [(1 − α)·A(0) + α·A(1)] − A(α): drop of the accuracy below the "
                               "straight line between its ends (the barrier of the error)", "units": "fraction"})
        if WEIGHT_MATCHING in aligns:
            data["matching_rounds"] = (("pair",), rounds, {"description": "rounds of coordinate descent weight "
                                                                          "matching ran"})
        return xr.Dataset({k: xr.Variable(dims, values, attrs) for k, (dims, values, attrs) in data.items()},
                          coords=coords)

    def _mli(self, contexts, members, spanned, alphas, params, bar) -> xr.Dataset:
        alpha_t = torch.tensor(alphas, dtype=torch.float64)
        pieces = []
        for member, cell in zip(members, contexts):
            if 0 not in cell.trajectory:
                raise ProbeError(f"init_to_final needs the initial parameters, but the run of "
                                 f"{_name(member, spanned) or 'this cell'} has no checkpoint at step 0 (its "
                                 f"checkpoints: {sorted(cell.trajectory)}); add 0 to train.checkpoints")
            losses, _ = interpolation.path_loss_and_accuracy(cell, cell.trajectory[0], cell.flat_params, alpha_t,
                                                             params["data"])
            _finite(losses, alphas, f"from the initialization to {_name(member, spanned) or 'the checkpoint'}")
            bump = interpolation.max_bump(losses)
            monotone = bump <= params["monotone_rtol"] * float(np.max(np.abs(losses)))
            piece = xr.Dataset({
                "mli_loss_path": xr.Variable(("alpha",), losses, {
                    "description": f"{params['data']} loss at (1 − α)·θ_0 + α·θ, θ_0 the initialization",
                    "units": "loss"}),
                "mli_max_bump": xr.Variable((), bump, {
                    "description": "largest rise of the loss along the path from θ_0 to θ: max over α < α' of "
                                   "L(α') − L(α) (0 when monotone)", "units": "loss"}),
                "mli_monotone": xr.Variable((), monotone, {
                    "description": "the loss never rises from θ_0 to θ: mli_max_bump <= monotone_rtol · max |L|"}),
            }, coords={"alpha": alphas})
            pieces.append(_at_member(piece, member, spanned))
            bar.advance(1)
        return _gathered(pieces, spanned)

    def _layer_drop(self, ctx, contexts, members, spanned, split, classification, bar) -> xr.Dataset | None:
        layers = layer_drop.droppable_layers(contexts[0].model)
        if not layers:
            ctx.warn("layer_drop: the model has no droppable hidden layer (no hidden layer has as many outputs as "
                     "inputs, and none is declared in model.droppable_layers); nothing stored for it")
            for _ in members:
                bar.advance(1)
            return None
        pieces = []
        for member, cell in zip(members, contexts):
            base, _ = stacked_loss_and_accuracy(cell, cell.flat_params[None], split)
            losses, accuracies = [], []
            for label, modules in layers.items():
                loss, accuracy = layer_drop.layer_drop_loss_and_accuracy(cell, cell.flat_params, modules, split)
                if not math.isfinite(loss):
                    raise ProbeError(f"the {split} loss of {_name(member, spanned) or 'the model'} without layer "
                                     f"{label} is {loss}; the network diverges without it")
                losses.append(loss)
                accuracies.append(accuracy)
            data = {
                "layer_drop_loss": (("layer",), losses, {"description": f"{split} loss with the layer replaced by "
                                                                        f"the identity", "units": "loss"}),
                "layer_drop_increase": (("layer",), np.array(losses) - float(base[0]), {
                    "description": f"layer_drop_loss minus the {split} loss of the full network", "units": "loss"}),
            }
            if classification:
                data["layer_drop_accuracy"] = (("layer",), accuracies, {
                    "description": f"{split} accuracy with the layer replaced by the identity", "units": "fraction"})
            piece = xr.Dataset({k: xr.Variable(*v) for k, v in data.items()},
                               coords={"layer": list(layers), "modules": ("layer", ["+".join(m) for m in
                                                                                    layers.values()])})
            pieces.append(_at_member(piece, member, spanned))
            bar.advance(1)
        return _gathered(pieces, spanned)


# --- parameters ------------------------------------------------------------------------------
def alphas_of(alphas) -> list[float]:
    """The α grid: n evenly spaced points on [0, 1], or a validated increasing list from 0 to 1."""
    if isinstance(alphas, int):
        if alphas < 3:
            raise ProbeError(f"alphas: {alphas} points cannot show a barrier; use at least 3")
        return np.linspace(0.0, 1.0, alphas).tolist()
    values = [float(a) for a in alphas]
    if len(values) < 3:
        raise ProbeError(f"alphas: {len(values)} points cannot show a barrier; give at least 3")
    if any(not 0.0 <= a <= 1.0 for a in values):
        raise ProbeError(f"alphas: {values} leaves [0, 1]; a path from θ_a (α = 0) to θ_b (α = 1) is "
                         f"interpolated, not extrapolated")
    if values[0] != 0.0 or values[-1] != 1.0:
        raise ProbeError("alphas must start at 0 and end at 1: barriers are measured against the path's endpoints")
    if any(b <= a for a, b in zip(values[:-1], values[1:])):
        raise ProbeError(f"alphas must increase strictly: {values}")
    return values


# --- members and pairs -----------------------------------------------------------------------
def _label(member, spanned: list[str]):
    if len(spanned) == 1:
        return member.coords[spanned[0]]
    return ",".join(f"{d}={member.coords[d]}" for d in spanned)


def _name(member, spanned: list[str]) -> str:
    return ",".join(f"{d}={member.coords[d]}" for d in spanned)


def _at_member(piece: xr.Dataset, member, spanned: list[str]) -> xr.Dataset:
    """A per-model result placed at the model's coordinates along the spanned dims."""
    return piece.expand_dims({d: [member.coords[d]] for d in spanned}) if spanned else piece


def _gathered(pieces: list[xr.Dataset], spanned: list[str]) -> xr.Dataset:
    """Per-model results on the grid of the spanned dims (concatenated, so booleans stay booleans)."""
    if not spanned:
        return pieces[0]
    if len(spanned) == 1:
        return xr.concat(pieces, dim=spanned[0], join="exact", coords="minimal", compat="override",
                         combine_attrs="override")
    return xr.combine_by_coords(pieces, join="outer", compat="no_conflicts", combine_attrs="override")


def _pair_indices(pairs, members, spanned: list[str]) -> list[tuple[int, int]]:
    if pairs is None:
        return []
    if pairs == CHECKPOINTS or isinstance(pairs, dict):
        what = "checkpoints" if pairs == CHECKPOINTS else f"values of {pairs['sweep']}"
        if len(members) < 2:
            raise ProbeError(f"pairs: only one model to pair ({_name(members[0], spanned)}); this group needs two "
                             f"or more {what} (for checkpoints, select them with at:)")
        return list(itertools.combinations(range(len(members)), 2))
    out = []
    for k, endpoints in enumerate(pairs):
        ends = []
        for end in endpoints:
            want = {d: coordinate_label(v) for d, v in end.items()}
            found = [i for i, m in enumerate(members) if all(m.coords[d] == v for d, v in want.items())]
            if not found:
                values = {d: sorted({m.coords[d] for m in members}, key=str) for d in want}
                raise ProbeError(f"pairs[{k}]: no cell has {end} (values here: "
                                 + "; ".join(f"{d}: {', '.join(map(str, v))}" for d, v in values.items())
                                 + "); name coordinates the spec has (checkpoints selected with at:)")
            if len(found) > 1:
                raise ProbeError(f"pairs[{k}]: {end} matches {len(found)} cells "
                                 f"({'; '.join(_name(members[i], spanned) for i in found)}); name every dim that "
                                 f"the pairs vary: {', '.join(spanned)}")
            ends.append(found[0])
        if ends[0] == ends[1]:
            raise ProbeError(f"pairs[{k}] connects {endpoints[0]} to itself")
        out.append((ends[0], ends[1]))
    return out


def _check_comparable(contexts, members, spanned, split: str) -> None:
    first = contexts[0]
    for member, cell in zip(members[1:], contexts[1:]):
        if cell.param_names != first.param_names or cell.param_shapes != first.param_shapes:
            raise ProbeError(f"{_name(member, spanned)} has another architecture than {_name(members[0], spanned)}; "
                             f"a path connects models of one architecture, so pair along an axis that keeps it")
        if cell.data is not first.data:
            x, y = cell.data.split(split)
            x0, y0 = first.data.split(split)
            if x.shape != x0.shape or not (torch.equal(x, x0) and torch.equal(y, y0)):
                raise ProbeError(f"{_name(member, spanned)} was trained on other data than "
                                 f"{_name(members[0], spanned)}; the path is evaluated on one data set, so pair along "
                                 f"an axis that keeps the data")
    X, _ = first.data.split(split)
    if len(X) == 0:
        raise ProbeError(f"the {split} split is empty; use data: train or give the data a test_fraction")


def _finite(losses: np.ndarray, alphas: list[float], where: str) -> None:
    bad = ~np.isfinite(losses)
    if bad.any():
        at = [alphas[k] for k in np.flatnonzero(bad)]
        raise ProbeError(f"the loss on the path {where} is not finite at α = {', '.join(f'{a:.3g}' for a in at)}; "
                         f"the models or the data are too extreme for this dtype (try dtype: float64)")
