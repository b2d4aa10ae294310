"""Shared artifacts: named computations of the substrate that probes request by name.

A producer is ``fn(ctx, **kwargs) -> value``; :meth:`CellContext.artifact`
caches its value per cell by ``(name, kwargs)``, so two probes that ask for
``hessian.eigen`` with ``k=20`` share one Lanczos run.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable

PRODUCERS: dict[str, Callable] = {}


def artifact(name: str):
    """Decorator registering an artifact producer under ``name``."""

    def register(fn: Callable) -> Callable:
        PRODUCERS[name] = fn
        return fn

    return register


def producer(name: str) -> Callable:
    if not PRODUCERS:
        import basinprobe.runtime.substrate as substrate

        for info in pkgutil.iter_modules(substrate.__path__):
            importlib.import_module(f"{substrate.__name__}.{info.name}")
    try:
        return PRODUCERS[name]
    except KeyError:
        known = ", ".join(sorted(PRODUCERS)) or "none"
        raise KeyError(f"unknown artifact {name!r}; known artifacts: {known}") from None


def arguments(name: str, kwargs: dict) -> dict:
    """The arguments of a request with the producer's defaults filled in, so leaving an
    argument out and passing its default value name the same computation."""
    bound = inspect.signature(producer(name)).bind_partial(None, **kwargs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])  # without the context


def cache_key(name: str, kwargs: dict) -> tuple:
    def freeze(value):
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    return (name, freeze(arguments(name, kwargs)))
