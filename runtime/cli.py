"""The ``basinprobe`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

EXIT_SPEC = 2


def _spec(args):
    from basinprobe.runtime.spec import load_spec

    return load_spec(args.spec, output=getattr(args, "output", None))


def cmd_validate(args) -> int:
    from basinprobe.registry import load_registry
    from basinprobe.runtime.build import resolve_device, resolve_dtype
    from basinprobe.runtime.execute import Workshop, coordinator_device
    from basinprobe.runtime.plan import compile_plan

    spec = _spec(args)
    registry = load_registry()
    plan = compile_plan(spec, registry)
    coordinator_device(spec, spec.device, spec.execution.get("executor", "local") == "dask")
    # build every distinct model and data set on the CPU, as run does before writing anything,
    # so that a spec valid here does not fail there (a factory that does not import, a model
    # that does not fit its data, an unreadable data file)
    Workshop(spec, registry, resolve_device("cpu"), resolve_dtype(spec.dtype)).preflight(plan)
    print(f"{args.spec}: valid ({len(spec.probes)} probe entries, {len(plan.points)} sweep points, "
          f"{len(plan.cells)} cells, {len(plan.groups)} runs of group-scoped probes)")
    _note_outlook(spec)
    return 0


def _note_outlook(spec) -> None:
    from basinprobe.runtime.store import outlook

    said = outlook(spec)
    if said:
        print(f"note: {said}")


def cmd_plan(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from basinprobe.registry import load_registry
    from basinprobe.runtime.build import resolve_device, resolve_dtype
    from basinprobe.runtime.execute import Workshop
    from basinprobe.runtime.plan import compile_plan, estimate_cost

    spec = _spec(args)
    if args.device is not None:
        problem = _device_problem(args.device, dask=False)
        if problem:
            print(f"error: --device {args.device}: {problem}", file=sys.stderr)
            return EXIT_SPEC
    registry = load_registry()
    plan = compile_plan(spec, registry)
    shop = Workshop(spec, registry, resolve_device("cpu"), resolve_dtype(spec.dtype))
    sizes = shop.preflight(plan)
    cost = estimate_cost(plan, {k: v[0] for k, v in sizes.items()}, {k: v[1] for k, v in sizes.items()}, registry)
    console = Console()
    console.print(f"[bold]{spec.name}[/]: {len(plan.points)} sweep points, {len(plan.cells)} cells, "
                  f"cell dims {spec.cell_dims} -> {spec.output}")
    table = Table("point", "coords", "params", "source", "checkpoints", "data node")
    data_nodes: dict[str, int] = {}
    for point in plan.points:
        data_nodes[point.data_node] = data_nodes.get(point.data_node, 0) + 1
    for point in plan.points[: args.max_cells]:
        table.add_row(point.key, json.dumps(point.coords), str(sizes[point.key][0]), point.source,
                      str(point.steps), point.data_node[:40])
    console.print(table)
    if len(plan.points) > args.max_cells:
        console.print(f"... and {len(plan.points) - args.max_cells} more sweep points")
    cells = Table("cell", "probes", "shared artifacts (requested by)")
    for cell in plan.cells[: args.max_cells]:
        shared = "; ".join(f"{node} <- {', '.join(by)}" + (" [shared]" if len(by) > 1 else "")
                           for node, by in cell.artifacts.items()) or "-"
        cells.add_row(cell.key, ", ".join(map(_entry_runs, cell.entries)), shared)
    console.print(cells)
    if len(plan.cells) > args.max_cells:
        console.print(f"... and {len(plan.cells) - args.max_cells} more cells")
    if plan.groups:
        groups = Table("group", "probe entry", "fixed coords", "spans", "members")
        for group in plan.groups[: args.max_cells]:
            groups.add_row(group.key, _entry_runs(group.entry), json.dumps(group.coords), ", ".join(group.spanned),
                           str(len(group.members)))
        console.print(groups)
    shared_data = sum(n - 1 for n in data_nodes.values())
    console.print(f"data sets built: {len(data_nodes)} (shared by {shared_data} further sweep points)")
    console.print(f"estimated cost: training {cost['train']:.2e} flop; "
                  + ", ".join(f"{k} {v:.2e} flop" for k, v in cost["probes"].items()))
    _note_outlook(spec)
    if args.time:
        return _time_plan(args, spec, plan, registry, cost, console)
    return 0


def _entry_runs(entry) -> str:
    """An entry's name, and how many runs its own sweep makes of it (``hess x4 (top_k, operator)``)."""
    return entry.name + (f" x{len(entry.runs())} ({', '.join(entry.dims)})" if entry.sweep else "")


def _time_plan(args, spec, plan, registry, cost, console) -> int:
    """``plan --time``: time the cheapest and the costliest sweep point, scale to the whole run."""
    from basinprobe.runtime.context import ProbeWarning
    from basinprobe.runtime.execute import time_points
    from basinprobe.runtime.plan import estimate_seconds, points_to_time
    from basinprobe.runtime.progress import Reporter, stderr_console

    keys = points_to_time(plan, cost)
    # The first point run in a process pays for what a process does once (imports, first calls
    # into torch): with more points to come, it runs twice, and the difference is counted once.
    warm_up = len(plan.points) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProbeWarning)   # the run itself reports them
        err = stderr_console()   # progress bars on a terminal; no line per cell
        timings, device = time_points(spec, plan, registry, keys[:1] * warm_up + keys, args.device,
                                      Reporter(console=err, quiet=not err.is_terminal))
    first = 0.0
    if warm_up:
        first = max(timings[0].seconds - timings[1].seconds, 0.0)
        timings = timings[1:]
    for timing in timings:
        where = f"sweep point {', '.join(f'{k}={v}' for k, v in timing.coords.items())}" if timing.coords else "the spec"
        parts = [f"{name} {duration(seconds)}" for name, seconds in timing.probes.items()]
        console.print(f"timed {where} on {device}: {duration(timing.seconds)} (training and set-up "
                      f"{duration(timing.setup)}; {', '.join(parts) or 'no probe cells'})", highlight=False, markup=False)
        # one line per kind of failure: a diverged training run fails every later cell alike
        for line in _alike(timing.failures):
            console.print(f"  failed while timing: {line}", highlight=False, markup=False)
    estimate = estimate_seconds(plan, cost, timings)
    total = first + estimate["train"] + sum(estimate["probes"].values())
    parts = [f"{name} {duration(seconds)}" for name, seconds in estimate["probes"].items()]
    console.print(f"estimated time of the whole run, one process on {device}: about {duration(total)} "
                  + (f"(a process's first point {duration(first)} more; " if warm_up else "(")
                  + f"training and set-up {duration(estimate['train'])}; {', '.join(parts) or 'no probe cells'})",
                  highlight=False, markup=False)
    others = len(plan.points) - len(timings)
    notes = [f"the other {others} sweep point{'s' * (others != 1)} from the timed "
             f"one{'s' * (len(timings) > 1)} by the cost model"] if others else []
    untimed = [e.name for e in spec.probes if e.name not in estimate["probes"]]
    if untimed:
        notes.append(f"not timed: {', '.join(untimed)} (group-scoped, or no cells at the timed points)")
    if notes:
        console.print("  " + "; ".join(notes), highlight=False, markup=False)
    return 0


def duration(seconds: float) -> str:
    """12.3 s, 4 min 10 s, 2 h 5 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


SHOWN_AFTER_RUN = 20   # warnings (and failures) printed after a run; a big sweep can have thousands


def capped(kind: str, messages: list[str], store: str) -> list[str]:
    """``kind: message`` lines: every message when there are at most :data:`SHOWN_AFTER_RUN`;
    otherwise one line per kind of message (same entry, same text up to its numbers), its
    first cell's, with how many more are like it, so that a rare warning is not buried under
    a common one; then where every one of them is kept."""
    if len(messages) <= SHOWN_AFTER_RUN:
        return [f"{kind}: {message}" for message in messages]
    grouped = _alike(messages)
    lines = [f"{kind}: {line}" for line in grouped[:SHOWN_AFTER_RUN]]
    if len(grouped) > SHOWN_AFTER_RUN:
        lines.append(f"{kind}: ... and {len(grouped) - SHOWN_AFTER_RUN} more kinds")
    lines.append(f"{kind}: {len(messages)} in all, kept in their groups' `{'failed' if kind == 'failed' else 'warnings'}` "
                 f"attrs: `basinprobe query {store}` lists every one")
    return lines


def _alike(messages: list[str]) -> list[str]:
    """One line per kind of message: its first, with how many more are like it."""
    groups: dict[str, list[str]] = {}
    for message in messages:
        groups.setdefault(_kind_of(message), []).append(message)
    return [group[0] + (f"  [and {len(group) - 1} more like it]" if len(group) > 1 else "") for group in groups.values()]


def _kind_of(message: str) -> str:
    """``<cell> <entry>: <text>`` -> the entry and the text's opening words, numbers blanked."""
    import re

    where, _, text = message.partition(": ")
    entry = where.rsplit(" ", 1)[-1]
    return entry + ": " + re.sub(r"[-+]?\d[\d.e+-]*", "#", text)[:48]


def _device_problem(name: str, dask: bool) -> str | None:
    """What is wrong with a --device value (checked here: the spec's own device is checked with
    the spec, and an error about this one must not point into the spec)."""
    import re

    from basinprobe.runtime.build import BuildError, resolve_device

    if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+|mps", name):
        return "expected auto, cpu, cuda, cuda:N or mps"
    if dask and name.startswith("cuda"):
        return None   # the workers' GPUs are checked when the cluster is reached
    try:
        resolve_device(name)
    except BuildError as exc:
        return str(exc)
    return None


def cmd_run(args) -> int:
    from basinprobe.runtime.context import ProbeWarning
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.progress import Reporter

    spec = _spec(args)
    if args.device is not None:
        problem = _device_problem(args.device, dask=(args.executor or spec.execution.get("executor")) == "dask")
        if problem:
            print(f"error: --device {args.device}: {problem}", file=sys.stderr)
            return EXIT_SPEC
    with warnings.catch_warnings():
        # a probe's warnings are printed once below, with their cells, instead of as Python
        # warnings that quote the probe's source line
        warnings.simplefilter("ignore", ProbeWarning)
        report = run_spec(spec, overwrite=args.overwrite, device=args.device, reporter=Reporter(quiet=args.quiet),
                          executor=args.executor, scheduler=args.scheduler, workers=args.workers)
    for line in capped("warning", report.warnings, report.store) + capped("failed", report.failures, report.store):
        print(line, file=sys.stderr)
    print(f"{report.store}: {report.done} cell results written, {report.skipped} kept from an earlier run, "
          f"{len(report.failures)} failed" + (" (interrupted)" if report.interrupted else ""))
    if report.interrupted:
        return 130
    return 0 if report.ok else 1


def cmd_query(args) -> int:
    from basinprobe.runtime.results import describe_tree, format_values, open_results, select

    tree = open_results(args.store)
    if not args.target:
        print(describe_tree(tree))
        return 0
    print(format_values(select(tree, args.target, args.sel), args.format))
    return 0


def cmd_plot(args) -> int:
    from basinprobe.runtime.results import open_results, plot, select

    tree = open_results(args.store)
    obj = select(tree, args.target, args.sel)
    # a variable with a standard error beside it (llc and llc_stderr) gets error bars
    group, _, var = args.target.partition("/")
    stderr = None
    if var and f"{var}_stderr" in tree[group].to_dataset().data_vars:
        stderr = select(tree, f"{group}/{var}_stderr", args.sel)
        stderr = stderr if stderr.dims == obj.dims else None
    out = args.output or f"{args.target.replace('/', '_')}.png"
    print(plot(obj, out, stderr))
    return 0


def cmd_export(args) -> int:
    from basinprobe.runtime.results import export_checkpoints, open_results

    written = export_checkpoints(open_results(args.store), args.out, args.sel)
    folders = sorted({str(path.parent) for path in written})
    print(f"{len(written)} checkpoints written as state_dicts in {len(folders)} folders under {args.out}"
          + (f" (e.g. model.checkpoints: [\"{folders[0]}/step_*.pt\"])" if folders else ""))
    return 0


def cmd_probes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from basinprobe.registry import load_registry

    registry = load_registry()
    table = Table("kind", "name", "plugin", "description")
    for kind, items in (("probe", registry.probes), ("model", registry.models),
                        ("dataset", registry.datasets), ("loss", registry.losses)):
        for name, component in sorted(items.items()):
            table.add_row(kind, name, component.plugin, component.description)
    Console(width=160).print(table)
    for dist, error in registry.broken:
        print(f"plugin {dist!r} failed to load: {error}", file=sys.stderr)
    return 0


def cmd_schema(args) -> int:
    from basinprobe.runtime.spec import merged_schema

    print(json.dumps(merged_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basinprobe", description="Probe the loss landscape of a model from a YAML spec.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec; errors name file:line:col")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plan", help="print the compiled plan and a cost estimate")
    p.add_argument("spec")
    p.add_argument("--max-cells", type=int, default=20, help="rows listed per table (sweep points, cells, groups)")
    p.add_argument("--time", action="store_true",
                   help="time the cheapest and the costliest sweep point in scratch stores and estimate the whole "
                        "run's time from them")
    p.add_argument("--device", help="with --time: the device to time on (default: the spec's)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("run", help="run a spec and write its Zarr store")
    p.add_argument("spec")
    p.add_argument("-o", "--output", help="the store (default: the spec's output:)")
    p.add_argument("--device", help="override the spec's device (auto, cpu, cuda, cuda:N, mps)")
    p.add_argument("--executor", choices=["local", "dask"], help="default: the spec's execution.executor, else local")
    p.add_argument("--scheduler", help="address of an existing dask scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, help="workers of the local dask cluster")
    p.add_argument("--overwrite", action="store_true", help="replace a store written by a different spec or other code versions")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("query", help="show the store's tree, or a variable's values")
    p.add_argument("store")
    p.add_argument("target", nargs="?", help="GROUP or GROUP/VAR")
    p.add_argument("--sel", action="append", default=[], metavar="DIM=VALUE")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_query)
    p = sub.add_parser("plot", help="plot a variable to a PNG")
    p.add_argument("store")
    p.add_argument("target", help="GROUP/VAR")
    p.add_argument("--sel", action="append", default=[], metavar="DIM=VALUE")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("export", help="write a store's checkpoints as state_dict files for model.checkpoints")
    p.add_argument("store")
    p.add_argument("out", help="folder: one subfolder per sweep point, step_<checkpoint>.pt in each")
    p.add_argument("--sel", action="append", default=[], metavar="DIM=VALUE")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("probes", help="list installed probes, models, datasets and losses")
    p.set_defaults(func=cmd_probes)
    p = sub.add_parser("schema", help="print the merged JSON Schema of the spec language")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()   # inside the try: a closed pipe fails here, not at exit
        return status
    except KeyboardInterrupt:   # outside a run's own handling (loading, printing): no traceback
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader stopped reading (`basinprobe query STORE | head`): nothing of ours failed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        # The error classes are imported only now: their modules import torch (~2 s), which
        # `query` and `plot` do not otherwise need.
        from basinprobe.registry import PluginError
        from basinprobe.runtime.distributed import ExecutorError
        from basinprobe.runtime.results import ResultsError
        from basinprobe.runtime.spec import SpecError
        from basinprobe.runtime.store import StoreMismatch

        if isinstance(exc, SpecError):
            print(f"error: invalid spec\n{exc}", file=sys.stderr)
            return EXIT_SPEC
        if isinstance(exc, (StoreMismatch, ResultsError, PluginError, ExecutorError)):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_SPEC
        raise


if __name__ == "__main__":
    sys.exit(main())
