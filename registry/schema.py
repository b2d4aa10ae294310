"""Attach a JSON Schema to a model or dataset factory."""

from typing import Callable


def with_schema(schema: dict, description: str = "") -> Callable:
    """Decorator: declare the JSON Schema of a factory's ``with:`` block.

    >>> @with_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    ... def make(n=10): ...
    >>> make.schema["properties"]["n"]["minimum"]
    1
    """

    def attach(factory: Callable) -> Callable:
        factory.schema = schema
        factory.description = description or (factory.__doc__ or "").strip().split("\n")[0]
        return factory

    return attach
