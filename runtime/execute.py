"""Executing a plan: build, train, probe every cell, write each result as soon as it exists."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import ProbeError, Registry, load_registry
from basinprobe.runtime.build import (BuildError, build_data, build_model, flat_parameters, load_checkpoint,
                                      resolve_device, resolve_dtype)
from basinprobe.runtime.context import CellContext, GroupContext, Member, derive_seed
from basinprobe.runtime.plan import GroupPlan, Plan, PointPlan, code_versions, compile_plan, components_of
from basinprobe.runtime.progress import Reporter
from basinprobe.runtime.spec import RESERVED_DIMS, Problem, Spec, SpecError
from basinprobe.runtime.store import RunStore, cell_label, combine_runs
from basinprobe.runtime.train import TrainingDiverged, train
from basinprobe.runtime.yamlio import mark_of


@dataclass
class RunReport:
    store: str
    done: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # "<cell> <entry>: <message>", as recorded in the store
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted


class Workshop:
    """Builds and caches the pieces of sweep points (data sets are shared between points)."""

    def __init__(self, spec: Spec, registry: Registry, device: torch.device, dtype: torch.dtype):
        self.spec, self.registry, self.device, self.dtype = spec, registry, device, dtype
        self._data: dict[str, object] = {}

    def _spec_error(self, exc: BuildError) -> SpecError:
        return SpecError([Problem(mark_of(self.spec.document, exc.path), exc.path, str(exc))])

    def data(self, point: PointPlan):
        if point.data_node not in self._data:
            try:
                self._data[point.data_node] = build_data(point.config.data, self.registry)
            except BuildError as exc:
                raise self._spec_error(exc) from None
        return self._data[point.data_node]

    def model(self, point: PointPlan) -> torch.nn.Module:
        try:
            model = build_model(point.config.model, point.config.seed, self.registry)
        except BuildError as exc:
            raise self._spec_error(exc) from None
        return model.to(device=self.device, dtype=self.dtype)

    def loss(self, point: PointPlan):
        return self.registry.losses[point.config.loss].obj

    def file_trajectory(self, point: PointPlan, model) -> dict[int, torch.Tensor]:
        try:
            return {i: load_checkpoint(model, path) for i, path in enumerate(point.config.model.checkpoints)}
        except BuildError as exc:
            raise self._spec_error(exc) from None

    def preflight(self, plan: Plan) -> dict[str, tuple[int, int]]:
        """Build every point's data and model once before anything is written (bad input fails here).

        Points whose model and data differ only in the seed are checked once: a long seed axis
        would otherwise build (and seed) thousands of identical architectures here.
        """
        sizes, checked = {}, {}
        for point in plan.points:
            alike = (repr(point.config.model), point.data_node)
            if point.source != "files" and alike in checked:
                sizes[point.key] = checked[alike]
                continue
            data = self.data(point)
            model = self.model(point)
            if point.source == "files":
                self.file_trajectory(point, model)
            self._check_shapes(point, model, data)
            sizes[point.key] = checked[alike] = (sum(p.numel() for p in model.parameters()), len(data.X_train))
        self._check_entries(plan, sizes)
        return sizes

    def _check_entries(self, plan: Plan, sizes: dict[str, tuple[int, int]]) -> None:
        """Each probe entry's ``check`` of its ``with:`` block, once per distinct model and data size."""
        first_point = {}
        for point in plan.points:
            first_point.setdefault(sizes[point.key], point)
        for index, entry in enumerate(self.spec.probes):
            probe = self.registry.probes[entry.probe].obj()
            for ((n_params, n_train), point), (own, params) in itertools.product(first_point.items(), entry.runs()):
                try:
                    probe.check(dict(params), n_params, n_train)
                except ProbeError as exc:
                    where = f"at sweep point {cell_label(point.coords)}: " if len(first_point) > 1 else ""
                    where += f"at {cell_label(own)}: " if own else ""
                    path = ("probes", index, "with")
                    raise SpecError([Problem(mark_of(self.spec.document, path), path, where + str(exc))]) from None

    def _check_shapes(self, point, model, data) -> None:
        x = data.X_train[:2].to(self.device, self.dtype)
        try:
            with torch.no_grad():
                out = model(x)
        except RuntimeError as exc:
            problem = f"the model cannot take the data's inputs of shape {tuple(data.X_train.shape[1:])}: {exc}"
        else:
            problem = None
            if data.task == "classification" and out.shape[-1] != data.n_classes:
                problem = f"the model has {out.shape[-1]} outputs but the data has {data.n_classes} classes"
            elif data.task == "regression" and tuple(out.shape[1:]) != tuple(data.y_train.shape[1:]):
                problem = (f"the model's outputs have shape {tuple(out.shape[1:])} but the targets "
                           f"{tuple(data.y_train.shape[1:])}")
        if problem:
            # at a sweep point, name it: the values swept are what made this point's model misfit
            where = f"at sweep point {cell_label(point.coords)}: " if point.coords else ""
            raise SpecError([Problem(mark_of(self.spec.document, ("model",)), ("model",), where + problem)])


def check_result(result, entry_name: str, forbidden_dims: list[str]) -> xr.Dataset:
    """A probe's result must be a labelled Dataset with finite numbers and legal dims."""
    if not isinstance(result, xr.Dataset):
        raise ProbeError(f"probe entry {entry_name!r} returned {type(result).__name__}, not an xarray.Dataset")
    for dim in result.dims:
        if dim in RESERVED_DIMS:
            raise ProbeError(f"dim {dim!r} is a keyword of xarray's sel; the probe must rename it")
        if dim in forbidden_dims:
            raise ProbeError(f"dim {dim!r} collides with a cell dim of this spec")
    for name, var in result.data_vars.items():
        if var.dtype.kind in "fc" and "nan_means" not in var.attrs:
            values = np.asarray(var.values)
            if not np.isfinite(values).all():
                raise ProbeError(f"variable {name!r} holds NaN or inf; nothing was stored as a number (where NaN "
                                 f"is a meaningful value, the probe says what it means in a `nan_means` attr)")
    return result


def _library_folders() -> tuple[str, ...]:
    import numpy
    import scipy

    return tuple(str(Path(module.__file__).parent) + os.sep for module in (torch, numpy, scipy, xr))


def _describe_failure(exc: BaseException) -> tuple[str, str | None]:
    """The failure's message, naming where it happened: the innermost frame outside torch,
    numpy, scipy and xarray (the probe's or model's own line), and the innermost one too when
    that is inside them; and the traceback (None for a ProbeError, which says what to change)."""
    if isinstance(exc, ProbeError):
        return str(exc), None
    frames = traceback.extract_tb(exc.__traceback__)
    libraries = _library_folders()
    own = [frame for frame in frames if not frame.filename.startswith(libraries)]
    places = [frame for frame in (own[-1] if own else None, frames[-1] if frames else None) if frame is not None]
    where = ", in ".join(dict.fromkeys(f"{frame.filename}:{frame.lineno}" for frame in places))
    message = f"{type(exc).__name__}: {exc}" + (f" (at {where})" if where else "")
    return message, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-30))


def run_spec(spec: Spec, *, overwrite: bool = False, device: str | None = None,
             reporter: Reporter | None = None, registry: Registry | None = None,
             executor: str | None = None, scheduler: str | None = None, workers: int | None = None) -> RunReport:
    """Run every unfinished cell of ``spec`` and assemble its store.

    ``executor`` is ``local`` (cells one after another in this process) or
    ``dask`` (sweep points fanned out over a dask.distributed cluster); the
    arguments override the spec's ``execution:`` block.
    """
    registry = registry or load_registry()
    reporter = reporter or Reporter(quiet=True)
    execution = {**spec.execution, **{k: v for k, v in (("executor", executor), ("scheduler", scheduler),
                                                        ("workers", workers)) if v is not None}}
    plan = compile_plan(spec, registry)
    on_dask = execution.get("executor", "local") == "dask"
    requested = device or spec.device
    torch_device, recorded = coordinator_device(spec, requested, on_dask)
    dtype = resolve_dtype(spec.dtype)
    shop = Workshop(spec, registry, torch_device, dtype)
    shop.preflight(plan)
    versions = code_versions(registry, components_of(plan))
    cluster = None
    if on_dask and not _all_done(spec, plan, overwrite):
        from basinprobe.runtime.distributed import DaskCells

        # Connect (and check the workers) before anything is written.
        cluster = DaskCells.connect(spec, plan, registry, execution, requested)

    store = RunStore(spec.output)
    try:
        amended = store.open_for(spec, recorded, spec.dtype, overwrite, versions, _entry_signatures(spec, registry))
        if amended:
            reporter.note(amended)
        if cluster is not None:
            cluster.check_store()
    except Exception:
        if cluster is not None:
            cluster.close()
        raise
    status = store.status()
    report = RunReport(str(spec.output))
    entries_meta = {e.name: {"plugin": registry.probes[e.probe].plugin,
                             "plugin_version": versions.get(registry.probes[e.probe].plugin)} for e in spec.probes}
    point_layouts = {p.key: {"coords": p.coords} for p in plan.points}
    units = _units(plan)
    todo = [unit for unit in units if status.get(unit, {}).get("status") != "done"]
    report.skipped = len(units) - len(todo)
    if report.skipped:
        reporter.note(f"resuming {spec.output}: {report.skipped} finished cell results kept, {len(todo)} to run")
    try:
        with reporter:
            reporter.start_cells(len(todo), f"{spec.name}")
            states: dict[str, PointState] = {}
            if cluster is not None:
                cluster.run_points(plan, status, reporter, report, batch_cells=bool(execution.get("batch_cells")))
            else:
                run_points(plan.points, spec, shop, store, status, reporter, report, states,
                           batch_cells=bool(execution.get("batch_cells")), keep_state=bool(plan.groups))
            for group in plan.groups:
                if status.get((group.key, group.entry.name), {}).get("status") != "done":
                    _run_group(group, spec, shop, store, reporter, report, states)
    except KeyboardInterrupt:
        report.interrupted = True
        if cluster is not None:
            cluster.cancel()
        reporter.note("interrupted: finished cells are kept; run the same command again to resume")
    finally:
        if cluster is not None:
            cluster.close()
        with _sigint_held(reporter) as held:
            store.assemble(spec, entries_meta, point_layouts)
        if held:
            report.interrupted = True
    if report.interrupted and cluster is not None:
        # cells a worker finished while the futures were cancelled were staged, not reported
        after = store.status()
        report.done = sum(after.get(unit, {}).get("status") == "done" for unit in units) - report.skipped
    return report


@dataclass
class PointTiming:
    """What one sweep point took: in all, and per probe entry over its cells."""

    point: str
    coords: dict
    seconds: float
    probes: dict[str, float]
    failures: list[str]

    @property
    def setup(self) -> float:
        """Training (or loading) the point's models, and building its model and data."""
        return max(self.seconds - sum(self.probes.values()), 0.0)


def time_points(spec: Spec, plan: Plan, registry: Registry, keys: list[str], device: str | None = None,
                reporter: Reporter | None = None) -> tuple[list[PointTiming], str]:
    """Run the sweep points named by ``keys`` (their training and the cell-scoped entries on
    their cells; a key given twice runs twice) in scratch stores, removed afterwards, and time
    each; and the device they ran on. Nothing goes to the spec's output."""
    torch_device, recorded = coordinator_device(spec, device or spec.device, False)
    shop = Workshop(spec, registry, torch_device, resolve_dtype(spec.dtype))
    reporter = reporter or Reporter(quiet=True)
    points = [point for key in keys for point in plan.points if point.key == key]
    timings = []
    with tempfile.TemporaryDirectory(prefix="basinprobe-timing-") as scratch:
        with reporter:
            reporter.start_cells(sum(len(cell.entries) for point in points for cell in point.cells), "timing")
            for index, point in enumerate(points):
                store = RunStore(Path(scratch) / f"{index}.zarr")   # a point run again is trained again
                store.open_for(spec, recorded, spec.dtype, overwrite=True)
                report = RunReport(str(store.path))
                started = time.perf_counter()
                # trained here, also where only group-scoped entries will use the point
                states = {point.key: _point_state(point, shop, store, reporter)}
                run_point(point, spec, shop, store, {}, reporter, report, states)
                seconds = time.perf_counter() - started
                probes: dict[str, float] = {}
                for (_, entry), record in store.status([cell.key for cell in point.cells]).items():
                    probes[entry] = probes.get(entry, 0.0) + record.get("seconds", 0.0)
                timings.append(PointTiming(point.key, point.coords, seconds, probes, report.failures))
    return timings, recorded


@contextlib.contextmanager
def _sigint_held(reporter):
    """Hold Ctrl-C while the store is assembled: the groups are swapped in whole either way, but
    an interrupt there left a traceback and a signal's exit status instead of 130."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    held = []

    def hold(signum, frame):
        if not held:
            reporter.note("assembling the store; Ctrl-C takes effect once it is whole")
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def coordinator_device(spec: Spec, requested: str, on_dask: bool) -> tuple[torch.device, str]:
    """The device this process computes on, and the one the store records; a device this
    machine lacks is an error at the spec's ``device:``."""
    try:
        torch_device = resolve_device(requested)
        return torch_device, str(torch_device)
    except BuildError as exc:
        if not (on_dask and requested.startswith("cuda")):
            raise SpecError([Problem(mark_of(spec.document, exc.path), exc.path, str(exc))]) from None
        # A coordinator without a GPU may drive GPU workers, which are checked for one; its own
        # work (preflight, group-scoped probes) runs on its CPU.
        return torch.device("cpu"), requested


def _entry_signatures(spec: Spec, registry: Registry) -> dict[str, str]:
    """What each probe entry computes, by name: a store keeps an entry's results while this is
    unchanged. A group-scoped entry's groups are keyed by its position, which it includes."""
    signatures = {}
    for index, entry in enumerate(spec.probes):
        grouped = registry.probes[entry.probe].obj().scope == "group"
        signatures[entry.name] = json.dumps({"probe": entry.probe, "params": entry.params,
                                             "sweep": [[axis.path, list(axis.values)] for axis in entry.sweep],
                                             "at": entry.at if isinstance(entry.at, str) else list(entry.at),
                                             **({"position": index} if grouped else {})}, sort_keys=True, default=str)
    return signatures


def _units(plan: Plan) -> list[tuple[str, str]]:
    """Every (cell or group, entry) of the plan: what the store's status records."""
    units = [(cell.key, entry.name) for cell in plan.cells for entry in cell.entries]
    return units + [(group.key, group.entry.name) for group in plan.groups]


def _all_done(spec: Spec, plan: Plan, overwrite: bool) -> bool:
    """Whether the store already holds every result of this very spec, so that a rerun has
    nothing to hand to a cluster (and need not start or reach one)."""
    store = RunStore(spec.output)
    if overwrite or not store.exists() or store.root_attrs().get("spec_sha256") != spec.sha256:
        return False
    status = store.status()
    return all(status.get(unit, {}).get("status") == "done" for unit in _units(plan))


@dataclass
class PointState:
    """A sweep point ready to probe: its model, data on the device, loss and checkpoints."""

    model: torch.nn.Module
    data: object
    loss_fn: object
    trajectory: dict[int, torch.Tensor]
    artifacts: dict = field(default_factory=dict)  # computed at a checkpoint, shared by the point's cells
    diverged: str | None = None   # why training stopped before its last checkpoint (this run)

    def unreached(self, step: int) -> str | None:
        """Why checkpoint ``step`` has no parameters (training diverged before it), or None."""
        if step in self.trajectory:
            return None
        why = self.diverged or "training diverged before it (stored checkpoints end at step " \
                                f"{max(self.trajectory)}); lower train.optimizer.lr"
        return f"no checkpoint at step {step}: {why}"


def _point_state(point: PointPlan, shop: Workshop, store: RunStore, reporter) -> PointState:
    """Build the point, loading its checkpoints from the store or training it (and storing them at once)."""
    data = shop.data(point)
    model = shop.model(point)
    loss_fn = shop.loss(point)
    device, dtype = shop.device, shop.dtype
    trajectory, diverged = store.read_trajectory(point.key, point.coords, dtype), None
    if trajectory is not None and set(point.steps) - set(trajectory):   # stopped early: say why again
        diverged = store.point_layout(point.key, point.coords).get("diverged")
    if trajectory is None:
        try:
            trajectory = _make_trajectory(point, shop, model, data, loss_fn, reporter, device, dtype)
        except TrainingDiverged as exc:
            # the checkpoints before the divergence are measured (how sharpness grew up to it is
            # often the point); the later ones fail with the reason
            trajectory, diverged = exc.reached, str(exc)
        layout = {"names": [n for n, _ in model.named_parameters()],
                  "shapes": [list(p.shape) for _, p in model.named_parameters()]}
        if point.config.model.checkpoints:   # which file each checkpoint index was loaded from
            layout["files"] = list(point.config.model.checkpoints)
        if diverged:
            layout["diverged"] = diverged
        store.write_point(point.key, point.coords, trajectory, layout)
    return PointState(model, data.to(device, dtype), loss_fn, trajectory, diverged=diverged)


def _cell_context(point: PointPlan, state: PointState, checkpoint: int, shop: Workshop, reporter) -> CellContext:
    return CellContext(state.model, state.trajectory[checkpoint], state.data, state.loss_fn, device=shop.device,
                       dtype=shop.dtype, seed=derive_seed(point.config.seed, point.key, checkpoint),
                       run_seed=derive_seed(point.config.seed, point.key), run_artifacts=state.artifacts,
                       cell={**point.coords, "checkpoint": checkpoint}, checkpoint=checkpoint,
                       trajectory=state.trajectory, batch_size=point.config.data.batch_size,
                       progress_factory=reporter.task, compile=bool(shop.spec.execution.get("compile", False)))


def _measure(entry, contexts: list, seeds: list[int], forbidden_dims, run) -> list[xr.Dataset]:
    """``run(params)`` (one Dataset per context) once per point of the entry's own sweep, each
    time from the entry's seed afresh: the points differ in their parameters only, not in their
    random numbers. Each context gets its results checked and labelled along the entry's sweep
    dims, and keeps each run's warnings (named by the point, where the entry has a sweep)."""
    forbidden = list(forbidden_dims) + entry.dims
    runs = entry.runs()
    results = [[] for _ in contexts]
    warned = [[] for _ in contexts]
    for coords, params in runs:
        for ctx, seed in zip(contexts, seeds):
            ctx.begin_entry(seed)
        for k, (ctx, result) in enumerate(zip(contexts, run(dict(params)))):
            results[k].append((check_result(_beside_sweep(result, entry), entry.name, forbidden), coords))
            warned[k] += [f"{cell_label(coords)}: {w}" if coords else w for w in ctx.warnings]
    for ctx, warnings_ in zip(contexts, warned):
        ctx.warnings = warnings_
    if not entry.sweep:
        return [pieces[0][0] for pieces in results]
    axes = {axis.dim: list(axis.labels) for axis in entry.sweep}
    return [combine_runs(pieces, axes) for pieces in results]


def _beside_sweep(result, entry):
    """A probe's result, made to fit a dim of its entry's own sweep: a variable (or coordinate)
    named like a swept parameter, such as the step size that langevin's ``step_size: auto``
    chose, is kept as ``<name>_result``, since a dim's coordinate takes the name; a dim of the
    probe's own so named cannot be kept apart from the sweep's and fails the cell."""
    if not entry.sweep or not isinstance(result, xr.Dataset):
        return result
    for dim in entry.dims:
        if dim in result.dims:
            raise ProbeError(f"the probe's results have a dim {dim!r} of their own, which the entry's sweep also "
                             f"names: give the values as one list in 'with:' where {entry.probe} takes one, or "
                             "sweep another parameter")
    renamed = {}
    for name in entry.dims:
        if name in result.variables:
            new = f"{name}_result"
            while new in result.variables:
                new += "_"
            renamed[name] = new
    if not renamed:
        return result
    result = result.rename_vars(renamed)
    for old, new in renamed.items():
        result[new].attrs["stored_as"] = f"{new}, not {old}: the entry's sweep over {old!r} names a dim {old!r}"
    return result


def _run_entry(probe, ctx, entry, key: str, coords: dict, forbidden_dims, seed: int, store, reporter,
               report) -> None:
    """Run one probe entry on one cell (or group), write its result or its failure at once."""
    started = time.perf_counter()
    try:
        result, = _measure(entry, [ctx], [seed], forbidden_dims, lambda params: [probe.run(ctx, params)])
        error = trace = None
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one failing probe must not stop the other cells
        result, (error, trace) = None, _describe_failure(exc)
    _record(entry, key, coords, result, error, ctx.warnings, time.perf_counter() - started, store, reporter, report,
            trace)


def _record(entry, key, coords, result, error, warnings_, seconds, store, reporter, report, trace=None) -> None:
    label = f"{cell_label(coords)} {entry.name}".strip()
    store.write_cell(key, entry.name, coords, result, error, warnings_, trace, seconds)
    report.warnings.extend(f"{label}: {w}" for w in warnings_)
    if error:
        report.failures.append(f"{label}: {error}")
        reporter.cell_done(label, f"failed: {error}")
    else:
        report.done += 1
        noted = f", {len(warnings_)} warning{'s' * (len(warnings_) != 1)}" if warnings_ else ""
        reporter.cell_done(label, f"done in {seconds:.2f}s{noted}")


def _fail_all(pending, coords_of, store, reporter, report, error: str) -> None:
    for key, name in sorted(pending):
        coords = coords_of[key]
        store.write_cell(key, name, coords, None, error, [])
        report.failures.append(f"{cell_label(coords)} {name}: {error}")
        reporter.cell_done(f"{cell_label(coords)} {name}", f"failed: {error}")


def run_point(point: PointPlan, spec, shop: Workshop, store: RunStore, status, reporter, report,
              states: dict, keep_state: bool = False, skip: frozenset = frozenset()):
    """Every unfinished cell of one sweep point (trained or loaded once), each written when done.

    Entries named in ``skip`` are left for a batched run over several points.
    """
    pending = {(cell.key, entry.name) for cell in point.cells for entry in cell.entries
               if status.get((cell.key, entry.name), {}).get("status") != "done" and entry.name not in skip}
    if not pending:
        return
    state = states.get(point.key) or _point_state(point, shop, store, reporter)
    if keep_state:
        states[point.key] = state
    for cell in point.cells:
        entries = [e for e in cell.entries if (cell.key, e.name) in pending]
        if not entries:
            continue
        unreached = state.unreached(cell.checkpoint)
        if unreached:
            _fail_all({(cell.key, e.name) for e in entries}, {cell.key: cell.coords}, store, reporter, report,
                      unreached)
            continue
        ctx = _cell_context(point, state, cell.checkpoint, shop, reporter)
        for entry in entries:
            _run_entry(shop.registry.probes[entry.probe].obj(), ctx, entry, cell.key, cell.coords, spec.cell_dims,
                       derive_seed(ctx.cell_seed, entry.name), store, reporter, report)


def run_points(points: list[PointPlan], spec, shop: Workshop, store: RunStore, status, reporter, report,
               states: dict, *, batch_cells: bool, keep_state: bool = False) -> None:
    """Every unfinished cell of ``points``: with ``batch_cells``, the entries of batched probes
    run last, once over each set of cells that share an architecture, data and checkpoint."""
    batched = _batched_entries(spec, shop.registry) if batch_cells else frozenset()
    for point in points:
        run_point(point, spec, shop, store, status, reporter, report, states,
                  keep_state=keep_state or bool(batched), skip=batched)
    for batch in _batches(points, batched, status):
        _run_batch(batch, spec, shop, store, reporter, report, states)


def batch_key(point: PointPlan) -> tuple[str, str]:
    """Points with equal keys hold cells that a batched probe can run together."""
    model = point.config.model
    return point.data_node, json.dumps([model.kind, model.factory, model.with_], sort_keys=True)


def _batched_entries(spec: Spec, registry: Registry) -> frozenset:
    return frozenset(e.name for e in spec.probes
                     if registry.probes[e.probe].obj().batched and registry.probes[e.probe].obj().scope == "cell")


def _batches(points: list[PointPlan], batched: frozenset, status) -> list[list]:
    """Unfinished cells of batched entries, grouped by entry, checkpoint, data and architecture."""
    groups: dict[tuple, list] = {}
    for point in points:
        for cell in point.cells:
            for entry in cell.entries:
                if entry.name in batched and status.get((cell.key, entry.name), {}).get("status") != "done":
                    key = (entry.name, cell.checkpoint, *batch_key(point))
                    groups.setdefault(key, []).append((point, cell, entry))
    return list(groups.values())


def _run_batch(batch: list, spec, shop: Workshop, store: RunStore, reporter, report, states: dict) -> None:
    """One ``run_batched`` call over cells that differ only in their parameters (e.g. seeds)."""
    entry = batch[0][2]
    members = []
    for point, cell, _ in batch:
        if point.key not in states:
            states[point.key] = _point_state(point, shop, store, reporter)
        unreached = states[point.key].unreached(cell.checkpoint)
        if unreached:
            _fail_all({(cell.key, entry.name)}, {cell.key: cell.coords}, store, reporter, report, unreached)
            continue
        members.append((cell, _cell_context(point, states[point.key], cell.checkpoint, shop, reporter)))
    if not members:
        return
    probe = shop.registry.probes[entry.probe].obj()
    contexts = [ctx for _, ctx in members]
    seeds = [derive_seed(ctx.cell_seed, entry.name) for ctx in contexts]
    started = time.perf_counter()
    try:
        results = _measure(entry, contexts, seeds, spec.cell_dims, lambda params: probe.run_batched(contexts, params))
    except KeyboardInterrupt:
        raise
    except Exception:  # a failure inside a batch is attributed cell by cell, unbatched
        for (cell, ctx), seed in zip(members, seeds):
            # afresh, as a run without batching: the batch may have drawn from the generator and warned
            _run_entry(probe, ctx, entry, cell.key, cell.coords, spec.cell_dims, seed, store, reporter, report)
        return
    seconds = (time.perf_counter() - started) / len(members)
    for (cell, ctx), result in zip(members, results):
        _record(entry, cell.key, cell.coords, result, None, ctx.warnings, seconds, store, reporter, report)


def _run_group(group: GroupPlan, spec, shop: Workshop, store: RunStore, reporter, report, states: dict):
    members = []
    for point, step in group.members:
        if point.key not in states:
            states[point.key] = _point_state(point, shop, store, reporter)
        state = states[point.key]
        unreached = state.unreached(step)
        if unreached:
            where = cell_label(point.coords)
            _fail_all({(group.key, group.entry.name)}, {group.key: group.coords}, store, reporter, report,
                      f"member {where}: {unreached}" if where else unreached)
            return
        members.append(Member({**point.coords, "checkpoint": step}, step,
                              lambda p=point, st=state, c=step: _cell_context(p, st, c, shop, reporter)))
    seed = derive_seed(spec.raw.get("seed", 0), group.key, group.entry.name)
    ctx = GroupContext(members, group.coords, group.spanned, device=shop.device, dtype=shop.dtype, seed=seed,
                       progress_factory=reporter.task)
    forbidden = [d for d in spec.cell_dims if d not in group.spanned]
    _run_entry(shop.registry.probes[group.entry.probe].obj(), ctx, group.entry, group.key, group.coords, forbidden,
               seed, store, reporter, report)


def _make_trajectory(point, shop, model, data, loss_fn, reporter, device, dtype) -> dict[int, torch.Tensor]:
    if point.source == "files":
        return shop.file_trajectory(point, model)
    if point.source == "init":
        return {0: flat_parameters(model)}
    generator = torch.Generator().manual_seed(derive_seed(point.config.seed, "train"))
    with reporter.task(point.config.train.steps, f"train {cell_label(point.coords) or point.key}") as bar:
        return train(model, data.to(device, dtype), loss_fn, point.config.train, generator, bar)
