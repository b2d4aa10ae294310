"""basinprobe.registry: everything a plugin author needs.

- :data:`hookimpl` marks the hook functions of a plugin (see ``hookspecs``).
- :class:`Probe` is the base class of probes; :class:`Dataset` is what dataset
  factories return; :func:`with_schema` declares a factory's ``with:`` schema.
- :class:`ProbeError` reports a measurement that cannot be made, in words.

The context a probe's ``run(ctx, params)`` receives is described in
``basinprobe.registry.context``.
"""

from basinprobe.registry.dataset import Dataset
from basinprobe.registry.errors import PluginError, ProbeError
from basinprobe.registry.hookspecs import hookimpl, hookspec
from basinprobe.registry.manager import (Component, Registry, collect_registry_with, load_registry,
                                         make_plugin_manager)
from basinprobe.registry.probe import Probe
from basinprobe.registry.schema import with_schema

__all__ = [
    "Component", "Dataset", "collect_registry_with", "PluginError", "Probe", "ProbeError", "Registry",
    "hookimpl", "hookspec", "load_registry", "make_plugin_manager", "with_schema",
]
