"""Probe ``langevin``: batched SGLD chains around w*, the local learning coefficient, and the
diffusion of the chains along the set of low-loss parameters.

The chains sample the localized tempered posterior
p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²) and the probe reports

    λ̂ = nβ·(E_w[L_n(w)] − L_n(w*))

(Lau et al. 2023, arXiv:2308.12108), with its standard error across independent
chains, the loss and distance traces, and R-hat / ESS of the loss. The numerics
live in :mod:`basinprobe.runtime.substrate.sgld` and
:mod:`basinprobe.runtime.substrate.diagnostics`. With ``execution: {batch_cells: true}``
the cells of a sweep that share architecture and data are sampled together
(:meth:`Langevin.run_batched`); ``execution: {compile: true}`` compiles the SGLD step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import Probe, ProbeError
from basinprobe.runtime.substrate import sgld
from basinprobe.runtime.substrate.diagnostics import effective_sample_size, split_rhat

AUTO = "auto"
# Calibration: this many chains per grid step, each run this many full-batch steps.
CALIBRATION_CHAINS = 4
CALIBRATION_STEPS = 64
CALIBRATION_GRID = 16
# target_acceptance: auto. An unadjusted sampler's stationary variance in a direction of
# precision p is 1/(p·(1 − εp/4)); at acceptance 0.99 the LLC bias measured on small
# regular models (d = 10) is +3–4% (+16% at 0.9). MALA is exact at any step, so its
# target trades only efficiency.
TARGET_ACCEPTANCE = {"sgld": 0.99, "sgld_rmsprop": 0.99, "mala": 0.8}
RHAT_WARNING = 1.1
DIVERGED = "the chain diverged (see diverged)"
DIVERGED_AT = "the chain had diverged by this draw (see diverged)"


def _positive_or_auto(description: str) -> dict:
    return {"anyOf": [{"const": AUTO}, {"type": "number", "exclusiveMinimum": 0}],
            "default": AUTO, "description": description}


# The largest Hessian eigenvalue of the training loss at w* anchors the step-size grid; a
# loose tolerance is plenty for a grid of factors of 2.
TOP_EIGENVALUE = {"k": 1, "which": "top", "method": "lanczos", "tol": 1e-3}


def top_hessian_eigenvalue(ctx) -> float:
    return float(ctx.artifact("hessian.eigen", **TOP_EIGENVALUE).values[0])


class Langevin(Probe):
    name = "langevin"
    batched = True      # run_batched: the chains of several cells (e.g. seeds) advance together
    requires = ("hessian.eigen",)
    description = "local learning coefficient from batched SGLD chains; loss and distance traces, R-hat, ESS"
    schema = {
        "type": "object",
        "properties": {
            "chains": {"type": "integer", "minimum": 1, "default": 8,
                       "description": "number of independent chains, advanced together"},
            "draws": {"type": "integer", "minimum": 1, "default": 400,
                      "description": "recorded draws per chain, burn-in included"},
            "burn_in": {"anyOf": [{"const": AUTO}, {"type": "integer", "minimum": 0}], "default": AUTO,
                        "description": "leading draws left out of every estimate; auto = a quarter of draws"},
            "thin": {"type": "integer", "minimum": 1, "default": 1,
                     "description": "sampler steps per recorded draw"},
            "step_size": _positive_or_auto("SGLD step ε; auto = largest step of a geometric grid whose "
                                           "short full-batch chains stay finite and reach target_acceptance"),
            "target_acceptance": {"anyOf": [{"const": AUTO},
                                            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}],
                                  "default": AUTO,
                                  "description": "mean Metropolis-Hastings acceptance probability the auto step must "
                                                 "reach; auto = 0.99 for sgld and sgld_rmsprop, 0.8 for mala"},
            "nbeta": _positive_or_auto("inverse temperature times n; auto = n/log n, n the training-set size"),
            "localization": {"type": "number", "minimum": 0, "default": 1.0,
                             "description": "γ, strength of the Gaussian pull (γ/2)·‖w − w*‖² toward w*"},
            "batch_size": {"anyOf": [{"const": "full"}, {"type": "integer", "minimum": 1}], "default": "full",
                           "description": "examples per gradient (each chain its own minibatch order); full = "
                                          "the whole training set"},
            "draw_loss": {"enum": ["minibatch", "full"], "default": "minibatch",
                          "description": "with minibatches, the loss recorded per draw: the draw's last minibatch "
                                         "loss (free, unbiased, noisier) or the full training loss (one forward pass "
                                         "over the training set per draw); ignored with batch_size: full"},
            "sampler": {"enum": list(sgld.SAMPLERS), "default": "sgld",
                        "description": "sgld; sgld_rmsprop (RMSprop-preconditioned); mala (Metropolis-adjusted, "
                                       "full batch)"},
        },
        "additionalProperties": False,
    }

    def artifact_requests(self, params):
        if params["step_size"] != AUTO:
            return []
        return [("hessian.eigen", TOP_EIGENVALUE)]

    def cost(self, params, n_params, n_train):
        batch = n_train if params.get("batch_size", "full") == "full" else params["batch_size"]
        steps = params.get("draws", 400) * params.get("thin", 1)
        calibration = CALIBRATION_CHAINS * CALIBRATION_STEPS * CALIBRATION_GRID * n_train   # full batch
        return 3.0 * (params.get("chains", 8) * steps * batch
                      + (calibration if params.get("step_size", AUTO) == AUTO else 0))

    def check(self, params, n_params, n_train):
        batch_size = None if params["batch_size"] == "full" else params["batch_size"]
        _check(params, n_train, _burn_in(params), batch_size)

    def run(self, ctx, params):
        return self.run_batched([ctx], params)[0]

    def run_batched(self, ctxs, params):
        """Cells that share the model's architecture and the data (e.g. several training
        seeds): the chains of all cells advance together, each cell's chains pulled to its
        own w* and driven by noise from its own ``ctx.seed``, so every cell gets what
        :meth:`run` gives it alone (up to floating-point reassociation in the batched
        gradient)."""
        if len(ctxs) > 1 and not _share_model_and_data(ctxs):
            return [self.run(ctx, params) for ctx in ctxs]
        first = ctxs[0]
        X, y = first.data.X_train, first.data.y_train
        n = len(X)
        chains, draws, thin = params["chains"], params["draws"], params["thin"]
        burn_in = _burn_in(params)
        sampler = params["sampler"]
        batch_size = None if params["batch_size"] == "full" else params["batch_size"]
        _check(params, n, burn_in, batch_size)
        if batch_size == n:
            batch_size = None                        # a minibatch of the whole set is the full batch
        nbeta = n / math.log(n) if params["nbeta"] == AUTO else float(params["nbeta"])
        gamma = float(params["localization"])
        target = TARGET_ACCEPTANCE[sampler] if params["target_acceptance"] == AUTO else params["target_acceptance"]

        centers = torch.stack([ctx.flat_params for ctx in ctxs])
        posterior = sgld.LocalPosterior(first.forward, first.loss_fn, X, y, centers, nbeta, gamma,
                                        compile=bool(first.compile),
                                        param_shapes=dict(zip(first.param_names, first.param_shapes)))
        loss_stars = posterior.losses_at_centers.tolist()
        for loss_star in loss_stars:
            if not math.isfinite(loss_star):
                raise ProbeError(f"the training loss at w* is {loss_star}; the LLC needs a finite loss at the "
                                 "checkpoint")
        grad_norms = posterior.grad_at_centers().norm(dim=1).tolist()

        calibrations = [None] * len(ctxs)
        if params["step_size"] == AUTO:
            with first.progress(CALIBRATION_STEPS, "langevin: step-size calibration") as bar:
                calibrations = sgld.calibrate_step_sizes(
                    posterior, top_eigenvalues=[top_hessian_eigenvalue(ctx) for ctx in ctxs], sampler=sampler, chains=CALIBRATION_CHAINS, seeds=[ctx.seed + 1000 for ctx in ctxs],
                    target_acceptance=target, steps=CALIBRATION_STEPS, grid_size=CALIBRATION_GRID, progress=bar)
            for calibration in calibrations:
                if calibration.step_size is None:
                    best = int(np.argmax(calibration.acceptance))
                    raise ProbeError(
                        f"step_size: auto found no step in [{calibration.grid[-1]:.3g}, {calibration.grid[0]:.3g}] "
                        f"whose chains stay finite with mean acceptance >= {target} (best "
                        f"{calibration.acceptance[best]:.3f} at {calibration.grid[best]:.3g}); set step_size to a "
                        "number or lower target_acceptance")
            step_sizes = [calibration.step_size for calibration in calibrations]
        else:
            step_sizes = [float(params["step_size"])] * len(ctxs)

        cells = f"{len(ctxs)} cells x " if len(ctxs) > 1 else ""
        with first.progress(draws * thin, f"langevin: {cells}{chains} chains x {draws * thin} steps") as bar:
            trace = sgld.sample(posterior, step_size=torch.tensor(step_sizes, dtype=torch.float64), chains=chains,
                                draws=draws, thin=thin, sampler=sampler, batch_size=batch_size,
                                seed=[ctx.seed for ctx in ctxs], progress=bar, adapt_steps=burn_in * thin,
                                draw_loss=params["draw_loss"])
        settings = dict(params=params, n=n, burn_in=burn_in, batch_size=batch_size, nbeta=nbeta, gamma=gamma,
                        target=target)
        results = [_cell_result(trace.cell(i, chains), step_sizes[i], calibrations[i], loss_stars[i], grad_norms[i],
                                **settings) for i in range(len(ctxs))]
        for ctx, (_, messages) in zip(ctxs, results):
            for message in messages:
                ctx.warn(message)
        return [ds for ds, _ in results]


def _share_model_and_data(ctxs) -> bool:
    """Whether the cells can be sampled with one functional model: same parameter layout,
    buffers, data, loss, device and dtype (the runtime groups cells this way already)."""
    first = ctxs[0]
    for ctx in ctxs[1:]:
        if (ctx.param_names != first.param_names or ctx.param_shapes != first.param_shapes
                or ctx.device != first.device or ctx.dtype != first.dtype or ctx.loss_fn is not first.loss_fn
                or type(ctx.model) is not type(first.model)):
            return False
        if ctx.buffers.keys() != first.buffers.keys() or not all(
                torch.equal(ctx.buffers[k], first.buffers[k]) for k in first.buffers):
            return False
        if ctx.data is not first.data and not (torch.equal(ctx.data.X_train, first.data.X_train)
                                               and torch.equal(ctx.data.y_train, first.data.y_train)):
            return False
    return True


def _cell_result(trace, step_size, calibration, loss_star, grad_norm, *, params, n, burn_in, batch_size,
                 nbeta, gamma, target) -> tuple[xr.Dataset, list[str]]:
    """One cell's Dataset from its chains, and the warnings it raises (the caller emits them
    once every cell of a batch has succeeded, so a batch that fails and is rerun cell by cell
    does not warn twice)."""
    chains, draws, thin = params["chains"], params["draws"], params["thin"]
    sampler = params["sampler"]
    data_vars, attrs, messages = {}, {}, []
    if calibration is not None:
        data_vars.update(_calibration_vars(calibration))
    alive = ~trace.diverged
    n_alive = int(alive.sum())
    if n_alive == 0:
        raise ProbeError(
            f"all {chains} chains diverged at step_size {step_size:.3g} (loss became NaN/inf or nβ·(L − L*) "
            f"exceeded {sgld.DIVERGENCE_ENERGY_PER_PARAM:g}·d); use a smaller step_size, e.g. "
            f"{step_size / 10:.3g}, or step_size: auto")
    if n_alive < chains:
        messages.append(f"{chains - n_alive} of {chains} chains diverged at step_size {step_size:.3g} and are left out "
                        "of llc (see diverged); a smaller step_size avoids this")
    if n_alive < 2 and chains >= 2:
        messages.append("only one chain survived; llc_stderr comes from its effective sample size, not across chains")

    llc_chain = sgld.llc_per_chain(trace, burn_in)
    kept = trace.loss[alive][:, burn_in:].numpy()
    llc = float(llc_chain[alive].mean())
    rhat = split_rhat(kept)
    ess = effective_sample_size(kept)
    if not (math.isfinite(rhat) and math.isfinite(ess)):
        raise ProbeError(f"the loss did not change along the chains at step_size {step_size:.3g}; "
                         "use a larger step_size or step_size: auto")
    if n_alive >= 2:
        llc_stderr = float(llc_chain[alive].std(unbiased=True)) / math.sqrt(n_alive)
    else:
        # One chain: Monte Carlo standard error of its mean, nβ·sd/√ESS.
        llc_stderr = nbeta * float(np.std(kept, ddof=1)) / math.sqrt(effective_sample_size(kept, rank_normalize=False))
    if not (math.isfinite(llc) and math.isfinite(llc_stderr)):
        raise ProbeError(f"the LLC estimate is not finite ({llc}, stderr {llc_stderr}); use a smaller step_size")

    if rhat > RHAT_WARNING:
        # the step is the calibration's choice, or the user's: say which to change
        step = (f"or give a step_size larger than the {step_size:.3g} that auto chose"
                if params.get("step_size", "auto") == "auto" else f"or a larger step_size than {step_size:.3g}")
        messages.append(f"R-hat of the loss is {rhat:.3f} > {RHAT_WARNING}: the chains have not mixed; "
                        f"increase draws (or burn_in), {step}")
    # Stationarity: chains that still drift away from w* (too short a burn-in, too weak a
    # localization) give an llc that grows with the run's length. Compare the halves after burn-in.
    half = kept.shape[1] // 2
    drift_chain = nbeta * (kept[:, half:].mean(axis=1) - kept[:, :half].mean(axis=1))
    drift = float(drift_chain.mean())
    drift_stderr = float(drift_chain.std(ddof=1) / math.sqrt(len(drift_chain))) if len(drift_chain) >= 2 else math.nan
    # 4 standard errors (few chains: a t with chains - 1 degrees of freedom has heavy tails) and 10%
    drifting = math.isfinite(drift_stderr) and abs(drift) > 4 * drift_stderr and abs(drift) > 0.1 * abs(llc)
    if drifting:
        messages.append(f"the chains are still drifting: the second half of the draws after burn-in gives an llc "
                        f"{drift:+.3g} (± {drift_stderr:.2g}) from the first's, so llc depends on the run's length; "
                        "increase burn_in and draws, or localization")
    # At stationarity E‖∇U‖² = E[ΔU]; a gradient at w* above that thermal scale means w* is
    # not at the bottom of its basin at this temperature.
    thermal = float(trace.grad_norm_sq[alive][:, burn_in:].mean())
    if nbeta**2 * grad_norm**2 > thermal or llc < 0:
        messages.append(f"w* looks far from a local minimum (gradient norm {grad_norm:.3g}, llc {llc:.3g}); the LLC "
                        "assumes a local minimum: train longer or probe a later checkpoint")

    loss_kind = ("full training set" if batch_size is None or params["draw_loss"] == "full"
                 else "loss of the draw's last minibatch, an unbiased estimate")
    chain = np.arange(chains)
    draw = np.arange(draws)
    loss_trace = trace.loss.numpy()
    data_vars.update({
        "llc": xr.DataArray(llc, attrs={"description": "local learning coefficient nβ·(E[L_n(w)] − L_n(w*)), "
                                                       "mean over the chains that did not diverge"}),
        "llc_stderr": xr.DataArray(llc_stderr, attrs={"description": "standard error of llc across independent "
                                                                     "chains (std/√chains)"}),
        "llc_chain": xr.DataArray(llc_chain.numpy(), dims=("chain",), attrs={
            "description": "llc of each chain from its draws after burn-in", "nan_means": DIVERGED}),
        "loss_trace": xr.DataArray(loss_trace, dims=("chain", "draw"), attrs={
            "description": f"training loss L_n(w) at each draw ({loss_kind}), burn-in included",
            "units": "loss", "burn_in": burn_in, "thin": thin, "nan_means": DIVERGED_AT}),
        "distance_trace": xr.DataArray(trace.distance.numpy(), dims=("chain", "draw"), attrs={
            "description": "Euclidean distance ‖w − w*‖ at each draw: how far the chain diffuses from w*",
            "units": "parameter norm", "burn_in": burn_in, "thin": thin, "nan_means": DIVERGED_AT}),
        "llc_drift": xr.DataArray(drift, attrs={
            "description": "llc from the second half of the draws after burn-in minus that from the first half, "
                           "mean over chains: ≈ 0 at stationarity"}),
        "llc_drift_stderr": xr.DataArray(drift_stderr, attrs={
            "description": "standard error of llc_drift across chains", "nan_means": "one chain"}),
        "mixed": xr.DataArray(bool(rhat <= RHAT_WARNING and not drifting), attrs={
            "description": f"R-hat ≤ {RHAT_WARNING} and no drift between the halves after burn-in (|llc_drift| "
                           "≤ 4 stderr or ≤ 10% of llc): false means llc is not yet to be trusted"}),
        "rhat": xr.DataArray(rhat, attrs={"description": "rank-normalized split R-hat of the loss after burn-in "
                                                         "(Vehtari et al. 2021), chains that did not diverge"}),
        "ess": xr.DataArray(ess, attrs={"description": "bulk effective sample size of the loss after burn-in, "
                                                       "all chains that did not diverge together"}),
        "step_size": xr.DataArray(step_size, attrs={"description": "SGLD step ε used"}),
        "nbeta": xr.DataArray(nbeta, attrs={"description": "inverse temperature times n used"}),
        "loss_at_wstar": xr.DataArray(loss_star, attrs={"description": "L_n(w*) on the full training set",
                                                        "units": "loss"}),
        "grad_norm_at_wstar": xr.DataArray(grad_norm, attrs={"description": "‖∇L_n(w*)‖ on the full training "
                                                                            "set"}),
        "diverged": xr.DataArray(trace.diverged.numpy(), dims=("chain",), attrs={
            "description": "chain stopped because its loss became NaN/inf or nβ·(L − L*) exceeded "
                           f"{sgld.DIVERGENCE_ENERGY_PER_PARAM:g}·d; excluded from every estimate"}),
    })
    if trace.acceptance is not None:
        acceptance = trace.acceptance[:, burn_in:].mean(dim=1).numpy()
        what = ("fraction of proposals accepted" if sampler == "mala" else
                "Metropolis-Hastings acceptance probability of the unadjusted steps (a step-size diagnostic)")
        data_vars["acceptance"] = xr.DataArray(acceptance, dims=("chain",), attrs={
            "description": f"mean {what} after burn-in", "nan_means": DIVERGED})
    attrs.update({
        "sampler": sampler,
        "burn_in": burn_in,
        "thin": thin,
        "localization": gamma,
        "batch_size": "full" if batch_size is None else batch_size,
        "draw_loss": "full" if batch_size is None else params["draw_loss"],
        "n_train": n,
        "step_size_method": "auto" if params["step_size"] == AUTO else "given",
        "nbeta_method": "n/log n" if params["nbeta"] == AUTO else "given",
        "target_acceptance": float(target),
        "grad_norm_at_wstar": grad_norm,
    })
    if calibration is not None:
        attrs["calibration"] = (
            f"geometric grid eps_k = 2^(1-k)/(nbeta*h_max + gamma), k = 0..{CALIBRATION_GRID - 1} (h_max: top Hessian "
            f"eigenvalue at w*, Lanczos); {CALIBRATION_CHAINS} full-batch chains x {CALIBRATION_STEPS} steps "
            f"per grid step, all batched; chosen: the largest step with no divergence and mean Metropolis-Hastings "
            f"acceptance >= {float(target)} over the second half, interpolated in log(1 - acceptance) vs log eps "
            "toward the next larger grid step (see calibration_* variables)")
    coords = {"chain": chain, "draw": draw}
    if "calibration_step_size" in data_vars:
        coords["calibration"] = np.arange(CALIBRATION_GRID)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs), messages


def _burn_in(params) -> int:
    return params["draws"] // 4 if params["burn_in"] == AUTO else params["burn_in"]


def _check(params, n: int, burn_in: int, batch_size: int | None) -> None:
    for key in ("chains", "draws", "thin"):
        if params[key] < 1:
            raise ProbeError(f"{key} must be a positive integer, not {params[key]}")
    for key in ("step_size", "nbeta"):
        value = params[key]
        if value != AUTO and not (math.isfinite(value) and value > 0):
            raise ProbeError(f"{key} must be a positive finite number or 'auto', not {value}")
    if not (math.isfinite(params["localization"]) and params["localization"] >= 0):
        raise ProbeError(f"localization must be a finite number >= 0, not {params['localization']}")
    target = params["target_acceptance"]
    if target != AUTO and not 0 < target < 1:
        raise ProbeError(f"target_acceptance must lie in (0, 1), not {target}")
    if burn_in >= params["draws"]:
        raise ProbeError(f"burn_in ({burn_in}) must be smaller than draws ({params['draws']})")
    if params["draws"] - burn_in < 4:
        raise ProbeError(f"R-hat needs at least 4 draws after burn_in; have {params['draws'] - burn_in}: "
                         "increase draws or lower burn_in")
    if batch_size is not None and batch_size > n:
        raise ProbeError(f"batch_size {batch_size} is larger than the training set ({n} examples); "
                         "use a smaller batch_size or 'full'")
    if params["nbeta"] == AUTO and n < 2:
        raise ProbeError("nbeta: auto is n/log n and needs at least 2 training examples; give nbeta")
    if params["sampler"] == "mala" and batch_size is not None and batch_size < n:
        raise ProbeError("sampler mala needs full-batch gradients (a minibatch Metropolis test is biased); "
                         "use batch_size: full or sampler sgld")


def _calibration_vars(calibration: sgld.Calibration) -> dict:
    dims = ("calibration",)
    return {
        "calibration_step_size": xr.DataArray(np.array(calibration.grid), dims=dims, attrs={
            "description": "step-size grid tried by step_size: auto, largest first (2^(1-k)/(nβ·h_max + γ), h_max the "
                           f"top Hessian eigenvalue at w*, {calibration.top_curvature:.4g})"}),
        "calibration_acceptance": xr.DataArray(np.array(calibration.acceptance), dims=dims, attrs={
            "description": f"mean MH acceptance probability of {CALIBRATION_CHAINS} short full-batch chains "
                           f"({CALIBRATION_STEPS} steps, second half); the chosen step is the largest with no "
                           f"divergence and acceptance >= {calibration.target_acceptance}"}),
        "calibration_llc": xr.DataArray(np.array(calibration.llc), dims=dims, attrs={
            "description": "llc of those short chains (second half). Not equilibrated at small steps: read it "
                           "for the trend at large steps", "nan_means": "every chain at this step diverged"}),
        "calibration_diverged": xr.DataArray(np.array(calibration.diverged_fraction), dims=dims, attrs={
            "description": "fraction of the short chains that diverged"}),
    }
