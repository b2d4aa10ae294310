"""Probe ``hessian_spectrum``: extreme eigenvalues, trace, spectral density and saddle index.

The translation of a ``with:`` block into calls to the curvature engine
(:mod:`basinprobe.runtime.substrate.curvature`): Lanczos eigenpairs, Hutch++ for the
trace, stochastic Lanczos quadrature for the density and the negative mass; or, at or
below ``DENSE_THRESHOLD`` parameters (``method: auto``), one dense ``eigh`` for all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.substrate.curvature import (CurvatureEigen, DescentCheck, choose_method, dense_spectra,
                                                    descent_check, descent_checks, eigen_many, lockstep,
                                                    slq_many, stacked_operator)
from basinprobe.runtime.substrate.dense import DENSE_THRESHOLD, DenseSpectrum
from basinprobe.runtime.substrate.slq import Quadrature, density_grid, mass_below, spectral_density
from basinprobe.runtime.substrate.trace import TraceEstimate, hutchpp, hutchpp_steps

EIGEN_UNITS = "loss / parameter^2"


DATA_SCHEMA = {
    "type": "object",
    "description": "the loss whose curvature is measured",
    "properties": {
        "split": {"enum": ["train", "test"], "default": "train", "description": "which split's mean loss"},
        "batches": {"type": ["integer", "null"], "minimum": 1, "default": None,
                    "description": "use only the first this many minibatches of data.batch_size (null: the whole split)"},
    },
    "additionalProperties": False,
    "default": {"split": "train", "batches": None},
}


def numerical_zero(scale: float, n: int, dtype: torch.dtype) -> float:
    """Eigenvalues within 10·√n·eps·‖H‖ of zero are rounding noise, not a sign (eigh's backward error)."""
    return 10 * math.sqrt(n) * torch.finfo(dtype).eps * scale


@dataclass
class Measured:
    """What the curvature engine returned for one cell."""

    check: DescentCheck
    examples: int
    dense: DenseSpectrum | None = None
    eigen: dict[str, CurvatureEigen] = field(default_factory=dict)  # "top" / "bottom"
    trace: TraceEstimate | None = None
    quadrature: Quadrature | None = None


def _operator(build):
    try:
        return build()
    except ValueError as exc:  # an empty split
        raise ProbeError(str(exc)) from None


def _finite(check: DescentCheck) -> DescentCheck:
    if not (math.isfinite(check.loss) and math.isfinite(check.gradient_norm)):
        raise ProbeError(f"the loss ({check.loss}) or its gradient is not finite at this point; "
                         "check the checkpoint (a diverged run?) or measure in float64 (dtype: float64)")
    return check


class HessianSpectrum(Probe):
    name = "hessian_spectrum"
    batched = True
    description = "top/bottom eigenvalues, trace, spectral density and saddle index of the Hessian or GGN"
    requires = ("hessian.operator", "hessian.eigen", "hessian.slq", "hessian.dense")
    schema = {
        "type": "object",
        "properties": {
            "top_k": {"type": "integer", "minimum": 0, "default": 20, "description": "how many of the largest eigenvalues"},
            "bottom_k": {"type": "integer", "minimum": 0, "default": 0, "description": "how many of the smallest eigenvalues"},
            "operator": {"enum": ["hessian", "ggn"], "default": "hessian",
                         "description": "the Hessian, or the generalized Gauss-Newton matrix J^T H_loss J"},
            "data": DATA_SCHEMA,
            "density": {"type": "boolean", "default": True,
                        "description": "estimate the spectral density and the negative fraction (SLQ)"},
            "grid": {"type": "integer", "minimum": 2, "default": 100, "description": "grid points of the density"},
            "probes": {"type": "integer", "minimum": 2, "default": 8, "description": "SLQ probe vectors"},
            "steps": {"type": "integer", "minimum": 1, "default": 80, "description": "Lanczos steps per SLQ probe"},
            "bandwidth": {"type": "number", "exclusiveMinimum": 0, "default": 0.01,
                          "description": "Gaussian kernel width of the density, as a fraction of the spectrum's range"},
            "trace": {"type": "boolean", "default": True, "description": "estimate the trace (Hutch++)"},
            "trace_samples": {"type": "integer", "minimum": 3, "default": 60,
                              "description": "products Hutch++ spends on the trace"},
            "method": {"enum": ["auto", "lanczos", "dense"], "default": "auto",
                       "description": f"dense eigh at or below {DENSE_THRESHOLD} parameters (auto), or always/never"},
            "tol": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 1e-4,
                    "description": "relative accuracy of the Lanczos eigenvalues"},
        },
        "additionalProperties": False,
    }

    def artifact_requests(self, params):
        data = {**DATA_SCHEMA["default"], **params.get("data", {})}
        common = {"operator": params["operator"], "split": data["split"], "batches": data["batches"]}
        requests = [("hessian.operator", {**common, "operator": "hessian"})]
        if params["method"] == "dense":
            return requests + [("hessian.dense", common)]
        for which, k in (("top", params["top_k"]), ("bottom", params["bottom_k"])):
            if k:
                requests.append(("hessian.eigen", {**common, "k": k, "which": which, "tol": params["tol"],
                                                   "method": params["method"]}))
        if params["density"]:
            requests.append(("hessian.slq", {**common, "probes": params["probes"], "steps": params["steps"]}))
        return requests

    def cost(self, params, n_params, n_train):
        # one product ~ 4 forward passes; the dense path forms n_params columns
        if choose_method(params["method"], n_params, max(params["top_k"], params["bottom_k"])) == "dense":
            return 4.0 * n_params * n_train
        products = 4 * (params["top_k"] + params["bottom_k"]) + 40
        products += params["density"] * params["probes"] * params["steps"] + params["trace"] * params["trace_samples"]
        return 4.0 * products * n_train

    def run(self, ctx, params):
        top_k, bottom_k, path, data, common = self._resolve(ctx, params)
        hessian_op = _operator(lambda: ctx.artifact("hessian.operator", split=data["split"], batches=data["batches"]))
        found = Measured(_finite(descent_check(hessian_op)), hessian_op.n_examples)
        if path == "dense":
            found.dense = ctx.artifact("hessian.dense", **common)
        else:
            for which, k in (("top", top_k), ("bottom", bottom_k)):
                if k:
                    found.eigen[which] = ctx.artifact("hessian.eigen", k=k, which=which, tol=params["tol"],
                                                     method="lanczos", **common)
            if params["trace"]:
                op = ctx.artifact("hessian.operator", **common)
                found.trace = hutchpp(op.matmat, ctx.n_params, params["trace_samples"], ctx.generator, ctx.dtype,
                                      ctx.device)
            if params["density"]:
                found.quadrature = ctx.artifact("hessian.slq", probes=params["probes"], steps=params["steps"], **common)
        return self._dataset(ctx, params, top_k, bottom_k, path, data, found)

    def run_batched(self, ctxs, params):
        """Cells of one architecture on the same data: every product is one ``vmap``-ed backward pass
        for all of them, and each cell's Lanczos, Hutch++ and SLQ runs take the steps they take in
        :meth:`run` (same seeds, same stopping), advanced in lockstep."""
        if len(ctxs) == 1:
            return [self.run(ctxs[0], params)]
        first = ctxs[0]
        top_k, bottom_k, path, data, common = [self._resolve(ctx, params) for ctx in ctxs][0]
        hessian_op = _operator(lambda: stacked_operator(ctxs, "hessian", data["split"], data["batches"]))
        found = [Measured(_finite(check), hessian_op.n_examples) for check in descent_checks(hessian_op)]
        if path == "dense":
            op = hessian_op if params["operator"] == "hessian" else None
            for f, spectrum in zip(found, dense_spectra(ctxs, **common, op=op)):
                f.dense = spectrum
        else:
            op = hessian_op if params["operator"] == "hessian" else stacked_operator(ctxs, **common)
            for which, k in (("top", top_k), ("bottom", bottom_k)):
                if k:
                    for f, eig in zip(found, eigen_many(ctxs, op, k, which, params["tol"])):
                        f.eigen[which] = eig
            if params["trace"]:
                routines = [hutchpp_steps(ctx.n_params, params["trace_samples"], ctx.generator, ctx.dtype, ctx.device)
                            for ctx in ctxs]
                for f, estimate in zip(found, lockstep(first, routines, op, "Hutch++ trace", 3)):
                    f.trace = estimate
            if params["density"]:
                for f, q in zip(found, slq_many(ctxs, op, params["probes"], params["steps"])):
                    f.quadrature = q
        return [self._dataset(ctx, params, top_k, bottom_k, path, data, f) for ctx, f in zip(ctxs, found)]

    def _resolve(self, ctx, params):
        n = ctx.n_params
        data = {**DATA_SCHEMA["default"], **params["data"]}
        common = {"operator": params["operator"], "split": data["split"], "batches": data["batches"]}
        top_k, bottom_k = params["top_k"], params["bottom_k"]
        method = params["method"]
        if max(top_k, bottom_k) > n:
            ctx.warn(f"top_k={top_k} / bottom_k={bottom_k} exceed the {n} parameters: all {n} eigenvalues "
                     f"are computed densely and the lists are clamped to {n}")
            top_k, bottom_k, method = min(top_k, n), min(bottom_k, n), "dense"
        return top_k, bottom_k, choose_method(method, n, max(top_k, bottom_k)), data, common

    def _dataset(self, ctx, params, top_k, bottom_k, path, data, found: "Measured") -> xr.Dataset:
        n = ctx.n_params
        check = found.check
        hvp_count = 1
        variables, attrs = {}, {"path": path, "operator": params["operator"], "n_params": n,
                                "split": data["split"], "examples": found.examples}

        if path == "dense":
            spectrum = found.dense
            values = spectrum.values.to("cpu", torch.float64)
            hvp_count += spectrum.matvecs
            top, bottom = values.flip(0)[:top_k], values[:bottom_k]
            trace, trace_stderr = float(values.sum()), 0.0
            scale = float(values.abs().max())
            zero = numerical_zero(scale, n, ctx.dtype)
            negative, negative_stderr, negative_bound = float((values < -zero).double().mean()), 0.0, 0.0
            nodes, weights = values[None], torch.full((1, n), 1.0 / n, dtype=torch.float64)
            attrs["converged"] = True
        else:
            top = bottom = torch.zeros(0, dtype=torch.float64)
            converged, scale = True, 0.0
            for which, eig in found.eigen.items():
                k = len(eig.values)
                hvp_count += eig.hvp_count
                converged &= eig.converged
                scale = max(scale, float(eig.values.abs().max()))
                if not eig.converged:
                    worst = float((eig.errors / eig.values.abs().clamp_min(1e-300)).max())
                    ctx.warn(f"Lanczos {which}-{k} did not reach tol={params['tol']} within {eig.hvp_count} "
                             f"products (estimated relative error up to {worst:.1e}); raise tol or lower {which}_k")
                if which == "top":
                    top = eig.values
                else:
                    bottom = eig.values
            attrs["converged"] = bool(converged)
            if found.trace is not None:
                trace, trace_stderr = found.trace.value, found.trace.stderr
                hvp_count += found.trace.matvecs
            if found.quadrature is not None:
                q = found.quadrature
                hvp_count += q.matvecs
                scale = max(scale, float(q.nodes.abs().max()))
                zero = numerical_zero(scale, n, ctx.dtype)
                # the midpoint of the Chebyshev-Markov-Stieltjes bracket, not the Gauss rule of a
                # step function (which is off by up to the weight of the nodes next to zero)
                negative, negative_stderr, negative_bound = mass_below(q, -zero)
                nodes, weights = q.nodes, q.weights

        if top_k:
            variables["top_eigenvalues"] = xr.DataArray(
                top.numpy(), dims="k_top", coords={"k_top": np.arange(1, len(top) + 1)},
                attrs={"description": "largest eigenvalues, descending (k_top=1 is the largest)", "units": EIGEN_UNITS})
        if bottom_k:
            variables["bottom_eigenvalues"] = xr.DataArray(
                bottom.numpy(), dims="k_bottom", coords={"k_bottom": np.arange(1, len(bottom) + 1)},
                attrs={"description": "smallest eigenvalues, ascending (k_bottom=1 is the smallest)", "units": EIGEN_UNITS})
        if params["trace"]:
            variables["trace"] = xr.DataArray(trace, attrs={"description": "trace (sum of all eigenvalues)",
                                                            "units": EIGEN_UNITS})
            variables["trace_stderr"] = xr.DataArray(trace_stderr, attrs={
                "description": "standard error of trace (0 when exact)", "units": EIGEN_UNITS})
        if params["density"]:
            grid, sigma = density_grid(nodes, params["grid"], params["bandwidth"])
            density = spectral_density(nodes, weights, grid, sigma)
            variables["density"] = xr.DataArray(density.numpy(), dims="grid", attrs={
                "description": "spectral density (Gaussian-smoothed, integrates to 1 over grid_eigenvalue)",
                "units": "1 / (" + EIGEN_UNITS + ")"})
            variables["grid_eigenvalue"] = xr.DataArray(grid.numpy(), dims="grid", attrs={
                "description": "the eigenvalue at each density grid point (evenly spaced)", "units": EIGEN_UNITS})
            variables["negative_fraction"] = xr.DataArray(negative, attrs={
                "description": "fraction of the spectral mass below zero (the saddle index)"})
            variables["negative_fraction_stderr"] = xr.DataArray(negative_stderr, attrs={
                "description": "standard error of negative_fraction over the SLQ probes (0 when exact)"})
            variables["negative_fraction_bound"] = xr.DataArray(negative_bound, attrs={
                "description": "bound on the quadrature error of negative_fraction (Chebyshev-Markov-Stieltjes; "
                               "0 when exact): add it to the statistical error"})
            attrs["density_sigma"] = sigma
            attrs["negative_threshold"] = zero
        variables["hvp_count"] = xr.DataArray(hvp_count, attrs={
            "description": "curvature-vector products spent (dense path: columns formed)"})
        variables["gradient_norm"] = xr.DataArray(check.gradient_norm, attrs={
            "description": "norm of the gradient of the loss at the point"})
        variables["loss"] = xr.DataArray(check.loss, attrs={"description": "the loss the curvature is measured on"})
        attrs["near_minimum"] = bool(check.decrease <= 0.01 * abs(check.loss))
        if not attrs["near_minimum"]:
            ctx.warn(f"not near a minimum: a gradient step would lower the loss ({check.loss:.4g}) by at least "
                     f"{check.decrease:.3g} in its quadratic model; the spectrum is that of a non-critical point")
        ds = xr.Dataset(variables, attrs=attrs)
        for name, var in ds.data_vars.items():
            if var.dtype.kind == "f" and not np.isfinite(var.values).all():
                raise ProbeError(f"{name} is not finite: the loss or its curvature overflowed at this point; "
                                 "check the checkpoint, or measure in float64 (dtype: float64)")
        return ds

