"""Compiling a spec into a plan: sweep points, their cells, and the nodes each cell needs.

A cell is one sweep point at one checkpoint. Per cell the plan is a small DAG:
the data set (shared by every point with the same data block), the model and
its training run (shared by the point's checkpoints), the shared artifacts
that probes request (one node per distinct name and arguments, however many
probes ask for it) and the probes themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

from basinprobe.registry import ProbeError, Registry, load_registry
from basinprobe.runtime import artifacts
from basinprobe.runtime.spec import PointConfig, Problem, ProbeEntry, Spec, SpecError
from basinprobe.runtime.yamlio import mark_of


@dataclass
class CellPlan:
    key: str
    coords: dict
    checkpoint: int
    entries: list[ProbeEntry]
    artifacts: dict[str, list[str]] = field(default_factory=dict)  # artifact node -> entries requesting it


@dataclass
class PointPlan:
    key: str
    index: int
    coords: dict
    config: PointConfig
    steps: list[int]
    cells: list[CellPlan]
    data_node: str
    source: str  # "train" | "files" | "init"


@dataclass
class GroupPlan:
    """One run of a group-scoped probe entry over the cells that share ``coords``."""

    key: str
    entry: ProbeEntry
    coords: dict              # the cell coordinates the members share
    spanned: list[str]
    members: list[tuple[PointPlan, int]]   # (sweep point, checkpoint)


@dataclass
class Plan:
    spec: Spec
    points: list[PointPlan]
    groups: list[GroupPlan] = field(default_factory=list)

    @property
    def cells(self) -> list[CellPlan]:
        return [cell for point in self.points for cell in point.cells]


def components_of(plan: Plan) -> dict[str, set[str]]:
    """The registry's components the plan uses, by kind (``probes``, ``models``, ...)."""
    used = {"probes": {e.probe for e in plan.spec.probes}, "models": set(), "datasets": set(), "losses": set()}
    for point in plan.points:
        if point.config.model.kind:
            used["models"].add(point.config.model.kind)
        used["datasets"].add(point.config.data.kind)
        used["losses"].add(point.config.loss)
    return used


def code_versions(registry: Registry, components: dict[str, set[str]]) -> dict[str, str]:
    """The versions of what computes the results: basinprobe, torch (without its build tag: a
    CPU coordinator may drive CUDA workers) and each distribution providing one of
    ``components``. A store records them, and is resumed only with the same ones, so that no
    group mixes results of two versions."""
    versions = {"basinprobe": _installed_version("basinprobe"), "torch": _installed_version("torch").split("+")[0]}
    for kind, names in sorted(components.items()):
        table = getattr(registry, kind)
        for dist in sorted({table[name].plugin for name in names if name in table}):
            if dist not in versions:
                try:
                    versions[dist] = _installed_version(dist)
                except PackageNotFoundError:
                    pass   # a plugin registered in this process (a test's), not an installed distribution
    return versions


def _data_node(config: PointConfig) -> str:
    return f"data:{config.data.kind}:" + json.dumps([config.data.with_, config.data.seed], sort_keys=True)


def checkpoint_steps(config: PointConfig) -> tuple[list[int], str]:
    if config.train is not None:
        return list(config.train.checkpoint_steps), "train"
    if config.model.checkpoints:
        return list(range(len(config.model.checkpoints))), "files"
    return [0], "init"


def compile_plan(spec: Spec, registry: Registry | None = None) -> Plan:
    registry = registry or load_registry()
    scoped = {e.name: registry.probes[e.probe].obj().scope for e in spec.probes}
    cell_entries = [e for e in spec.probes if scoped[e.name] == "cell"]
    points, problems = [], {}
    for index, (coords, config) in enumerate(spec.points()):
        steps, source = checkpoint_steps(config)
        for i, entry in enumerate(spec.probes):
            absent = [] if isinstance(entry.at, str) else sorted(set(entry.at) - set(steps))
            if absent and i not in problems:   # the first sweep point that lacks them is example enough
                where = f" at sweep point {', '.join(f'{k}={v}' for k, v in coords.items())}" if coords else ""
                what = "file indices" if source == "files" else "steps"
                problems[i] = Problem(mark_of(spec.document, ("probes", i, "at")), ("probes", i, "at"),
                                      f"{', '.join(map(str, absent))} {'is' if len(absent) == 1 else 'are'} not a "
                                      f"checkpoint{where} (its checkpoint {what}: {', '.join(map(str, steps))}); "
                                      "pick from those" + (", or add them to train.checkpoints.at"
                                                           if source == "train" else ""))
        point_key = f"p{index:05d}"
        cells = []
        for step in steps:
            entries = [e for e in cell_entries if step in e.selects(steps)]
            if not entries:
                continue
            cell = CellPlan(f"{point_key}-c{step}", {**coords, "checkpoint": step}, step, entries)
            for entry in entries:
                probe = registry.probes[entry.probe].obj()
                for _, params in entry.runs():
                    for name, kwargs in probe.artifact_requests(params):
                        kwargs = _artifact_arguments(spec, entry, name, kwargs)
                        node = f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})"
                        requesting = cell.artifacts.setdefault(node, [])
                        if entry.name not in requesting:
                            requesting.append(entry.name)
            cells.append(cell)
        points.append(PointPlan(point_key, index, coords, config, steps, cells, _data_node(config), source))
    if problems:
        raise SpecError(list(problems.values()))
    groups = []
    for index, entry in enumerate(spec.probes):
        if scoped[entry.name] == "group":
            groups += _groups_of(spec, index, entry, points, registry)
    return Plan(spec, points, groups)


def _artifact_arguments(spec: Spec, entry: ProbeEntry, name: str, kwargs: dict) -> dict:
    try:
        return artifacts.arguments(name, kwargs)
    except (KeyError, TypeError) as exc:
        path = ("probes", spec.probes.index(entry))
        raise SpecError([Problem(mark_of(spec.document, path), path,
                                 f"probe {entry.probe!r} requests {name}: {exc.args[0]} (a bug in the probe's plugin)")]) from None


def _groups_of(spec: Spec, index: int, entry: ProbeEntry, points: list[PointPlan], registry) -> list[GroupPlan]:
    probe = registry.probes[entry.probe].obj()
    try:
        spans = {json.dumps(probe.spans(params, spec.cell_dims)) for _, params in entry.runs()}
    except ProbeError as exc:
        path = ("probes", index, "with")
        raise SpecError([Problem(mark_of(spec.document, path), path, str(exc))]) from None
    if len(spans) > 1:   # the runs of one group must share its members
        path = ("probes", index, "sweep")
        raise SpecError([Problem(mark_of(spec.document, path), path,
                                 f"{entry.name!r} would span other cell dims for different values of its sweep "
                                 f"({' vs '.join(sorted(spans))}); write one entry per value")])
    spanned = json.loads(spans.pop())
    unknown = [d for d in spanned if d not in spec.cell_dims]
    if unknown:
        path = ("probes", index, "with")
        raise SpecError([Problem(mark_of(spec.document, path), path,
                                 f"{entry.name!r} spans {unknown[0]!r}, which is not a cell dim of this spec "
                                 f"(cell dims: {', '.join(spec.cell_dims)})")])
    grouped: dict[str, GroupPlan] = {}
    for point in points:
        for step in entry.selects(point.steps):
            coords = {**point.coords, "checkpoint": step}
            fixed = {d: v for d, v in coords.items() if d not in spanned}
            label = json.dumps(fixed, sort_keys=True)
            if label not in grouped:
                grouped[label] = GroupPlan(f"g{index:02d}-{len(grouped):05d}", entry, fixed, spanned, [])
            grouped[label].members.append((point, step))
    return list(grouped.values())


def points_to_time(plan: Plan, cost: dict) -> list[str]:
    """The sweep points whose timing :func:`estimate_seconds` extrapolates from: the cheapest and
    the costliest by :func:`estimate_cost` (one, where all cost alike, as in a sweep of seeds)."""
    def flop(point):
        own = cost["points"][point.key]
        return own["train"] + sum(own["probes"].values())

    cheapest, costliest = min(plan.points, key=flop), max(plan.points, key=flop)
    return [cheapest.key] if flop(cheapest) == flop(costliest) else [cheapest.key, costliest.key]


def estimate_seconds(plan: Plan, cost: dict, timings: list) -> dict:
    """The whole run's seconds in one process, from timed sweep points (``timings``: objects with
    ``point``, ``setup`` and ``probes``, as ``execute.time_points`` returns). Each part (training
    and set-up; each probe entry) of a point is taken to cost ``a * runs + b * flop``: a fixed
    time per run (a training run; an entry's run on one cell), which dominates small models, and
    a time per flop of :func:`estimate_cost`. Two timed points fix a and b; one (or two whose runs
    and flop are in proportion) scales by flop, so that points alike to it count its time.
    Entries no timed point ran (group-scoped ones) are left out."""
    runs = {point.key: {"train": 1, **{e.name: 0 for e in plan.spec.probes}} for point in plan.points}
    for point in plan.points:
        for cell in point.cells:
            for entry in cell.entries:
                runs[point.key][entry.name] += len(entry.runs())

    def total(part: str, observed: list[tuple[str, float]]) -> float:
        def flop(key):
            own = cost["points"][key]
            return own["train"] if part == "train" else own["probes"].get(part, 0.0)

        (k1, s1), (k2, s2) = observed[0], observed[-1]
        n1, f1, n2, f2 = runs[k1][part], flop(k1), runs[k2][part], flop(k2)
        determinant = n1 * f2 - n2 * f1
        if len(observed) > 1 and determinant != 0:
            a, b = (s1 * f2 - s2 * f1) / determinant, (n1 * s2 - n2 * s1) / determinant
            if a < 0:   # no fixed time: all per flop
                a, b = 0.0, (s1 + s2) / (f1 + f2)
            elif b < 0:  # no time per flop: all fixed
                a, b = (s1 + s2) / (n1 + n2), 0.0
        else:   # one point, or two in proportion: scale their time by flop (by runs where there is none)
            seconds = sum(s for _, s in observed)
            timed_flop = sum(flop(key) for key, _ in observed)
            if timed_flop > 0:
                return seconds * sum(flop(key) for key in runs) / timed_flop
            return seconds * sum(runs[key][part] for key in runs) / sum(runs[key][part] for key, _ in observed)
        return sum(a * runs[key][part] + b * flop(key) for key in runs)

    train = total("train", [(t.point, t.setup) for t in timings])
    per_entry = {}
    for entry in plan.spec.probes:
        observed = [(t.point, t.probes[entry.name]) for t in timings
                    if entry.name in t.probes and runs[t.point][entry.name]]
        if observed:
            per_entry[entry.name] = total(entry.name, observed)
    return {"train": train, "probes": per_entry}


def estimate_cost(plan: Plan, n_params: dict[str, int], n_train: dict[str, int], registry: Registry | None = None) -> dict:
    """Rough floating-point operation counts: training and each probe entry, summed over cells
    (``train``, ``probes``), and per sweep point (``points``: point key -> the same for its
    training and cells; group-scoped entries are not a point's)."""
    registry = registry or load_registry()
    train = 0.0
    per_entry: dict[str, float] = {}
    points: dict[str, dict] = {}
    for point in plan.points:
        n = n_params[point.key]
        own = points[point.key] = {"train": 0.0, "probes": {}}
        if point.config.train is not None:
            t = point.config.train
            own["train"] = 6.0 * n * t.steps * min(t.batch_size, n_train[point.key])
            train += own["train"]
        for cell in point.cells:
            for entry in cell.entries:
                probe = registry.probes[entry.probe].obj()
                flop = 2.0 * n * sum(probe.cost(params, n, n_train[point.key]) for _, params in entry.runs())
                per_entry[entry.name] = per_entry.get(entry.name, 0.0) + flop
                own["probes"][entry.name] = own["probes"].get(entry.name, 0.0) + flop
    for group in plan.groups:   # a group-scoped probe costs one run per group
        point = group.members[0][0]
        n = n_params[point.key]
        probe = registry.probes[group.entry.probe].obj()
        per_entry[group.entry.name] = per_entry.get(group.entry.name, 0.0) + 2.0 * n * sum(
            probe.cost(params, n, n_train[point.key]) for _, params in group.entry.runs())
    return {"train": train, "probes": per_entry, "points": points}
