"""The Zarr store of a run: staging of finished cells, assembly into labelled groups.

Layout (see DESIGN.md):

- root attrs: ``basinprobe_version``, ``spec``, ``spec_sha256``, ``created``,
  ``torch_version``, ``device``, ``dtype``, ``cell_dims``, ``code_versions``.
- ``<entry>``: one group per probe entry; every variable's leading dims are
  the cell dims (sweep axes, then ``checkpoint``); attrs ``probe``,
  ``params``, ``plugin``, ``plugin_version``, ``warnings``, ``failed``.
- ``_checkpoints``: ``params(<sweep dims>, checkpoint, param)``, the flat
  parameters of every checkpoint.
- ``_status``: attrs recording every (cell, entry) that finished or failed.

While a run goes on, every finished cell is written at once to a staging
folder ``_cells/<cell>/<entry>`` (and every trained sweep point to
``_points/<point>``): its arrays in ``arrays.npz``, then its structure and a
completion mark in ``stage.json``, each moved into place by an atomic rename,
so that a killed run loses nothing finished. Staging uses plain files rather
than Zarr groups because a Zarr array costs milliseconds to create and a cell
holds dozens of small ones. At the end the staged cells are assembled into the
labelled groups, which are swapped in by directory rename (so a group is never
half-written), and the staging is removed.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import warnings
from importlib.metadata import version as _version
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr


STAGING_CELLS = "_cells"
STAGING_POINTS = "_points"
ASSEMBLING = "_assembling"
TRASH = "_trash"
STATUS = "_status"
CHECKPOINTS = "_checkpoints"
COMPLETE = "basinprobe_complete"
STAGE_META = "stage.json"
STAGE_ARRAYS = "arrays.npz"


class StoreMismatch(Exception):
    pass


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return ctx


def _objectify(ds: xr.Dataset) -> xr.Dataset:
    # Fixed-width numpy strings truncate silently in zarr; store strings as objects.
    for name, var in list(ds.variables.items()):
        if var.dtype.kind == "U" or var.dtype.kind == "T":
            ds = ds.assign_coords({name: var.astype(object)}) if name in ds.coords else ds.assign({name: var.astype(object)})
    return ds


def _to_zarr(ds: xr.Dataset, path: Path, group: str) -> None:
    ctx = _quiet()
    try:
        _objectify(ds).to_zarr(str(path), group=group, mode="w", consolidated=False, zarr_format=3)
    finally:
        ctx.__exit__(None, None, None)


def _open(path: Path, group: str) -> xr.Dataset:
    ctx = _quiet()
    try:
        return xr.open_zarr(str(path), group=group, consolidated=False, zarr_format=3, chunks=None).load()
    finally:
        ctx.__exit__(None, None, None)


def outlook(spec) -> str | None:
    """What ``run`` will make of what is already at the spec's output (for ``validate`` and
    ``plan``, which write nothing); None where nothing is there yet."""
    path = Path(spec.output)
    if not path.is_dir() or not any(path.iterdir()):
        return None
    store = RunStore(path)
    attrs = store.root_attrs() if store.exists() else {}
    if "spec_sha256" not in attrs:
        return f"{path} exists and is not a basinprobe store: run will refuse it; choose another output"
    if attrs["spec_sha256"] == spec.sha256:
        return f"{path} holds this spec's results: run resumes it, keeping every finished cell"
    if attrs.get("training_sha256") == spec.training_sha256 and "entries" in attrs:
        return f"{path} holds this spec's training with other probes: run amends it, training nothing again"
    return (f"{path} holds results of a different spec: run will refuse it (exit 2); pass --overwrite to "
            "replace it, or choose another output")


class RunStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    # --- root ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def root(self, mode="a"):
        return zarr.open_group(str(self.path), mode=mode, zarr_format=3)

    def root_attrs(self) -> dict:
        return dict(self.root("r").attrs) if self.exists() else {}

    def open_for(self, spec, device: str, dtype: str, overwrite: bool, versions: dict[str, str] | None = None,
                 entries: dict[str, str] | None = None) -> str | None:
        """Create the store for ``spec``, or check that an existing one was made by the same spec
        and the same ``versions`` of the code (see :func:`plan.code_versions`). A store of a spec
        that differs only in its probe entries is amended: ``entries`` (name -> what the entry
        computes) tells which to keep; the others' results are dropped. Returns what was amended."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreMismatch(f"output {self.path} is an existing file, not a Zarr store")
        versions, entries = versions or {}, entries or {}
        amended = None
        if self.exists():
            attrs = self.root_attrs()
            if "spec_sha256" not in attrs:
                raise StoreMismatch(f"{self.path} is a Zarr store that basinprobe did not write; choose another "
                                    "output (--overwrite replaces only basinprobe's own stores)")
            amendable = (attrs.get("spec_sha256") != spec.sha256 and "entries" in attrs
                         and attrs.get("training_sha256") == spec.training_sha256)
            if (attrs.get("spec_sha256") == spec.sha256 or amendable) and not overwrite:
                # versions first: a store that cannot be resumed is left exactly as it was
                changed = {name: (before, versions[name]) for name, before in attrs.get("code_versions", {}).items()
                           if name in versions and versions[name] != before}
                if changed:
                    listed = ", ".join(f"{name} {before} (installed: {now})" for name, (before, now) in changed.items())
                    pins = " ".join(f"{name}=={before}" for name, (before, _) in changed.items())
                    raise StoreMismatch(
                        f"{self.path} holds results computed with {listed}; resuming would mix two versions' "
                        f"results in one store. Pass --overwrite to recompute it all with the installed versions, "
                        f"choose another output, or install {pins} to resume")
                self._recover_swaps()
                if amendable:
                    amended = self._amend(spec, attrs["entries"], entries)
                    # the versions of what the store now holds: the entries kept were computed with
                    # these (checked above), a dropped entry's plugin no longer counts
                    self.root().attrs["code_versions"] = dict(versions)
                return amended
            if not overwrite:
                raise StoreMismatch(
                    f"{self.path} holds results of a different spec (spec_sha256 {attrs.get('spec_sha256', '?')[:12]}, "
                    f"this spec {spec.sha256[:12]}); pass --overwrite to replace it or choose another output"
                )
        if self.path.exists() and (overwrite or any(self.path.iterdir())):
            if not self.exists() and any(self.path.iterdir()):
                raise StoreMismatch(f"{self.path} exists and is not a basinprobe store; choose another output")
            shutil.rmtree(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        except OSError as exc:
            raise StoreMismatch(f"cannot create the output {self.path}: {exc.strerror or exc}; "
                                "choose another path") from None
        root.attrs.update({
            "basinprobe_version": _version("basinprobe"),
            "spec": spec.text,
            "spec_sha256": spec.sha256,
            "spec_name": spec.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "xarray_version": xr.__version__,
            "zarr_version": zarr.__version__,
            "device": device,
            "dtype": dtype,
            "cell_dims": spec.cell_dims,
            "code_versions": dict(versions),
            "training_sha256": spec.training_sha256,
            "entries": dict(entries),
        })
        return None

    def _amend(self, spec, before: dict[str, str], now: dict[str, str]) -> str:
        """Make the store one of ``spec``, which trains as the store's spec did and differs in
        its probe entries: drop the results of entries it changes or leaves out, keep the rest."""
        stale = sorted(name for name in before if now.get(name) != before[name])
        # the record first, then the files: a run killed in between leaves a store of the new spec
        # whose changed groups are recomputed by the next run (a dropped entry's folder may stay
        # behind), never one whose record claims results it has lost
        ctx = _quiet()
        try:
            root = self.root()
            if STATUS in root:
                cells = dict(root[STATUS].attrs.get("cells", {}))
                root[STATUS].attrs["cells"] = {key: record for key, record in cells.items()
                                               if key.split("/", 1)[1] not in stale}
            root.attrs.update({"spec": spec.text, "spec_sha256": spec.sha256, "spec_name": spec.name,
                               "entries": dict(now), "cell_dims": spec.cell_dims})
        finally:
            ctx.__exit__(None, None, None)
        for name in stale:
            shutil.rmtree(self.path / name, ignore_errors=True)
            for staged in (self.path / STAGING_CELLS).glob(f"*/{name}"):
                shutil.rmtree(staged, ignore_errors=True)
        changed = [name for name in stale if name in now]
        dropped = [name for name in stale if name not in now]
        added = sorted(name for name in now if name not in before)
        kept = sorted(name for name in now if before.get(name) == now[name])
        parts = [f"kept {', '.join(kept) or 'no entry'}"]
        parts += [f"recomputing {', '.join(changed)} (changed)"] if changed else []
        parts += [f"adding {', '.join(added)}"] if added else []
        parts += [f"dropping {', '.join(dropped)} (no longer in the spec)"] if dropped else []
        return f"{self.path}: the spec's probes changed and its training did not: " + "; ".join(parts)

    # --- staging -------------------------------------------------------------------------------
    def _staged_status(self, cells: list[str] | None = None) -> dict[tuple[str, str], dict]:
        status = {}
        base = self.path / STAGING_CELLS
        if not base.is_dir():
            return status
        found = base.glob(f"*/*/{STAGE_META}") if cells is None else (
            meta for cell in cells for meta in (base / cell).glob(f"*/{STAGE_META}"))
        for meta in found:
            record = json.loads(meta.read_text())
            status[(meta.parent.parent.name, meta.parent.name)] = {
                "status": record["status"], "error": record.get("error"), "coords": record["coords"],
                "warnings": record.get("warnings", []), "staged": True,
                **({"traceback": record["traceback"]} if record.get("traceback") else {}),
                **({"probe_attrs": record["probe_attrs"]} if record.get("probe_attrs") else {}),
                **({"seconds": record["seconds"]} if "seconds" in record else {}),
            }
        return status

    def status(self, cells: list[str] | None = None) -> dict[tuple[str, str], dict]:
        """Every (cell, entry) that finished or failed, staged ones over assembled ones; with
        ``cells``, those cells' only (a dask task asks for its points' cells: reading every
        staged cell in each of a sweep's thousands of tasks was quadratic)."""
        recorded = {}
        if (self.path / STATUS / "zarr.json").is_file():
            wanted = None if cells is None else set(cells)
            for key, value in self.root("r")[STATUS].attrs.get("cells", {}).items():
                cell, entry = key.split("/", 1)
                if wanted is None or cell in wanted:
                    recorded[(cell, entry)] = {**value, "staged": False}
        recorded.update(self._staged_status(cells))
        return recorded

    def write_cell(self, cell_key: str, entry: str, coords: dict, result: xr.Dataset | None,
                   error: str | None, warnings_: list[str], trace: str | None = None,
                   seconds: float | None = None) -> None:
        """Stage a cell's result, or its failure (``error``, and the ``trace`` back to where it
        was raised), with the ``seconds`` it took; the last two are kept in ``_status``."""
        ds = result if result is not None else xr.Dataset()
        _stage(self.path / STAGING_CELLS / cell_key / entry, ds, {
            "coords": _jsonable(coords), "status": "failed" if error else "done", "error": error,
            "warnings": list(warnings_), "probe_attrs": _jsonable(ds.attrs),
            **({"traceback": trace} if trace else {}),
            **({"seconds": round(seconds, 4)} if seconds is not None else {})})

    def read_staged_cell(self, cell_key: str, entry: str) -> tuple[xr.Dataset, dict]:
        ds, record = _read_stage(self.path / STAGING_CELLS / cell_key / entry)
        return ds, record["probe_attrs"]

    def write_point(self, point_key: str, coords: dict, trajectory: dict[int, torch.Tensor], layout: dict) -> None:
        steps = sorted(trajectory)
        params = torch.stack([trajectory[s].detach().cpu().double() for s in steps]).numpy()
        ds = xr.Dataset({"params": (("checkpoint", "param"), params)}, coords={"checkpoint": steps})
        _stage(self.path / STAGING_POINTS / point_key, ds, {"coords": _jsonable(coords), "layout": layout})

    def point_layout(self, point_key: str, coords: dict) -> dict:
        """What was recorded with a sweep point's checkpoints (names, shapes, files, and why its
        training stopped early), from staging or the assembled group; {} if nothing."""
        staged = self.path / STAGING_POINTS / point_key / STAGE_META
        if staged.is_file():
            return json.loads(staged.read_text()).get("layout", {})
        if (self.path / CHECKPOINTS / "zarr.json").is_file():
            layouts = self.root("r")[CHECKPOINTS].attrs.get("layouts", "{}")
            return json.loads(layouts).get(cell_label(coords), {})
        return {}

    def read_trajectory(self, point_key: str, coords: dict, dtype: torch.dtype) -> dict[int, torch.Tensor] | None:
        """The stored checkpoints of a sweep point, from staging or the assembled group."""
        if (self.path / STAGING_POINTS / point_key / STAGE_META).is_file():
            ds, _ = _read_stage(self.path / STAGING_POINTS / point_key)
            n = None
        elif (self.path / CHECKPOINTS / "zarr.json").is_file():
            full = _open(self.path, CHECKPOINTS)
            sel = {dim: value for dim, value in coords.items() if dim in full.dims}
            try:
                ds = full.sel(sel) if sel else full
            except KeyError:
                return None
            n = int(ds["n_params"].values)
            if n <= 0:
                return None
        else:
            return None
        params = ds["params"].values
        if n is not None:
            params = params[:, :n]
        # a row all NaN is a checkpoint this point never reached (its training diverged before
        # it, or other points have more checkpoints); a row partly non-finite is not a checkpoint
        rows = {int(s): torch.from_numpy(np.ascontiguousarray(params[i])).to(dtype)
                for i, s in enumerate(ds["checkpoint"].values) if not np.isnan(params[i]).all()}
        if not rows or any(not torch.isfinite(v).all() for v in rows.values()):
            return None
        return rows

    # --- assembly ---------------------------------------------------------------------------------
    def _recover_swaps(self) -> None:
        trash = self.path / TRASH
        if not trash.is_dir():
            return
        for old in trash.iterdir():
            target = self.path / old.name
            if target.exists():
                shutil.rmtree(old)
            else:
                old.rename(target)
        shutil.rmtree(trash, ignore_errors=True)

    def _swap_in(self, name: str, ds: xr.Dataset) -> None:
        staging = f"{ASSEMBLING}/{name}"
        _to_zarr(ds, self.path, staging)
        target, trash = self.path / name, self.path / TRASH
        if target.exists():
            trash.mkdir(exist_ok=True)
            target.rename(trash / name)
        (self.path / staging).rename(target)
        shutil.rmtree(trash, ignore_errors=True)

    def assemble(self, spec, entries_meta: dict[str, dict], point_layouts: dict[str, dict]) -> None:
        """Build every labelled group from staged and previously assembled cells; then clean up."""
        status = self.status()
        dims = spec.cell_dims
        order = {axis.dim: list(axis.labels) for axis in spec.sweep}
        staged = {name for (_, name), record in status.items() if record["staged"]}
        for entry in spec.probes:
            assembled = self.path / entry.name / "zarr.json"
            if entry.name not in staged and assembled.is_file():
                continue   # nothing new for this entry since its group was assembled
            # the group as assembled before, read once (a finished sweep of 2,000 cells took 50 s
            # to rerun when each of its cells opened the group again)
            previous, carried = _without_gap_notes(_open(self.path, entry.name).load() if assembled.is_file() else None)
            pieces, failed, warns, probe_attrs, failed_coords = [], [], [], [], []
            for (cell, name), record in sorted(status.items()):
                if name != entry.name:
                    continue
                label = cell_label(record["coords"])
                warns += [f"{label}: {w}" for w in record.get("warnings", [])]
                if record["status"] != "done":
                    failed.append(f"{label}: {record.get('error')}")
                    failed_coords.append(record["coords"])
                    continue
                if record["staged"]:
                    ds, _ = self.read_staged_cell(cell, name)
                else:
                    ds = _assembled_cell(previous, record["coords"])
                    if ds is None:
                        continue
                # a cell's own attrs are kept in its status record: a group assembled before
                # holds only their merge, from which a resumed run could not take them apart
                probe_attrs.append(record.get("probe_attrs", {}))
                pieces.append((ds, record["coords"]))
            group = _explain_gaps(_combine(pieces, dims, order, failed_coords), pieces, failed_coords, carried)
            meta = entries_meta[entry.name]
            group.attrs = {
                "probe": entry.probe, "params": _jsonable(entry.fixed_params()), "plugin": meta["plugin"],
                **({"sweep": _jsonable({axis.path: list(axis.values) for axis in entry.sweep})} if entry.sweep else {}),
                "plugin_version": meta.get("plugin_version"),
                "at": entry.at if isinstance(entry.at, str) else list(entry.at),
                "warnings": warns, "failed": failed, **_merge_attrs(probe_attrs, meta.get("attrs", {})),
            }
            self._swap_in(entry.name, group)
        self._assemble_checkpoints(spec, point_layouts)
        cells = {f"{cell}/{entry}": {k: v for k, v in record.items() if k != "staged"}
                 for (cell, entry), record in status.items()}
        ctx = _quiet()
        try:
            status_group = self.root()
            grp = status_group.require_group(STATUS)
            grp.attrs.update({"cells": cells})
        finally:
            ctx.__exit__(None, None, None)
        for staging in (STAGING_CELLS, STAGING_POINTS, ASSEMBLING):
            shutil.rmtree(self.path / staging, ignore_errors=True)
        ctx = _quiet()
        try:
            zarr.consolidate_metadata(str(self.path))
        finally:
            ctx.__exit__(None, None, None)

    def _assemble_checkpoints(self, spec, point_layouts: dict[str, dict]) -> None:
        sweep_dims = [axis.dim for axis in spec.sweep]
        pieces, layouts = [], {}
        base = self.path / STAGING_POINTS
        staged = {p.parent.name for p in base.glob(f"*/{STAGE_META}")}
        assembled = (self.path / CHECKPOINTS / "zarr.json").is_file()
        if assembled and not staged:
            return   # no new training run since the group was assembled
        previous = _open(self.path, CHECKPOINTS).load() if assembled else None
        layouts_before = json.loads(previous.attrs.get("layouts", "{}")) if previous is not None else {}
        for point_key, info in point_layouts.items():
            coords = info["coords"]
            if point_key in staged:
                ds, record = _read_stage(base / point_key)
                layout = record["layout"]
            elif previous is not None:
                try:
                    ds = previous.sel(coords) if coords else previous
                except KeyError:
                    continue
                n = int(ds["n_params"].values)
                ds = ds[["params"]].isel(param=slice(0, n)).drop_vars(list(coords), errors="ignore")
                layout = layouts_before.get(cell_label(coords), {})
            else:
                continue
            ds = ds.assign(n_params=xr.DataArray(ds.sizes["param"]))
            layouts[cell_label(coords)] = layout
            pieces.append((ds, coords))
        if not pieces:
            return
        order = {axis.dim: list(axis.labels) for axis in spec.sweep}
        group = _combine(pieces, sweep_dims, order)
        group["n_params"] = group["n_params"].fillna(0).astype(np.int64)
        group["params"].attrs.update(description="flat parameter vector at each checkpoint (NaN-padded where "
                                                 "sweep points have fewer parameters)")
        group["n_params"].attrs.update(description="number of parameters of the sweep point's model "
                                                   "(0: not trained yet)")
        group.attrs = {"layouts": json.dumps(layouts)}
        self._swap_in(CHECKPOINTS, group)


def _assembled_cell(group: xr.Dataset | None, coords: dict) -> xr.Dataset | None:
    """A cell's results out of its group as assembled before (None if it is not there)."""
    if group is None:
        return None
    try:
        return group.sel(coords).drop_vars(list(coords), errors="ignore")
    except KeyError:
        return None


# Why a variable of an assembled group holds NaN that no cell stored: said in its ``nan_means``
# after the probe's own reasons, because NaN must never go unexplained.
FAILED_CELL = "the cell failed (the group's `failed` attr says why)"
NOT_STORED = "the cell (or this point of the entry's own sweep) did not store this variable"
PADDED = ("padding: other cells, or other points of the entry's own sweep, have more entries along this "
          "variable's own dims (e.g. a sweep over widths, or over top_k)")
GAP_NOTES = (FAILED_CELL, NOT_STORED, PADDED)
OR = "; or "


def _explain_gaps(group: xr.Dataset, cells: list[tuple[xr.Dataset, dict]], failed: list[dict],
                  carried: dict[str, set]) -> xr.Dataset:
    """Add to each variable's ``nan_means`` why it holds NaN beyond what its cells stored: a
    failed cell, a cell without the variable, or padding; ``carried``: the reasons a group
    assembled before gave (its cells keep their padding when they are read back)."""
    for name in group.data_vars:
        var = group.variables[name]
        if var.dtype.kind not in "fc":
            continue
        reasons = set(carried.get(name, ()))
        missing = int(np.isnan(var.values).sum())
        # the cells' own NaN are counted only where the group has some (numpy, not xarray: this
        # runs for every variable of every cell of a sweep of thousands)
        stored = [ds.variables[name] for ds, _ in cells if name in ds.data_vars] if missing else []
        if missing and missing > sum(int(np.isnan(v.values).sum()) for v in stored):
            if failed:
                reasons.add(FAILED_CELL)
            if len(stored) < len(cells):
                reasons.add(NOT_STORED)
            if len({v.shape for v in stored}) > 1 or not reasons:
                reasons.add(PADDED)
        # a cell of an entry with its own sweep may bring a note already (padding across its runs)
        parts = var.attrs["nan_means"].split(OR) if var.attrs.get("nan_means") else []
        reasons |= {part for part in parts if part in GAP_NOTES}
        if reasons:
            own = [part for part in parts if part not in GAP_NOTES]
            var.attrs["nan_means"] = OR.join(own + [note for note in GAP_NOTES if note in reasons])
    return group


def _without_gap_notes(group: xr.Dataset | None) -> tuple[xr.Dataset | None, dict[str, set]]:
    """A group assembled before, with the notes :func:`_explain_gaps` added taken out of its
    ``nan_means`` (so that its cells compare equal to fresh ones), and which notes each had."""
    carried = {}
    if group is None:
        return None, carried
    for name in group.data_vars:
        var = group.variables[name]
        parts = var.attrs.get("nan_means", "").split(OR) if var.attrs.get("nan_means") else []
        notes = {part for part in parts if part in GAP_NOTES}
        if not notes:
            continue
        carried[name] = notes - {FAILED_CELL}   # a failed cell is not read back: it is retried or failed again
        own = [part for part in parts if part not in GAP_NOTES]
        if own:
            var.attrs["nan_means"] = OR.join(own)
        else:
            del var.attrs["nan_means"]
    return group, carried


def cell_label(coords: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in coords.items())


def _stage(folder: Path, ds: xr.Dataset, record: dict) -> None:
    """Stage a Dataset as ``arrays.npz`` and ``stage.json`` (its structure, ``record`` and the
    completion mark). The JSON goes last: a writer killed before it leaves no finished stage."""
    shutil.rmtree(folder, ignore_errors=True)  # a half-written attempt of a killed run
    folder.mkdir(parents=True)
    arrays, variables = {}, {}
    for index, (name, var) in enumerate(ds.variables.items()):
        described = {"dims": list(var.dims), "attrs": _jsonable(var.attrs), "coord": name in ds.coords}
        if var.dtype.kind in "UOT":  # strings go into the JSON (npz would pickle them)
            described["strings"] = var.values.tolist()
        else:
            described["array"] = key = f"a{index}"
            arrays[key] = var.values
        variables[str(name)] = described
    _replace_with(folder / STAGE_ARRAYS, lambda f: np.savez(f, **arrays))
    _replace_with(folder / STAGE_META, lambda f: f.write(json.dumps(
        {**record, "variables": variables, COMPLETE: True}).encode()))


def _read_stage(folder: Path) -> tuple[xr.Dataset, dict]:
    record = json.loads((folder / STAGE_META).read_text())
    data, coords = {}, {}
    with np.load(folder / STAGE_ARRAYS, allow_pickle=False) as arrays:
        for name, described in record.pop("variables").items():
            values = (np.array(described["strings"], dtype=object) if "strings" in described
                      else arrays[described["array"]])
            (coords if described["coord"] else data)[name] = (described["dims"], values, described["attrs"])
    return xr.Dataset(data, coords=coords), record


def _replace_with(path: Path, write) -> None:
    """Write a file under a temporary name, then rename it into place (atomic on POSIX)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    partial.replace(path)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _with_cell_coords(ds: xr.Dataset, coords: dict, dims: list[str]) -> xr.Dataset:
    expand = {dim: [coords[dim]] for dim in dims if dim in coords}
    return ds.expand_dims(expand)


def _combine(cells: list[tuple[xr.Dataset, dict]], dims: list[str], order: dict,
             failed: list[dict] = ()) -> xr.Dataset:
    """One Dataset of the cells' results (each with the coordinates of its cell), labelled along
    ``dims``: sweep dims in ``order``, checkpoints ascending, NaN where a cell is missing. The
    coordinates of ``failed`` cells keep their place (as NaN), so that a group whose every cell
    at some coordinate failed keeps the shape of its neighbours."""
    if not cells:   # every cell failed: the group still has their coordinates
        present = [d for d in dims if any(d in coords for coords in failed)]
        labels = {d: {coords[d] for coords in failed if d in coords} for d in present}
        return xr.Dataset(coords={d: [v for v in order[d] if v in labels[d]] if d in order else sorted(labels[d])
                                  for d in present})
    aligned = _combine_alike(cells, dims, order, failed)
    if aligned is not None:
        return aligned
    # Dims without coordinates get integer positions, so that cells whose probe dims differ in
    # size (a sweep over widths) are aligned by position and padded with NaN.
    pieces = [_with_cell_coords(ds, coords, dims) for ds, coords in cells]
    pieces = [p.assign_coords({d: np.arange(n) for d, n in p.sizes.items() if d not in p.coords}) for p in pieces]
    ctx = _quiet()
    try:
        combined = xr.merge(pieces, join="outer", compat="no_conflicts", combine_attrs="drop_conflicts")
    finally:
        ctx.__exit__(None, None, None)
    for dim in [d for d in dims if d in combined.dims]:
        seen = set(combined[dim].values.tolist()) | {coords[dim] for coords in failed if dim in coords}
        labels = [v for v in order[dim] if v in seen] if dim in order else sorted(seen)
        combined = combined.reindex({dim: labels})
    # the probe's own labels in the order the probe gave them (merge sorts them: test before train)
    for dim in [d for d in combined.dims if d not in dims and d in combined.coords]:
        first_seen = list(dict.fromkeys(label for piece in pieces if dim in piece.coords
                                        for label in piece[dim].values.tolist()))
        if len(first_seen) == combined.sizes[dim]:
            combined = combined.reindex({dim: first_seen})
    if "checkpoint" in combined.dims:   # also a probe dim (of _checkpoints), which merge may leave unsorted
        combined = combined.sortby("checkpoint")
    # merge's outer join makes every integer variable float to hold NaN; where none is needed
    # (every cell present, its shape the same in all), the count stays an integer
    for name in combined.data_vars:
        kinds = {ds.variables[name].dtype for ds, _ in cells if name in ds.data_vars}
        if len(kinds) == 1 and next(iter(kinds)).kind in "iub" and combined[name].dtype.kind == "f":
            values = combined[name].values
            if not np.isnan(values).any():
                combined[name] = combined[name].astype(next(iter(kinds)))
    lead = [d for d in dims if d in combined.dims]
    return combined.transpose(*lead, ...)


def _combine_alike(cells: list[tuple[xr.Dataset, dict]], dims: list[str], order: dict,
                   failed: list[dict] = ()) -> xr.Dataset | None:
    """:func:`_combine`'s result, built by writing each cell's arrays into place, when every cell
    has the same variables with the same dims, shapes, dtypes and attrs and the same probe
    coordinates (the usual case); None otherwise, for ``xr.merge`` to align them. Aligning costs
    ~4-5 ms a cell, which made assembling a sweep of thousands of cells take minutes."""
    first, first_coords = cells[0]
    cell_dims = [d for d in dims if d in first_coords]
    if not cell_dims or any(d in first.dims for d in cell_dims):
        return None
    names = list(first.data_vars)
    template = {name: first.variables[name] for name in names}
    shared = {name: first.variables[name] for name in first.coords}
    for ds, coords in cells[1:]:
        if [d for d in dims if d in coords] != cell_dims or list(ds.data_vars) != names or set(ds.coords) != set(shared):
            return None
        for name, var in template.items():
            other = ds.variables[name]
            if other.dims != var.dims or other.shape != var.shape or other.dtype != var.dtype:
                return None
            if _jsonable(other.attrs) != _jsonable(var.attrs):
                return None
        if any(not ds.variables[name].identical(var) for name, var in shared.items()):
            return None
    labels = {}
    for dim in cell_dims:
        seen = {coords[dim] for _, coords in cells} | {coords[dim] for coords in failed if dim in coords}
        labels[dim] = [v for v in order[dim] if v in seen] if dim in order else sorted(seen)
    position = {dim: {label: i for i, label in enumerate(values)} for dim, values in labels.items()}
    placed = [(tuple(position[d].get(coords[d]) for d in cell_dims), ds) for ds, coords in cells]
    placed = [(index, ds) for index, ds in placed if None not in index]
    grid = tuple(len(labels[d]) for d in cell_dims)
    complete = len({index for index, _ in placed}) == int(np.prod(grid))
    data = {}
    for name, var in template.items():
        if not complete and var.dtype.kind not in "fc":
            return None   # a missing cell needs NaN, which xr.merge would get by promoting the dtype
        values = np.empty(grid + var.shape, dtype=var.dtype) if complete else np.full(grid + var.shape, np.nan, var.dtype)
        for index, ds in placed:
            values[index] = ds.variables[name].values
        data[name] = (tuple(cell_dims) + var.dims, values, var.attrs)
    coords = {dim: np.asarray(values) for dim, values in labels.items()}
    coords.update({name: var for name, var in shared.items()})
    coords.update({d: np.arange(n) for d, n in first.sizes.items() if d not in first.coords})
    combined = xr.Dataset(data, coords=coords)
    # a group-scoped probe's variables may carry a sweep dim of their own: lead with every cell dim
    return combined.transpose(*[d for d in dims if d in combined.dims], ...)


def _merge_attrs(per_cell: list[dict], fixed: dict, labels: list[str] | None = None) -> dict:
    """Attrs of several results as one: a key's value where all agree, else what varies (by
    cell; or, given the results' ``labels``, each value with its label)."""
    merged = dict(fixed)
    keys = {k for attrs in per_cell for k in attrs}
    for key in sorted(keys):
        values = [json.dumps(a.get(key), sort_keys=True) for a in per_cell]
        if len(set(values)) == 1:
            merged[key] = per_cell[0][key]
        elif labels is not None:   # each value under its label, e.g. {"top_k=2": 48, "top_k=4": 50}
            merged[key] = {label: a.get(key) for label, a in zip(labels, per_cell)}
        else:
            merged[key] = "varies by cell: " + "; ".join(sorted(set(values)))[:2000]
    return merged


def combine_runs(runs: list[tuple[xr.Dataset, dict]], axes: dict[str, list]) -> xr.Dataset:
    """One cell's results of an entry with its own sweep: each run's Dataset with its coordinates
    (dim -> label), labelled along ``axes`` (dim -> labels in order); NaN where runs differ in
    size along the probe's dims, said in ``nan_means``; attrs merged, naming what varies."""
    combined = _explain_gaps(_combine(runs, list(axes), axes), runs, [], {})
    combined.attrs = _merge_attrs([ds.attrs for ds, _ in runs], {}, [cell_label(coords) for _, coords in runs])
    return combined
