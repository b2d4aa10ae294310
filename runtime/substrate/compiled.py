"""``torch.compile`` for hot inner loops, opt-in, with the eager path as fallback.

``execution: {compile: true}`` sets ``ctx.compile``; substrate code wraps its
per-step functions (an HVP, an SGLD step, a subspace training step) with
:func:`maybe_compile`. If compilation or a compiled call fails (an unsupported
op, a missing compiler toolchain), the eager function is used from then on and
a warning says so once. Off by default: on small CPU models compilation costs
more than it saves; measure on your device (tests/benchmarks).
"""

from __future__ import annotations

import warnings
from typing import Callable


def maybe_compile(fn: Callable, enabled: bool, name: str = "") -> Callable:
    if not enabled:
        return fn
    import torch

    try:
        compiled = torch.compile(fn, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
        warnings.warn(f"torch.compile of {name or fn.__name__} failed ({exc}); running eagerly", RuntimeWarning)
        return fn
    state = {"compiled": compiled}

    def call(*args, **kwargs):
        if state["compiled"] is not None:
            try:
                return state["compiled"](*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                state["compiled"] = None
                warnings.warn(f"compiled {name or fn.__name__} failed ({type(exc).__name__}: {exc}); "
                              "running eagerly from now on", RuntimeWarning)
        return fn(*args, **kwargs)

    return call
