"""Reading a store back: the DataTree, selections, tables and plots."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import xarray as xr


class ResultsError(Exception):
    pass


def open_results(path: str | Path) -> xr.DataTree:
    """The store at ``path`` as an ``xarray.DataTree`` (one node per probe entry)."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise ResultsError(f"{path} is not a basinprobe store (no zarr.json); run a spec first")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*onsolidated.*")
        return xr.open_datatree(str(path), engine="zarr")


def _coerce(value: str, coord: xr.DataArray):
    kind = coord.dtype.kind
    try:
        if kind in "iu":
            return int(value)
        if kind == "f":
            return float(value)
        if kind == "b":
            return value.lower() in ("1", "true", "yes")
    except ValueError:
        raise ResultsError(f"{value!r} is not a valid value for {coord.name!r} ({coord.dtype})") from None
    return value


def select(tree: xr.DataTree, target: str, sel: list[str]) -> xr.DataArray | xr.Dataset:
    """``GROUP`` or ``GROUP/VAR``, narrowed by ``dim=value`` selections."""
    group, _, var = target.partition("/")
    if group not in tree.children:
        groups = ", ".join(k for k in tree.children if not k.startswith("_")) or "none"
        raise ResultsError(f"no group {group!r} in the store (groups: {groups})")
    ds = tree[group].to_dataset()
    failed = tree[group].attrs.get("failed") or []
    if not ds.data_vars and failed:
        raise ResultsError(f"group {group!r} holds no results: its {len(failed)} cell(s) failed, e.g. {failed[0]} "
                           f"(`basinprobe query STORE` lists them all)")
    obj = ds
    if var:
        if var not in ds.variables:
            raise ResultsError(f"no variable {var!r} in group {group!r} (variables: {', '.join(ds.data_vars)})")
        obj = ds[var]
    for item in sel:
        dim, eq, value = item.partition("=")
        if not eq:
            raise ResultsError(f"--sel takes dim=value, not {item!r}")
        if dim not in obj.dims:
            raise ResultsError(f"{dim!r} is not a dim of {target} (dims: {', '.join(map(str, obj.dims))})")
        coord = obj[dim]
        wanted = _coerce(value, coord)
        if wanted not in set(coord.values.tolist()):
            raise ResultsError(f"{dim}={value} is not in the store ({dim} has {coord.values.tolist()})")
        obj = obj.sel({dim: wanted})
    return obj


def describe_tree(tree: xr.DataTree) -> str:
    lines = [f"store: {tree.attrs.get('spec_name', '')}  (basinprobe {tree.attrs.get('basinprobe_version', '?')}, "
             f"device {tree.attrs.get('device', '?')}, dtype {tree.attrs.get('dtype', '?')})"]
    for name, node in tree.children.items():
        if name == "_status":
            continue
        ds = node.to_dataset()
        sizes = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
        probe = node.attrs.get("probe", "")
        lines.append(f"{name}/" + (f"  [{probe}]" if probe else "") + (f"  ({sizes})" if sizes else ""))
        for var_name, var in ds.data_vars.items():
            desc = var.attrs.get("description", "")
            lines.append(f"  {var_name}({', '.join(map(str, var.dims))})  {var.dtype}" + (f"  - {desc}" if desc else ""))
        for failed in node.attrs.get("failed", []) or []:
            lines.append(f"  FAILED {failed}")
        for warning in node.attrs.get("warnings", []) or []:
            lines.append(f"  WARNING {warning}")
    return "\n".join(lines)


def format_values(obj, fmt: str) -> str:
    """A variable (or a whole group) as a table, CSV or JSON records, one row per coordinate combination."""
    import pandas as pd

    ds = obj.to_dataset(name=obj.name or "value") if isinstance(obj, xr.DataArray) else obj
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims])
    if ds.dims:
        # columns in the store's order (cell dims, then the probe's), not alphabetical
        order = list(dict.fromkeys(d for var in ds.data_vars.values() for d in var.dims))
        order += [d for d in ds.dims if d not in order]
        frame = ds.to_dataframe(dim_order=order).reset_index()
    else:
        frame = pd.DataFrame({name: [var.values.item()] for name, var in ds.data_vars.items()})
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps(json.loads(frame.to_json(orient="records")), indent=1)
    return frame.to_string(index=False)


def export_checkpoints(tree: xr.DataTree, out: str | Path, sel: list[str]) -> list[Path]:
    """Every stored checkpoint as a ``state_dict`` file, ``OUT/<sweep point>/step_<checkpoint>.pt``,
    which a spec's ``model.checkpoints`` loads: a study's trained models reused by another spec.
    ``sel`` (``dim=value``) narrows the sweep points. Parameters only: a model with buffers
    (batch-norm statistics) cannot be rebuilt from them."""
    import re

    import torch

    if "_checkpoints" not in tree.children:
        raise ResultsError("the store holds no checkpoints (its run wrote no `_checkpoints` group)")
    group = select(tree, "_checkpoints", sel)
    layouts = json.loads(tree["_checkpoints"].attrs.get("layouts", "{}"))
    sweep_dims = [d for d in tree.attrs.get("cell_dims", []) if d != "checkpoint"]
    free = [d for d in sweep_dims if d in group["params"].dims]   # the others were selected
    written = []
    for values in itertools.product(*(group[d].values.tolist() for d in free)):
        point = group.sel(dict(zip(free, values)))
        coords = {d: point[d].item() for d in sweep_dims}
        label = ",".join(f"{k}={v}" for k, v in coords.items())
        layout = layouts.get(label, {})
        n = int(point["n_params"])
        if not n or not layout.get("names"):
            continue   # a point that was never trained
        # a folder name a glob reads literally: no brackets, commas or spaces
        folder = Path(out) / (re.sub(r"[^A-Za-z0-9=._-]+", "_", label.replace(",", "__")) or "model")
        folder.mkdir(parents=True, exist_ok=True)
        for step in point["checkpoint"].values:
            flat = point["params"].sel(checkpoint=step).values[:n]
            if np.isnan(flat).all():
                continue   # a checkpoint this point never reached
            tensors, offset = {}, 0
            for name, shape in zip(layout["names"], layout["shapes"]):
                size = int(np.prod(shape)) if shape else 1
                tensors[name] = torch.from_numpy(flat[offset:offset + size].copy()).reshape(shape)
                offset += size
            path = folder / f"step_{int(step)}.pt"
            torch.save(tensors, path)
            written.append(path)
    return written


def plot(obj: xr.DataArray, out: str | Path, stderr: xr.DataArray | None = None) -> Path:
    """A 1-D variable as lines (other dims as separate lines or facets), a 2-D one as a heatmap;
    with ``stderr`` (its standard error, alike in dims), error bars on the lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ResultsError("plotting needs matplotlib: pip install 'basinprobe[plot]'") from None
    if not isinstance(obj, xr.DataArray):
        raise ResultsError("plot takes GROUP/VAR, a single variable")
    obj = obj.squeeze(drop=True)
    if stderr is not None:
        stderr = stderr.squeeze(drop=True).transpose(*obj.dims)
    text_ticks = {}
    for dim in obj.dims:
        # dims without coordinates plot against their index; text coordinates (align method,
        # a swept list such as "[64]") against their position, labelled with the text
        if dim not in obj.coords:
            obj = obj.assign_coords({dim: np.arange(obj.sizes[dim])})
        elif obj[dim].dtype.kind not in "iufb":
            text_ticks[dim] = [str(v) for v in obj[dim].values]
            obj = obj.assign_coords({dim: np.arange(obj.sizes[dim])})
        if stderr is not None:
            stderr = stderr.assign_coords({dim: obj[dim].values})
    dims = list(obj.dims)
    title = f"{obj.name}" + (f"  [{obj.attrs['description']}]" if obj.attrs.get("description") else "")
    if len(dims) == 0:
        raise ResultsError(f"{obj.name} is a single number ({obj.values.item()}); nothing to plot")
    def spans_decades(dim):   # a sweep of gamma or lr over decades reads on a log axis
        values = np.asarray(obj[dim].values, dtype=float)
        return dim not in text_ticks and values.size >= 2 and values.min() > 0 and values.max() / values.min() >= 100

    if len(dims) == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        obj.plot.line(ax=ax, marker="o")
        if stderr is not None:
            ax.errorbar(obj[dims[0]].values, obj.values, yerr=stderr.values, fmt="none", capsize=3,
                        color=ax.get_lines()[0].get_color())
        if dims[0] in text_ticks:
            ax.set_xticks(range(len(text_ticks[dims[0]])), text_ticks[dims[0]])
        if spans_decades(dims[0]):
            ax.set_xscale("log")
    elif len(dims) == 2:
        fig, ax = plt.subplots(figsize=(7, 5))
        image = ax.imshow(np.asarray(obj.values, dtype=float), aspect="auto", origin="lower", cmap="viridis")
        for axis, dim in ((ax.set_yticks, dims[0]), (ax.set_xticks, dims[1])):
            labels = text_ticks.get(dim) or [str(v) for v in obj[dim].values]
            step = max(1, len(labels) // 12)
            axis(range(0, len(labels), step), labels[::step])
        ax.set_ylabel(dims[0])
        ax.set_xlabel(dims[1])
        fig.colorbar(image, ax=ax, label=str(obj.name))
    elif len(dims) == 3:
        x = max(dims, key=lambda d: obj.sizes[d])
        rest = [d for d in dims if d != x]
        for dim in rest:   # text labels name the lines and the facets, not positions
            if dim in text_ticks:
                obj = obj.assign_coords({dim: text_ticks[dim]})
        g = obj.plot.line(x=x, hue=rest[1], col=rest[0], marker="o")
        if stderr is not None:
            stderr = stderr.assign_coords({d: obj[d].values for d in rest})   # text labels, as obj's
            for ax, facet in zip(g.axs.flat, g.name_dicts.flat):
                if facet is None:
                    continue
                # xarray draws one line per hue value, in order: each gets its bars in its colour
                for line, hue in zip(ax.get_lines(), obj[rest[1]].values):
                    where = {**facet, rest[1]: hue}
                    ax.errorbar(obj[x].values, obj.sel(where).values, yerr=stderr.sel(where).values, fmt="none",
                                capsize=3, color=line.get_color())
        for ax in g.axs.flat:
            if x in text_ticks:
                ax.set_xticks(range(len(text_ticks[x])), text_ticks[x])
            if spans_decades(x):
                ax.set_xscale("log")
        fig = g.fig
    else:
        raise ResultsError(f"{obj.name} has {len(dims)} dims ({', '.join(dims)}); select some with --sel first")
    # above the facets' own titles, which it covered
    fig.suptitle(title, fontsize=9, y=1.02 if len(dims) == 3 else 0.98)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
