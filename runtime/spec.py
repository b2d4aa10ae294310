"""The spec language at the edge: YAML text -> validated, typed :class:`Spec`.

Errors about a spec are raised here and only here, as :class:`SpecError`,
with the file, line and column of every problem.
"""

from __future__ import annotations

import copy
import difflib
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from basinprobe.registry import Registry, load_registry
from basinprobe.runtime.yamlio import Mark, load_yaml, mark_of, plain

# Keywords of xarray's sel/isel: a dim with one of these names is silently misread.
RESERVED_DIMS = frozenset({"method", "tolerance", "drop", "indexers", "indexers_kwargs", "missing_dims"})
# dtype and device are one per run: the store records one, and a run builds every model in it
NOT_SWEEPABLE = ("version", "name", "sweep", "probes", "output", "execution", "dtype", "device")
# what a spec's identity leaves out: how it is run, not what it computes
NOT_IDENTITY = ("execution", "output")
# what its training identity also leaves out: the probes, which a store may add, change or drop
NOT_TRAINING = NOT_IDENTITY + ("probes",)


@dataclass(frozen=True)
class Problem:
    mark: Mark | None
    path: tuple
    message: str

    def __str__(self) -> str:
        where = f"{self.mark}: " if self.mark else ""
        at = ".".join(map(str, self.path))
        return f"{where}{'at ' + at + ': ' if at else ''}{self.message}"


class SpecError(Exception):
    """The spec is invalid; ``problems`` say where and why."""

    def __init__(self, problems: list[Problem]):
        # in file order, each once (a value can break both a block's schema and a component's)
        unique = list({str(problem): problem for problem in problems}.values())
        self.problems = sorted(unique, key=lambda p: (p.mark is not None, p.mark.file if p.mark else "",
                                                       p.mark.line if p.mark else 0, p.mark.column if p.mark else 0))
        super().__init__("\n".join(map(str, self.problems)))


# --- typed spec ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    kind: str | None
    factory: str | None
    with_: dict
    checkpoints: tuple[str, ...] = ()  # resolved file paths


@dataclass(frozen=True)
class DataSpec:
    kind: str
    with_: dict
    batch_size: int
    seed: int


@dataclass(frozen=True)
class OptimizerSpec:
    kind: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    betas: tuple[float, float]


@dataclass(frozen=True)
class TrainSpec:
    optimizer: OptimizerSpec
    steps: int
    batch_size: int
    checkpoint_steps: tuple[int, ...]


@dataclass(frozen=True)
class SweepAxis:
    path: str
    dim: str
    values: tuple

    @functools.cached_property
    def labels(self) -> tuple:
        """The coordinate of each value (:func:`_axis_labels`)."""
        return tuple(_axis_labels(self.values))


@dataclass(frozen=True)
class ProbeEntry:
    name: str
    probe: str
    at: str | tuple[int, ...]
    params: dict  # the with: block, defaults filled in
    # the entry's own sweep over its with: block (paths relative to it): dims of its group only
    sweep: tuple[SweepAxis, ...] = ()

    @property
    def dims(self) -> list[str]:
        """The dims of the entry's own sweep, which its results carry after the cell dims."""
        return [axis.dim for axis in self.sweep]

    def runs(self) -> list[tuple[dict, dict]]:
        """What one cell computes: for each point of the entry's own sweep, its coordinates and
        the probe's params (one run, with no coordinates, for an entry without a sweep)."""
        if not self.sweep:
            return [({}, self.params)]
        out = []
        for picks in itertools.product(*(range(len(axis.values)) for axis in self.sweep)):
            params = copy.deepcopy(self.params)
            for axis, i in zip(self.sweep, picks):
                # a default that is no block (lottery_subspace's stability: false) gives way to one
                _set_path(params, axis.path.split("."), copy.deepcopy(axis.values[i]), replace=True)
            out.append(({axis.dim: axis.labels[i] for axis, i in zip(self.sweep, picks)}, params))
        return out

    def fixed_params(self) -> dict:
        """:attr:`params` without the swept ones, whose values are the group's coordinates."""
        fixed = copy.deepcopy(self.params)
        for axis in self.sweep:
            keys = axis.path.split(".")
            node = fixed
            for depth, key in enumerate(keys):
                # the value itself, or a default the sweep replaces by a block (stability: false)
                if depth == len(keys) - 1 or not isinstance(node.get(key), dict):
                    node.pop(key, None)
                    break
                node = node[key]
        return fixed

    def selects(self, steps: list[int]) -> list[int]:
        if self.at == "all":
            return list(steps)
        if self.at == "first":
            return steps[:1]
        if self.at == "last":
            return steps[-1:]
        return [s for s in steps if s in self.at]


@dataclass(frozen=True)
class PointConfig:
    """Everything that defines one sweep point's model, data and training."""

    seed: int
    model: ModelSpec
    data: DataSpec
    loss: str
    train: TrainSpec | None


@dataclass(frozen=True)
class Spec:
    name: str
    device: str
    dtype: str
    probes: tuple[ProbeEntry, ...]
    sweep: tuple[SweepAxis, ...]
    output: Path
    text: str
    source: Path | None
    raw: dict = field(repr=False, compare=False)
    document: dict = field(repr=False, compare=False, default=None)  # the marked YAML, for error locations
    execution: dict = field(default_factory=dict)

    @functools.cached_property
    def sha256(self) -> str:
        """The spec's identity, which its store must match to be resumed: what it computes, not
        how it is written (comments, layout, key order) or run (``execution:``, ``output:``);
        with the name and size of each checkpoint file its globs match, so that adding or
        replacing a file makes it another spec."""
        return self._identity(NOT_IDENTITY)

    @functools.cached_property
    def training_sha256(self) -> str:
        """:attr:`sha256` without the probes: specs that train (or load) the same models. A store
        of one can be amended for another: its cells of unchanged probe entries are kept."""
        return self._identity(NOT_TRAINING)

    def _identity(self, left_out: tuple[str, ...]) -> str:
        content = _with_defaults({key: value for key, value in self.raw.items() if key not in left_out},
                                 base_schema())
        if "sweep" in content:   # its axes' order numbers the points and orders the dims
            content["sweep"] = [[path, values] for path, values in content["sweep"].items()]
        if "probes" in content:  # so does an entry's own sweep, for its group's dims
            content["probes"] = [{**entry, "sweep": [[path, values] for path, values in entry["sweep"].items()]}
                                 if "sweep" in entry else entry for entry in content["probes"]]
        files_ = [(str(Path(f).relative_to(self.base_dir)) if Path(f).is_relative_to(self.base_dir) else f,
                   Path(f).stat().st_size) for f in _checkpoint_files_named(self.raw, self.base_dir)]
        return hashlib.sha256(json.dumps([content, files_], sort_keys=True).encode()).hexdigest()

    @property
    def cell_dims(self) -> list[str]:
        return [axis.dim for axis in self.sweep] + ["checkpoint"]

    def points(self) -> list[tuple[dict, PointConfig]]:
        """Every sweep point: its coordinates (dim -> value label) and its config."""
        if not self.sweep:
            return [({}, _point_config(self.raw, self.base_dir))]
        # The sweep block is left out of each point's copy: copying its lists once per point made
        # a long axis quadratic (2,000 seeds: 7 s).
        unswept = {key: value for key, value in self.raw.items() if key != "sweep"}
        out = []
        for picks in itertools.product(*(range(len(axis.values)) for axis in self.sweep)):
            raw = copy.deepcopy(unswept)
            for axis, i in zip(self.sweep, picks):
                _set_path(raw, axis.path.split("."), axis.values[i])
            coords = {axis.dim: axis.labels[i] for axis, i in zip(self.sweep, picks)}
            out.append((coords, _point_config(raw, self.base_dir)))
        return out

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()


def _with_defaults(node, schema: dict):
    """``node`` with the ``default`` of every property its schema gives one for, where the node
    leaves it out (so that writing a default out is the same spec as leaving it out)."""
    if not isinstance(node, dict) or schema.get("type") != "object":
        return node
    filled = dict(node)
    for key, sub in schema.get("properties", {}).items():
        if key in filled:
            filled[key] = _with_defaults(filled[key], sub)
        elif "default" in sub:
            filled[key] = copy.deepcopy(sub["default"])
    return filled


def axis_dims(paths: list[str]) -> dict[str, str]:
    """The dim of each sweep axis: its path's last key (``model.with.hidden`` -> ``hidden``); where
    two axes share it, as many keys before it as set them apart, joined by ``_`` (``seed`` and
    ``data.seed`` -> ``seed`` and ``data_seed``)."""
    keys = {path: path.split(".") for path in paths}
    taken = {path: 1 for path in paths}
    while True:
        dims = {path: "_".join(keys[path][-taken[path]:]) for path in paths}
        clashing = [path for path in paths if list(dims.values()).count(dims[path]) > 1
                    and taken[path] < len(keys[path])]
        if not clashing:
            return dims
        for path in clashing:
            taken[path] += 1


def checkpoint_files(base: Path, pattern: str) -> list[str]:
    """The files a ``model.checkpoints`` glob matches, numbers in names in numeric order
    (``step_20.pt`` before ``step_100.pt``, which sorted text would swap)."""
    def key(name: str):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]

    return sorted(glob.glob(str(base / pattern)), key=key)


def _checkpoint_files_named(raw: dict, base: Path) -> list[str]:
    """Every checkpoint file the spec's globs match, also those of a sweep over them."""
    patterns = list(raw["model"].get("checkpoints", []))
    for path, values in raw.get("sweep", {}).items():
        if path == "model.checkpoints" or path.startswith("model.checkpoints."):
            for value in values:
                patterns += [p for p in (value if isinstance(value, list) else [value]) if isinstance(p, str)]
    return [f for pattern in patterns for f in checkpoint_files(base, pattern)]


def coordinate_label(value):
    """Sweep values become coordinates: scalars as they are, lists as compact JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"))


def _kind(value) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else \
        "str" if isinstance(value, str) else "json"


def _axis_labels(values) -> list:
    """The coordinates of a sweep axis: :func:`coordinate_label` of each value where they are of
    one kind (numbers, strings, booleans, or lists and mappings); text for all where kinds mix
    (``[auto, 0.001]`` -> ``"auto"``, ``"0.001"``; ``[{k: 2}, false]`` -> ``'{"k":2}'``,
    ``"false"``), because a coordinate of mixed types cannot be aligned or selected."""
    values = [plain(v) for v in values]
    if len({_kind(v) for v in values}) <= 1:
        return [coordinate_label(v) for v in values]
    return [v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for v in values]


def _point_key(value) -> tuple:
    """Values that are one point of an axis share this: 1 and 1.0 do, True and 1 do not."""
    value = plain(value)
    if _kind(value) == "number":
        return ("number", float(value))
    return (_kind(value), json.dumps(value, sort_keys=True))


# --- schema -----------------------------------------------------------------------------------
def base_schema() -> dict:
    return json.loads((files("basinprobe.specs") / "basinprobe.schema.json").read_text())


def merged_schema(registry: Registry | None = None) -> dict:
    """The base schema with the ``with:`` schemas of every installed probe, model and dataset."""
    registry = registry or load_registry()
    schema = base_schema()
    definitions = schema.setdefault("definitions", {})
    props = schema["properties"]

    def dispatch(key: str, table: dict, prefix: str) -> list:
        rules = []
        for name, component in sorted(table.items()):
            definitions[f"{prefix}.{name}"] = component.schema
            rules.append({
                "if": {"properties": {key: {"const": name}}, "required": [key]},
                "then": {"properties": {"with": {"$ref": f"#/definitions/{prefix}.{name}"}}},
            })
        return rules

    probe_item = props["probes"]["items"]
    probe_item["properties"]["probe"]["enum"] = sorted(registry.probes)
    probe_item["allOf"] = dispatch("probe", registry.probes, "probe")
    props["model"]["properties"]["kind"]["enum"] = sorted(registry.models)
    props["model"]["allOf"] = dispatch("kind", registry.models, "model")
    props["data"]["properties"]["kind"]["enum"] = sorted(registry.datasets)
    props["data"]["allOf"] = dispatch("kind", registry.datasets, "dataset")
    props["loss"]["enum"] = sorted(registry.losses)
    return schema


# JSON Schema counts 4.0 as an integer; the code it feeds (sizes, counts, steps) needs an int,
# and 1e3 is a float in YAML 1.2. An integer must be written as one.
SpecValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)))


def _suggest(word, candidates) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _translate(error: jsonschema.ValidationError, document, mark_override: Mark | None) -> list[Problem]:
    path = tuple(error.absolute_path)
    mark = mark_override or mark_of(document, path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        problems = []
        for key in error.instance:
            if key not in allowed:
                key_mark = mark_override or mark_of(document, path + (key,))
                problems.append(Problem(key_mark, path + (key,),
                                        f"unknown key {key!r}{_suggest(key, allowed)} (allowed: {', '.join(allowed)})"
                                        + ("; a key needs ': ' (a colon and a space) before its value"
                                           if ":" in str(key) else "")))
        return problems
    if error.validator == "enum" and isinstance(error.instance, str):
        options = error.validator_value
        what = {"probe": "probe", "kind": "kind", "loss": "loss"}.get(str(path[-1]) if path else "", "value")
        listing = ", ".join(map(str, options)) if len(options) < 25 else f"{len(options)} choices"
        return [Problem(mark, path, f"unknown {what} {error.instance!r}{_suggest(error.instance, options)} "
                                    f"(known: {listing})")]
    if error.validator in ("anyOf", "oneOf") and error.context:
        # "not valid under any of the given schemas" names no fix: report what the branch
        # whose type fits the value wants, or, when no type fits, every type that would
        def misfit(e):  # a branch that wants another type than the value has
            return not e.path and (e.validator == "type" or (
                e.validator == "enum" and not any(type(v) is type(e.instance) for v in e.validator_value)) or (
                e.validator == "const" and type(e.validator_value) is not type(e.instance)))

        misfits = [e for e in error.context if misfit(e)]
        branches = [e for e in error.context if not misfit(e)]
        if branches:
            return _translate(jsonschema.exceptions.best_match(branches), document, mark_override)
        expected = []
        for e in misfits:
            if e.validator == "enum":
                forms = [f"one of {', '.join(map(str, e.validator_value))}"]
            elif e.validator == "const":
                forms = [json.dumps(e.validator_value)]
            else:
                forms = [e.validator_value] if isinstance(e.validator_value, str) else e.validator_value
            expected += [f for f in forms if f not in expected]
        return [Problem(mark, path, f"expected {' or '.join(expected)}, got {error.instance!r}")]
    if error.validator == "type":
        expected = error.validator_value
        got = "nothing (the key has no value)" if error.instance is None else repr(error.instance)
        if isinstance(error.instance, float) and error.instance.is_integer() and "integer" in expected:
            got += f" (write it as an integer: {int(error.instance)})"
        return [Problem(mark, path, f"expected {expected if isinstance(expected, str) else ' or '.join(expected)}, "
                                    f"got {got}")]
    if error.validator == "required":
        return [Problem(mark, path, error.message.replace("is a required property", "is required but missing"))]
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        relation = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[error.validator]
        return [Problem(mark, path, f"{error.instance!r} is out of range: must be {relation} {error.validator_value}")]
    return [Problem(mark, path, error.message)]


def _validate(document, validator, mark_override: Mark | None = None, errors=None) -> list[Problem]:
    """Problems of ``document`` (or of ``errors``, jsonschema errors already found in it)."""
    problems = []
    errors = validator.iter_errors(document) if errors is None else errors
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        # Errors inside if/then are reported by their own sub-errors; skip the wrappers.
        if error.validator in ("allOf", "if"):
            continue
        problems.extend(_translate(error, document, mark_override))
    return problems


def _numbers(node, path=()):
    """Every number in ``node`` (booleans are not), with its path."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, path + (i,))


def _non_finite(node):
    return ((path, v) for path, v in _numbers(node) if isinstance(v, float) and not math.isfinite(v))


def _set_path(raw: dict, keys: list[str], value, replace: bool = False):
    """Set ``value`` at ``keys`` inside ``raw``, making the missing mappings on the way (and,
    with ``replace``, a mapping of whatever else is in the way)."""
    node = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if key not in node or node[key] is None or (replace and not isinstance(node[key], (dict, list))):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


# --- loading ------------------------------------------------------------------------------------
def load_spec(path: str | Path | None = None, *, text: str | None = None, registry: Registry | None = None,
              output: str | None = None) -> Spec:
    """Read, validate and type a spec file (or ``text``). Raises :class:`SpecError`."""
    source = Path(path) if path is not None else None
    filename = str(source) if source else "<spec>"
    if text is None:
        try:
            text = source.read_text()
        except FileNotFoundError:
            raise SpecError([Problem(None, (), f"spec file {filename} does not exist")]) from None
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise SpecError([Problem(None, (), f"cannot read spec file {filename}: {exc}")]) from None
    try:
        document = load_yaml(text, filename)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = Mark(filename, mark.line + 1, mark.column + 1) if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Problem(where, (), f"malformed YAML: {reason}{_yaml_fix(exc)}")]) from None
    if not isinstance(document, dict):
        raise SpecError([Problem(Mark(filename, 1, 1), (), "a spec must be a YAML mapping (key: value lines)")])

    problems = [Problem(mark_of(document, p), p, f"{v} is not a finite number") for p, v in _non_finite(document)]
    registry = registry or load_registry()
    validator = SpecValidator(merged_schema(registry))
    problems += _validate(document, validator)
    if not problems:
        problems += _check_semantics(document, validator, source)
    if problems:
        raise SpecError(problems)
    return _build(document, text, source, output, registry)


def _yaml_fix(exc: yaml.YAMLError) -> str:
    """How to repair the commonest YAML slips, from the parser's own words."""
    problem = getattr(exc, "problem", None) or ""
    context = getattr(exc, "context", None) or ""
    opened = getattr(exc, "context_mark", None)
    at = f" at line {opened.line + 1}, column {opened.column + 1}" if opened else ""
    if "'\\t'" in problem:
        return "; YAML indents with spaces only: replace the tab with spaces"
    if problem.startswith("found character") and "cannot start any token" in problem:
        char = problem.split("'")[1] if problem.count("'") >= 2 else "@"
        return f"; a value starting with {char!r} must be quoted, e.g. \"{char}value\""
    if problem == "mapping values are not allowed here":
        return ("; a second ': ' where a value was expected: quote a value that holds ': ', or indent "
                "this key like the keys it belongs with")
    if problem in ("expected <block end>, but found '}'", "expected <block end>, but found ']'"):
        return f"; a stray '{problem[-2]}': remove it, or open the bracket it closes"
    if problem == "expected <block end>, but found '<scalar>'":
        return ("; text after a value that has ended (at its closing quote or bracket), or a line indented like "
                "no level above: put the text inside the value, or indent the line like the keys it belongs with")
    if problem == "but found another document":
        return "; a spec is one YAML document: remove the second '---'"
    if problem.startswith("expected <block end>"):
        return ("; this line does not continue the block above it: indent it like the keys (or '- ' items) it "
                "belongs with, and keep a mapping's keys and a list's items on levels of their own")
    if problem.startswith(("expected ',' or '}'", "expected ',' or ']'")):
        bracket = "{" if problem.startswith("expected ',' or '}'") else "["
        quote = ", or a value holding ': ' is not quoted" if problem.endswith("but got ':'") else ""
        return (f"; the '{bracket}' opened{at} is not closed, or two of its items lack a ',' between "
                f"them (write {{a: 1, b: 2}} and [1, 2]){quote}")
    if "quoted scalar" in context:
        return f"; the quote opened{at} is never closed"
    if problem.startswith("found undefined alias") or "an alias" in context or "an anchor" in context:
        return "; '*' and '&' start an alias or anchor in YAML: quote the value, e.g. \"*.pt\""
    if problem.startswith("could not find expected ':'"):
        return "; a key needs ': ' (a colon and a space) before its value"
    return ""


def _check_semantics(doc, validator, source: Path | None) -> list[Problem]:
    problems = []
    base = source.parent if source else Path.cwd()
    model = doc["model"]
    if ("kind" in model) == ("factory" in model):
        problems.append(Problem(mark_of(doc, ("model",)), ("model",), "give exactly one of 'kind' or 'factory'"))
    if "checkpoints" in model:
        if "train" in doc:
            problems.append(Problem(mark_of(doc, ("model", "checkpoints")), ("model", "checkpoints"),
                                    "'model.checkpoints' and a 'train' block exclude each other: "
                                    "either load checkpoints or train, not both"))
        for i, pattern in enumerate(model["checkpoints"]):
            if not checkpoint_files(base, pattern):
                problems.append(Problem(mark_of(doc, ("model", "checkpoints", i)), ("model", "checkpoints", i),
                                        f"no checkpoint file matches {pattern!r} (looked in {base})"))
    data_with = doc["data"].get("with", {})
    if isinstance(data_with, dict) and "path" in data_with and not (base / data_with["path"]).is_file():
        problems.append(Problem(mark_of(doc, ("data", "with", "path")), ("data", "with", "path"),
                                f"data file {data_with['path']!r} does not exist (looked in {base})"))
    names = {}
    for i, entry in enumerate(doc["probes"]):
        name = entry.get("name", entry["probe"])
        if name.startswith("_"):
            problems.append(Problem(mark_of(doc, ("probes", i)), ("probes", i), "names starting with '_' are reserved"))
        if name in names:
            problems.append(Problem(mark_of(doc, ("probes", i)), ("probes", i),
                                    f"two probe entries are named {name!r} (entries {names[name]} and {i}); "
                                    "give one a different 'name:'"))
        names[name] = i
    dims, dim_of = {}, axis_dims(list(doc.get("sweep", {})))
    # each sweep value is validated in a copy of the spec; the sweep block itself (valid already)
    # is left out of the copies, which otherwise grew with the number of values
    unswept = {key: value for key, value in plain(doc).items() if key != "sweep"}
    for path, values in doc.get("sweep", {}).items():
        keys = path.split(".")
        mark = mark_of(doc, ("sweep", path))
        if keys[0] in NOT_SWEEPABLE:
            why = (" (a run has one, which its store records: write one spec per value)"
                   if keys[0] in ("dtype", "device") else
                   " here; a probe's parameters are swept in its entry, e.g. "
                   "{probe: langevin, sweep: {localization: [1, 10]}}" if keys[0] == "probes" else "")
            problems.append(Problem(mark, ("sweep", path), f"{keys[0]!r} cannot be swept{why}"))
            continue
        dim = dim_of[path]
        if dim in RESERVED_DIMS or dim == "checkpoint":
            problems.append(Problem(mark, ("sweep", path), f"a sweep axis may not be named {dim!r} "
                                                          "(reserved by xarray's sel or by basinprobe)"))
        if dim in dims:
            problems.append(Problem(mark, ("sweep", path),
                                    f"axes {dims[dim]!r} and {path!r} would both be named {dim!r}"))
        dims[dim] = path
        repeated, firsts = _repeated_points(doc, ("sweep", path), values)
        problems += repeated
        for j in firsts:
            value = values[j]
            trial = copy.deepcopy(unswept)
            try:
                _set_path(trial, keys, value)
            except (KeyError, IndexError, ValueError, TypeError):
                problems.append(Problem(mark, ("sweep", path), f"{path!r} is not a path into the spec"))
                break
            # Only the swept top-level block can have changed, and the root schema has no
            # conditions across blocks: validating that block alone keeps a long axis fast.
            block = validator.schema["properties"].get(keys[0])
            errors = None if block is None else validator.descend(trial[keys[0]], block, path=keys[0])
            problems += _validate(trial, validator, mark_override=mark_of(doc, ("sweep", path, j)), errors=errors)
    for i, entry in enumerate(doc["probes"]):
        if "sweep" in entry:
            problems += _check_entry_sweep(doc, i, validator, reserved=set(dims) | {"checkpoint"})
    if doc.get("dtype", "float32") == "float32":
        # training casts its hyperparameters to the parameters' dtype; past float32's range torch
        # raised an overflow error from inside an update
        found = list(_beyond_float32(doc.get("train", {}), ("train",)))
        for path, values in doc.get("sweep", {}).items():
            if path.split(".")[0] == "train":
                found += list(_beyond_float32(values, ("sweep", path)))
        problems += [Problem(mark_of(doc, where), where, f"{value!r} is beyond float32's range (largest "
                                                         f"{FLOAT32_MAX:.4g}); give a smaller value, or dtype: float64")
                     for where, value in found]
    if "output" in doc:
        written = os.path.expandvars(doc["output"])
        try:
            out = base / Path(written).expanduser()
        except RuntimeError:   # ~user of no such user
            out, written = None, "$"
        if not doc["output"].strip() or "$" in written:
            why = ("is empty" if not doc["output"].strip() else
                   f"names an unknown home folder ({doc['output']!r})" if out is None else
                   f"names an unset environment variable ({written!r})")
            problems.append(Problem(mark_of(doc, ("output",)), ("output",),
                                    f"output {why}; give the store's path, e.g. results/{doc.get('name', 'run')}.zarr"))
        elif out.exists() and not out.is_dir():
            problems.append(Problem(mark_of(doc, ("output",)), ("output",),
                                    f"output {doc['output']!r} is an existing file, not a Zarr store; "
                                    "choose another path"))
    return problems


FLOAT32_MAX = 3.4028234663852886e38


def _beyond_float32(node, path=()):
    return ((where, v) for where, v in _numbers(node, path) if math.isfinite(v) and abs(v) > FLOAT32_MAX)


def _repeated_points(doc, where: tuple, values) -> tuple[list[Problem], list[int]]:
    """A sweep axis's values given twice (two runs would claim one coordinate), as problems at
    the repeats; and the positions of the values given first."""
    problems, seen = [], {}
    for j, value in enumerate(values):
        label = _point_key(value)
        if label in seen:
            problems.append(Problem(mark_of(doc, where + (j,)), where + (j,),
                                    f"{plain(value)!r} is the same point as the axis's value number {seen[label] + 1} "
                                    f"({plain(values[seen[label]])!r}); give each point once"))
        else:
            seen[label] = j
    return problems, list(seen.values())


def _check_entry_sweep(doc, index: int, validator, reserved: set[str]) -> list[Problem]:
    """Problems of probe entry ``index``'s own sweep: its dims must be new names, each path must
    lead into ``with:`` (and not be set there too), and each value must make a valid entry."""
    problems = []
    entry = doc["probes"][index]
    given = plain(entry.get("with", {}))
    unswept = {key: value for key, value in plain(entry).items() if key != "sweep"}
    dim_of = axis_dims(list(entry["sweep"]))
    schema = validator.schema.get("definitions", {}).get(f"probe.{entry['probe']}", {})
    for path, values in entry["sweep"].items():
        keys = path.split(".")
        where = ("probes", index, "sweep", path)
        mark = mark_of(doc, where)
        dim = dim_of[path]
        unknown = _unknown_key(schema, keys)
        if unknown:
            depth, known = unknown
            what = f"parameter {keys[0]!r}" if depth == 0 else f"key {keys[depth]!r} in {'.'.join(keys[:depth])!r}"
            hint = (f"; paths lead into 'with:': write {'.'.join(keys[1:])!r}" if keys[:1] == ["with"] and len(keys) > 1
                    else _suggest(keys[depth], known))
            problems.append(Problem(mark, where, f"{entry['probe']} has no {what}{hint} (known: {', '.join(known)})"))
            continue
        inside = [other for other in entry["sweep"] if path.startswith(other + ".")]
        if inside:
            problems.append(Problem(mark, where, f"{path!r} lies inside {inside[0]!r}, which is swept too; "
                                                 "sweep one of them"))
            continue
        if dim in reserved or dim in RESERVED_DIMS:
            problems.append(Problem(mark, where, f"a sweep axis may not be named {dim!r} (a cell dim of this spec, "
                                                 "or reserved by xarray's sel or by basinprobe); write one entry "
                                                 "per value instead"))
        node = given
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            problems.append(Problem(mark, where, f"{path!r} is both set in 'with:' and swept; "
                                                 "remove it from 'with:'"))
            continue
        repeated, firsts = _repeated_points(doc, where, values)
        problems += repeated
        found = []
        for j in firsts:
            value, value_where = values[j], where + (j,)
            trial = copy.deepcopy(unswept)
            try:
                _set_path(trial.setdefault("with", {}), keys, plain(value))
            except (KeyError, IndexError, ValueError, TypeError):
                problems.append(Problem(mark, where, f"{path!r} is not a path into the entry's 'with:' block"))
                break
            # the entry alone is validated, with the value in place (errors at the value's line)
            probes = list(plain(doc["probes"]))
            probes[index] = trial
            errors = validator.descend(probes, validator.schema["properties"]["probes"], path="probes")
            # named by where the value is written (probes.0.sweep.top_k.1), not where it goes (with.top_k)
            inside = ("probes", index, "with", *keys)
            found.append([Problem(p.mark, value_where + p.path[len(inside):] if p.path[:len(inside)] == inside
                                  else p.path, p.message)
                          for p in _validate(doc, validator, mark_override=mark_of(doc, value_where), errors=errors)])
        # what every value gets wrong is the axis's problem: said once, at its key
        def alike(problem):   # the problem, wherever along the axis
            inner = problem.path[len(where) + 1:] if problem.path[:len(where)] == where else problem.path
            return inner, problem.message

        shared = set.intersection(*({alike(p) for p in value_problems} for value_problems in found)) \
            if len(found) > 1 else set()
        problems += [Problem(mark, where + inner, message) for inner, message in sorted(shared, key=str)]
        problems += [p for value_problems in found for p in value_problems if alike(p) not in shared]
    return problems


def _unknown_key(schema: dict, keys: list[str]) -> tuple[int, list[str]] | None:
    """Where ``keys`` leave what ``schema`` allows: the depth of the first key no mapping of
    the schema (or of its anyOf/oneOf branches) has, and the keys it has; None where every key
    is known, or where a mapping on the way takes any key."""
    level = [schema]
    for depth, key in enumerate(keys):
        mappings = [s for node in level for s in [node, *node.get("anyOf", []), *node.get("oneOf", [])]
                    if isinstance(s, dict) and ("properties" in s or s.get("type") == "object")]
        if not mappings or any(s.get("additionalProperties") is not False for s in mappings):
            return None
        known = list(dict.fromkeys(k for s in mappings for k in s.get("properties", {})))
        if key not in known:
            return depth, known
        level = [s["properties"][key] for s in mappings if key in s.get("properties", {})]
    return None


def _point_config(raw: dict, base: Path) -> PointConfig:
    model = raw["model"]
    files_ = []
    for pattern in model.get("checkpoints", []):
        files_ += checkpoint_files(base, pattern)
    data = raw["data"]
    data_with = dict(data.get("with", {}))
    if "path" in data_with:
        data_with["path"] = str(base / data_with["path"])
    train = None
    if "train" in raw:
        t = raw["train"]
        opt = t.get("optimizer", {})
        steps = int(t["steps"])
        ck = t.get("checkpoints", {"at": [0, steps]})
        at = list(range(0, steps + 1, ck["every"])) + [steps] if "every" in ck else list(ck["at"])
        at = sorted({s for s in at if s <= steps} | {0})
        train = TrainSpec(
            optimizer=OptimizerSpec(
                kind=opt.get("kind", "sgd"), lr=float(opt.get("lr", 0.01)), momentum=float(opt.get("momentum", 0.0)),
                nesterov=bool(opt.get("nesterov", False)), weight_decay=float(opt.get("weight_decay", 0.0)),
                betas=tuple(opt.get("betas", (0.9, 0.999))),
            ),
            steps=steps,
            batch_size=int(t.get("batch_size", data.get("batch_size", 256))),
            checkpoint_steps=tuple(at),
        )
    return PointConfig(
        seed=int(raw.get("seed", 0)),
        model=ModelSpec(model.get("kind"), model.get("factory"), plain(model.get("with", {})), tuple(files_)),
        data=DataSpec(data["kind"], plain(data_with), int(data.get("batch_size", 256)), int(data.get("seed", 0))),
        loss=raw["loss"],
        train=train,
    )


def _build(doc, text: str, source: Path | None, output: str | None, registry: Registry) -> Spec:
    raw = plain(doc)
    base = source.parent if source else Path.cwd()
    probes = []
    for entry in raw["probes"]:
        probe = registry.probes[entry["probe"]].obj()
        at = entry.get("at", "all")
        own = axis_dims(list(entry.get("sweep", {})))
        probes.append(ProbeEntry(entry.get("name", entry["probe"]), entry["probe"],
                                 at if isinstance(at, str) else tuple(at), probe.resolve(entry.get("with", {})),
                                 tuple(SweepAxis(path, own[path], tuple(values))
                                       for path, values in entry.get("sweep", {}).items())))
    dim_of = axis_dims(list(raw.get("sweep", {})))
    sweep = tuple(SweepAxis(path, dim_of[path], tuple(values)) for path, values in raw.get("sweep", {}).items())
    name = raw.get("name") or (source.stem if source else "spec")
    if output is not None:
        out = Path(output).expanduser()
    elif "output" in raw:
        out = (base / Path(os.path.expandvars(raw["output"])).expanduser()).resolve()
    else:
        out = base / "results" / f"{name}.zarr"
    return Spec(name=name, device=raw.get("device", "auto"), dtype=raw.get("dtype", "float32"),
                probes=tuple(probes), sweep=sweep, output=out, text=text, source=source, raw=raw,
                document=doc, execution=dict(raw.get("execution", {})))
