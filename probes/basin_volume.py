"""Probe ``basin_volume``: the log-volume of the loss sublevel set around the cell's parameters.

The translation of a ``with:`` block into :mod:`basinprobe.runtime.substrate.volume`
(the formulas) and the curvature engine (the spectrum for the quadratic estimate:
dense ``eigh`` at or below ``DENSE_THRESHOLD`` parameters, else stochastic Lanczos
quadrature of tr f(H)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.substrate.curvature import descent_check
from basinprobe.runtime.substrate.dense import DENSE_THRESHOLD
from basinprobe.runtime.substrate.hvp import loss_batches
from basinprobe.runtime.substrate.slq import trace_function
from basinprobe.runtime.substrate.volume import (batched_loss, log_unit_ball_volume, monte_carlo_log_volume,
                                                 quadratic_log_radius, quadratic_log_volume, ray_radii, stiff,
                                                 uniform_directions)

POSITIVE = {"type": "number", "exclusiveMinimum": 0}


class BasinVolume(Probe):
    name = "basin_volume"
    description = "log-volume of {w : L(w) - L(w*) <= epsilon} within radius R: quadratic and Monte-Carlo estimates"
    requires = ("hessian.operator", "hessian.dense", "hessian.slq")
    schema = {
        "type": "object",
        "properties": {
            "epsilon": {"anyOf": [POSITIVE, {"type": "array", "items": POSITIVE, "minItems": 1}], "default": 0.01,
                        "description": "loss level(s) above L(w*); a list gives an epsilon dim"},
            "radius": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                       "description": "radius R of the ball the volume is restricted to (null: the norm of w*)"},
            "estimators": {"type": "array", "items": {"enum": ["hessian", "monte_carlo"]}, "minItems": 1,
                           "uniqueItems": True, "default": ["hessian", "monte_carlo"],
                           "description": "quadratic approximation from the Hessian spectrum, and/or ray sampling"},
            "directions": {"type": "integer", "minimum": 2, "default": 256,
                           "description": "Monte-Carlo sample size (random directions)"},
            "delta": {"type": "number", "minimum": 0, "default": 0.0,
                      "description": "eigenvalue floor: eigenvalues <= delta count as flat (capped at R)"},
            "batches": {"type": ["integer", "null"], "minimum": 1, "default": None,
                        "description": "evaluate the training loss on its first this many minibatches (null: all)"},
            "quantiles": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 1,
                          "default": [0.05, 0.25, 0.5, 0.75, 0.95], "description": "quantiles q of r(u) to store"},
            "spectrum": {"enum": ["auto", "dense", "slq"], "default": "auto",
                         "description": f"how the hessian estimator gets sum log: dense eigh (auto at or below "
                                        f"{DENSE_THRESHOLD} parameters) or stochastic Lanczos quadrature"},
            "probes": {"type": "integer", "minimum": 2, "default": 8, "description": "SLQ probe vectors"},
            "steps": {"type": "integer", "minimum": 1, "default": 80, "description": "Lanczos steps per SLQ probe"},
        },
        "additionalProperties": False,
    }

    def artifact_requests(self, params):
        common = {"operator": "hessian", "split": "train", "batches": params["batches"]}
        requests = [("hessian.operator", common)]
        if "hessian" in params["estimators"]:
            if params["spectrum"] == "slq":
                requests.append(("hessian.slq", {**common, "probes": params["probes"], "steps": params["steps"]}))
            else:
                requests.append(("hessian.dense", common))
        return requests

    def cost(self, params, n_params, n_train):
        levels = len(params["epsilon"]) if isinstance(params["epsilon"], list) else 1
        cost = 0.0
        if "hessian" in params["estimators"]:
            dense = params["spectrum"] == "dense" or (params["spectrum"] == "auto" and n_params <= DENSE_THRESHOLD)
            cost += 4.0 * (n_params if dense else params["probes"] * params["steps"]) * n_train
        if "monte_carlo" in params["estimators"]:
            cost += (24 + 32 * levels) * params["directions"] * n_train
        return cost

    def run(self, ctx, params):
        epsilons = params["epsilon"] if isinstance(params["epsilon"], list) else [params["epsilon"]]
        if not all(math.isfinite(e) and e > 0 for e in epsilons):
            raise ProbeError(f"epsilon must be positive and finite, not {params['epsilon']}")
        if params["radius"] is not None and not (math.isfinite(params["radius"]) and params["radius"] > 0):
            raise ProbeError(f"radius must be positive and finite, not {params['radius']}")
        n = ctx.n_params
        common = {"operator": "hessian", "split": "train", "batches": params["batches"]}
        op = ctx.artifact("hessian.operator", **common)
        check = descent_check(op)
        if not (math.isfinite(check.loss) and math.isfinite(check.gradient_norm)):
            raise ProbeError(f"the loss ({check.loss}) or its gradient is not finite at this point; "
                             "check the checkpoint (a diverged run?) or measure in float64 (dtype: float64)")
        radius = params["radius"] if params["radius"] is not None else float(ctx.flat_params.norm())
        if radius <= 0:
            raise ProbeError("the parameters are all zero, so the default radius ||w*|| is 0: set `radius`")
        estimators = list(params["estimators"])
        log_vd = log_unit_ball_volume(n)
        log_volume = np.zeros((len(estimators), len(epsilons)))
        log_volume_se = np.zeros_like(log_volume)
        variables = {}
        attrs = {"n_params": n, "examples": op.n_examples, "log_unit_ball_volume": log_vd}

        if "hessian" in estimators:
            row = estimators.index("hessian")
            effective, effective_se = np.zeros(len(epsilons)), np.zeros(len(epsilons))
            path = params["spectrum"]
            if path == "auto":
                path = "dense" if n <= DENSE_THRESHOLD else "slq"
            attrs["spectrum"] = path
            for j, eps in enumerate(epsilons):
                def f(lam, eps=eps):
                    return quadratic_log_radius(lam, eps, radius, params["delta"])

                def g(lam, eps=eps):
                    return stiff(lam, eps, radius, params["delta"])

                if path == "dense":
                    values = ctx.artifact("hessian.dense", **common).values.to("cpu", torch.float64)
                    effective[j] = float(g(values).sum())
                    log_volume[row, j] = quadratic_log_volume(float(f(values).sum()), effective[j], n)
                else:
                    q = ctx.artifact("hessian.slq", probes=params["probes"], steps=params["steps"], **common)
                    # per-probe estimates of tr f(H) and s, so the stderr carries their correlation
                    samples = quadratic_log_volume(n * q.per_probe(f), n * q.per_probe(g), n)
                    log_volume[row, j] = float(samples.mean())
                    log_volume_se[row, j] = float(samples.std(unbiased=True)) / math.sqrt(len(samples))
                    effective[j], effective_se[j] = trace_function(q, g)
            variables["effective_dim"] = xr.DataArray(effective, dims="epsilon", attrs={
                "description": "number of Hessian eigenvalues above max(delta, 2 epsilon / R^2): directions "
                               "in which the basin is narrower than the ball"})
            variables["effective_dim_stderr"] = xr.DataArray(effective_se, dims="epsilon", attrs={
                "description": "standard error of effective_dim (0 when exact)"})

        if "monte_carlo" in estimators:
            row = estimators.index("monte_carlo")
            X = torch.cat([xb for xb, _, _ in loss_batches(ctx, "train", params["batches"])])
            y = torch.cat([yb for _, yb, _ in loss_batches(ctx, "train", params["batches"])])
            losses = batched_loss(ctx, X, y)
            center = ctx.flat_params
            base = float(losses(center[None])[0])
            U = uniform_directions(params["directions"], n, ctx.generator, ctx.dtype, ctx.device)
            with ctx.progress(24 + 32, f"Monte-Carlo basin radii ({params['directions']} directions)") as bar:
                rays = ray_radii(losses, center, U, epsilons, radius, base, progress=bar)
            quantiles = torch.tensor(params["quantiles"], dtype=torch.float64)
            rq = np.zeros((len(epsilons), len(quantiles)))
            capped, ess = np.zeros(len(epsilons)), np.zeros(len(epsilons))
            for j in range(len(epsilons)):
                r = rays.radii[:, j]
                log_volume[row, j], log_volume_se[row, j], ess[j] = monte_carlo_log_volume(r.log(), n)
                rq[j] = torch.quantile(r, quantiles).numpy()
                capped[j] = float(rays.capped[:, j].double().mean())
            variables["radius_quantiles"] = xr.DataArray(rq, dims=("epsilon", "q"), coords={"q": quantiles.numpy()},
                                                         attrs={"description": "quantiles of r(u), the distance along "
                                                                "a random direction to the level set", "units": "parameter"})
            variables["capped_fraction"] = xr.DataArray(capped, dims="epsilon", attrs={
                "description": "fraction of directions that stayed below the level up to R"})
            variables["effective_sample_size"] = xr.DataArray(ess, dims="epsilon", attrs={
                "description": "(sum w)^2 / sum w^2 of the weights r(u)^d: how many directions carry the estimate"})
            attrs["loss_evaluations"] = rays.evaluations
            for eps, e in zip(epsilons, ess):
                if e < max(10.0, 0.01 * params["directions"]):
                    # in high dimension E[r^d] is carried by the rare longest rays; the delta-method
                    # stderr then understates the error, and the estimate is biased low
                    ctx.warn(f"monte_carlo log_volume at epsilon={eps:g} rests on an effective sample of "
                             f"{e:.1f} of {params['directions']} directions: read it as a lower estimate "
                             "with an unreliable stderr; raise `directions` or use the hessian estimate")

        variables["log_volume"] = xr.DataArray(log_volume, dims=("estimator", "epsilon"), attrs={
            "description": "natural log of the volume of {w : L(w) - L(w*) <= epsilon, |w - w*| <= R}",
            "units": "log(parameter^d)"})
        variables["log_volume_stderr"] = xr.DataArray(log_volume_se, dims=("estimator", "epsilon"), attrs={
            "description": "standard error of log_volume (0 when exact)", "units": "log(parameter^d)"})
        variables["radius"] = xr.DataArray(radius, attrs={"description": "radius R of the ball", "units": "parameter"})
        variables["loss"] = xr.DataArray(check.loss, attrs={"description": "L(w*), the training loss at the point"})
        variables["gradient_norm"] = xr.DataArray(check.gradient_norm, attrs={
            "description": "norm of the gradient of the loss at the point"})
        attrs["near_minimum"] = bool(check.decrease <= 0.1 * min(epsilons))
        if not attrs["near_minimum"]:
            ctx.warn(f"not near a minimum: a gradient step would lower the loss by at least {check.decrease:.3g} "
                     f"(> 0.1 epsilon) in its quadratic model, so the sublevel set is not a basin around w*")
        ds = xr.Dataset(variables, coords={"estimator": estimators, "epsilon": epsilons}, attrs=attrs)
        for name, var in ds.data_vars.items():
            if var.dtype.kind == "f" and not np.isfinite(var.values).all():
                raise ProbeError(f"{name} is not finite: the loss overflowed along some direction; lower radius "
                                 "or measure in float64 (dtype: float64)")
        if not isinstance(params["epsilon"], list):
            ds = ds.squeeze("epsilon")
        return ds
