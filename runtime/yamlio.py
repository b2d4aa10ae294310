"""Reading spec YAML safely, the YAML 1.2 way, keeping where every value was written.

PyYAML implements YAML 1.1: ``1e-3`` is a string there and ``on``/``no`` are
booleans. Specs are read with a safe loader whose implicit resolvers follow
YAML 1.2's core schema instead, and every mapping and sequence remembers the
line and column of its items so that errors can point at them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Mark:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class MarkedDict(dict):
    """A dict that knows where each of its keys and values were written."""

    marks: dict  # key -> Mark of the value
    mark: Mark | None = None


class MarkedList(list):
    marks: list
    mark: Mark | None = None


class SpecLoader(yaml.SafeLoader):
    pass


# YAML 1.2 core schema: booleans are only true/false, floats include 1e-3 and .inf/.nan.
SpecLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _int_12(loader, node):
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _float_12(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text.endswith(".nan"):
        return float("nan")
    return float(text)


def _mark(loader, node) -> Mark:
    return Mark(loader.name, node.start_mark.line + 1, node.start_mark.column + 1)


def _mapping(loader, node):
    loader.flatten_mapping(node)
    result = MarkedDict()
    result.marks = {}
    result.mark = _mark(loader, node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            raise yaml.constructor.ConstructorError(None, None, "mapping keys must be scalars", key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first written at line {result.marks[key].line})",
                key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.marks[key] = _mark(loader, value_node)
    return result


def _sequence(loader, node):
    result = MarkedList(loader.construct_object(child, deep=True) for child in node.value)
    result.marks = [_mark(loader, child) for child in node.value]
    result.mark = _mark(loader, node)
    return result


SpecLoader.add_constructor("tag:yaml.org,2002:int", _int_12)
SpecLoader.add_constructor("tag:yaml.org,2002:float", _float_12)
SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load_yaml(text: str, filename: str = "<spec>"):
    """Parse ``text`` with the safe YAML 1.2 loader; raises ``yaml.YAMLError`` with marks."""
    loader = SpecLoader(text)
    loader.name = filename
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def mark_of(document, path) -> Mark | None:
    """The mark of the value at ``path`` (keys and indices), or of its nearest written parent."""
    node, best = document, getattr(document, "mark", None)
    for key in path:
        marks = getattr(node, "marks", None)
        try:
            best = marks[key] if marks is not None else best
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    return best


def plain(value):
    """Marked containers -> plain dicts and lists (for storing and hashing)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
