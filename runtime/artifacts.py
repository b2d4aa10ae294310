"""Shared artifacts: named computations of the substrate that probes request by name.

A producer is ``fn(ctx, **kwargs) -> value``; :meth:`CellContext.artifact`
caches its value per cell by ``(name, kwargs)``, so two probes that ask for
``hessian.eigen`` with ``k=20`` share one Lanczos run.

A producer registered with ``run_shared=True`` computes, when asked with ``at`` (a
checkpoint of the cell's training run), a value that is the same in every cell of that
run: it seeds itself from the run and ``at``, not from the cell. Such values are cached
per run, so the cells of a run (one per checkpoint) compute each checkpoint's value once
instead of once each; a cell computed alone (resumed, or on another worker) gets the same
value.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from typing import Callable

PRODUCERS: dict[str, Callable] = {}
RUN_SHARED: set[str] = set()


def artifact(name: str, *, run_shared: bool = False):
    """Decorator registering an artifact producer under ``name`` (``run_shared``: see above)."""

    def register(fn: Callable) -> Callable:
        PRODUCERS[name] = fn
        if run_shared:
            RUN_SHARED.add(name)
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


@functools.lru_cache(maxsize=None)
def _signature(function) -> inspect.Signature:
    # asked for every artifact request of every cell (12,000 in a 2,000-point plan)
    return inspect.signature(function)


def arguments(name: str, kwargs: dict) -> dict:
    """The arguments of a request with the producer's defaults filled in, so leaving an
    argument out and passing its default value name the same computation."""
    signature = _signature(producer(name))
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [key for key in kwargs if key not in signature.parameters or key == "ctx"]
    if unknown and not open_ended:
        takes = ", ".join(f"{p.name}={p.default!r}" for p in list(signature.parameters.values())[1:])
        raise TypeError(f"artifact {name!r} has no argument {', '.join(map(repr, unknown))}; "
                        f"it takes (with defaults) {takes}")
    bound = signature.bind_partial(None, **kwargs)
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])  # without the context


def cache_key(name: str, kwargs: dict) -> tuple:
    return request(name, kwargs)[0]


def request(name: str, kwargs: dict) -> tuple[tuple, bool]:
    """The cache key of a request, and whether its value is shared by the cells of the run."""
    def freeze(value):
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    args = arguments(name, kwargs)
    return (name, freeze(args)), name in RUN_SHARED and args.get("at") is not None
