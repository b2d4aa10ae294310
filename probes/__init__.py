"""The built-in probes, registered through the same hook a third party uses."""

import importlib
import pkgutil

from basinprobe.registry import Probe, hookimpl


def _probe_classes() -> list[type[Probe]]:
    # One probe per module: every Probe subclass defined in a submodule is built in.
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Probe) and value.__module__ == module.__name__ and value.name:
                found.append(value)
    return found


@hookimpl
def basinprobe_probes():
    return _probe_classes()
