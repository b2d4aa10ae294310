"""Executing a plan: build, train, probe every cell, write each result as soon as it exists."""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from basinprobe.registry import ProbeError, Registry, load_registry
from basinprobe.runtime.build import (BuildError, build_data, build_model, flat_parameters, load_checkpoint,
                                      resolve_device, resolve_dtype)
from basinprobe.runtime.context import CellContext, derive_seed
from basinprobe.runtime.plan import Plan, PointPlan, compile_plan
from basinprobe.runtime.progress import Reporter
from basinprobe.runtime.spec import RESERVED_DIMS, Problem, Spec, SpecError
from basinprobe.runtime.store import RunStore, cell_label
from basinprobe.runtime.train import TrainingDiverged, train
from basinprobe.runtime.yamlio import mark_of


@dataclass
class RunReport:
    store: str
    done: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
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
        """Build every point's data and model once before anything is written (bad input fails here)."""
        sizes = {}
        for point in plan.points:
            data = self.data(point)
            model = self.model(point)
            if point.source == "files":
                self.file_trajectory(point, model)
            self._check_shapes(point, model, data)
            sizes[point.key] = (sum(p.numel() for p in model.parameters()), len(data.X_train))
        return sizes

    def _check_shapes(self, point, model, data) -> None:
        x = data.X_train[:2].to(self.device, self.dtype)
        try:
            with torch.no_grad():
                out = model(x)
        except RuntimeError as exc:
            raise SpecError([Problem(mark_of(self.spec.document, ("model",)), ("model",),
                                     f"the model cannot take the data's inputs of shape "
                                     f"{tuple(data.X_train.shape[1:])}: {exc}")]) from None
        if data.task == "classification" and out.shape[-1] != data.n_classes:
            raise SpecError([Problem(mark_of(self.spec.document, ("model",)), ("model",),
                                     f"the model has {out.shape[-1]} outputs but the data has {data.n_classes} classes")])
        if data.task == "regression" and tuple(out.shape[1:]) != tuple(data.y_train.shape[1:]):
            raise SpecError([Problem(mark_of(self.spec.document, ("model",)), ("model",),
                                     f"the model's outputs have shape {tuple(out.shape[1:])} but the targets "
                                     f"{tuple(data.y_train.shape[1:])}")])


def check_result(result, entry_name: str, cell_dims: list[str]) -> xr.Dataset:
    """A probe's result must be a labelled Dataset with finite numbers and legal dims."""
    if not isinstance(result, xr.Dataset):
        raise ProbeError(f"probe entry {entry_name!r} returned {type(result).__name__}, not an xarray.Dataset")
    for dim in result.dims:
        if dim in RESERVED_DIMS:
            raise ProbeError(f"dim {dim!r} is a keyword of xarray's sel; the probe must rename it")
        if dim in cell_dims:
            raise ProbeError(f"dim {dim!r} collides with a cell dim of this spec")
    for name, var in result.data_vars.items():
        if var.dtype.kind in "fc" and "nan_means" not in var.attrs:
            values = np.asarray(var.values)
            if not np.isfinite(values).all():
                raise ProbeError(f"variable {name!r} holds NaN or inf; nothing was stored as a number")
    return result


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, ProbeError):
        return str(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_spec(spec: Spec, *, overwrite: bool = False, device: str | None = None,
             reporter: Reporter | None = None, registry: Registry | None = None) -> RunReport:
    registry = registry or load_registry()
    reporter = reporter or Reporter(quiet=True)
    plan = compile_plan(spec, registry)
    try:
        torch_device = resolve_device(device or spec.device)
    except BuildError as exc:
        raise SpecError([Problem(mark_of(spec.document, exc.path), exc.path, str(exc))]) from None
    dtype = resolve_dtype(spec.dtype)
    shop = Workshop(spec, registry, torch_device, dtype)
    shop.preflight(plan)

    store = RunStore(spec.output)
    store.open_for(spec, str(torch_device), spec.dtype, overwrite)
    status = store.status()
    report = RunReport(str(spec.output))
    entries_meta = {e.name: {"plugin": registry.probes[e.probe].plugin} for e in spec.probes}
    point_layouts = {p.key: {"coords": p.coords} for p in plan.points}
    todo = [(cell, entry) for cell in plan.cells for entry in cell.entries
            if status.get((cell.key, entry.name), {}).get("status") != "done"]
    report.skipped = sum(len(cell.entries) for cell in plan.cells) - len(todo)
    if report.skipped:
        reporter.note(f"resuming {spec.output}: {report.skipped} finished cell results kept, {len(todo)} to run")
    try:
        with reporter:
            reporter.start_cells(len(todo), f"{spec.name}")
            for point in plan.points:
                _run_point(point, spec, shop, store, status, reporter, report, torch_device, dtype)
    except KeyboardInterrupt:
        report.interrupted = True
        reporter.note("interrupted: finished cells are kept; run the same command again to resume")
    finally:
        store.assemble(spec, entries_meta, point_layouts)
    return report


def _run_point(point: PointPlan, spec, shop: Workshop, store: RunStore, status, reporter, report, device, dtype):
    pending = {(cell.key, entry.name) for cell in point.cells for entry in cell.entries
               if status.get((cell.key, entry.name), {}).get("status") != "done"}
    trajectory = store.read_trajectory(point.key, point.coords, dtype)
    if not pending and trajectory is not None:
        return
    data = shop.data(point)
    model = shop.model(point)
    loss_fn = shop.loss(point)
    layout = {"names": [n for n, _ in model.named_parameters()],
              "shapes": [list(p.shape) for _, p in model.named_parameters()]}
    if trajectory is None:
        try:
            trajectory = _make_trajectory(point, shop, model, data, loss_fn, reporter, device, dtype)
        except TrainingDiverged as exc:
            for cell in point.cells:
                for entry in cell.entries:
                    if (cell.key, entry.name) in pending:
                        store.write_cell(cell.key, entry.name, cell.coords, None, str(exc), [])
                        report.failures.append(f"{cell_label(cell.coords)} {entry.name}: {exc}")
                        reporter.cell_done(f"{cell_label(cell.coords)} {entry.name}", f"failed: {exc}")
            return
        store.write_point(point.key, point.coords, trajectory, layout)
    moved_data = data.to(device, dtype)
    for cell in point.cells:
        entries = [e for e in cell.entries if (cell.key, e.name) in pending]
        if not entries:
            continue
        cell_seed = derive_seed(point.config.seed, point.key, cell.checkpoint)
        ctx = CellContext(model, trajectory[cell.checkpoint], moved_data, loss_fn, device=device, dtype=dtype,
                          seed=cell_seed, cell=cell.coords, checkpoint=cell.checkpoint, trajectory=trajectory,
                          batch_size=point.config.data.batch_size, progress_factory=reporter.task)
        for entry in entries:
            label = f"{cell_label(cell.coords)} {entry.name}"
            ctx.begin_entry(derive_seed(cell_seed, entry.name))
            started = time.perf_counter()
            probe = shop.registry.probes[entry.probe].obj()
            try:
                result = check_result(probe.run(ctx, dict(entry.params)), entry.name, spec.cell_dims)
                error = None
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failing probe must not stop the other cells
                result, error = None, _describe_failure(exc)
            store.write_cell(cell.key, entry.name, cell.coords, result, error, ctx.warnings)
            if error:
                report.failures.append(f"{label}: {error}")
                reporter.cell_done(label, f"failed: {error}")
            else:
                report.done += 1
                reporter.cell_done(label, f"done in {time.perf_counter() - started:.2f}s")


def _make_trajectory(point, shop, model, data, loss_fn, reporter, device, dtype) -> dict[int, torch.Tensor]:
    if point.source == "files":
        return shop.file_trajectory(point, model)
    if point.source == "init":
        return {0: flat_parameters(model)}
    generator = torch.Generator().manual_seed(derive_seed(point.config.seed, "train"))
    with reporter.task(point.config.train.steps, f"train {cell_label(point.coords) or point.key}") as bar:
        return train(model, data.to(device, dtype), loss_fn, point.config.train, generator, bar)
