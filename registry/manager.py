"""Loading plugins and collecting what they provide."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from basinprobe.registry import hookspecs
from basinprobe.registry.errors import PluginError
from basinprobe.registry.probe import Probe

ENTRY_POINT_GROUP = "basinprobe"
BUILTIN_DISTRIBUTION = "basinprobe"


@dataclass
class Component:
    """One named thing a plugin provides."""

    name: str
    obj: Any
    plugin: str  # the distribution (or plugin name) that provides it

    @property
    def schema(self) -> dict:
        return getattr(self.obj, "schema", None) or {"type": "object"}

    @property
    def description(self) -> str:
        text = getattr(self.obj, "description", "") or (getattr(self.obj, "__doc__", "") or "")
        return text.strip().split("\n")[0]


@dataclass
class Registry:
    """Everything the installed plugins provide, by kind and name."""

    probes: dict[str, Component] = field(default_factory=dict)
    models: dict[str, Component] = field(default_factory=dict)
    datasets: dict[str, Component] = field(default_factory=dict)
    losses: dict[str, Component] = field(default_factory=dict)
    broken: list[tuple[str, str]] = field(default_factory=list)  # (distribution, error)


def _distribution_of(entry_point) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else entry_point.value


def make_plugin_manager(extra_plugins=(), autoload: bool | None = None):
    """A pluggy manager with the hooks, the built-ins and the installed plugins.

    Entry points are loaded one by one so that a broken plugin is reported by
    distribution while the rest still load (pluggy's own loader stops at the
    first failure). ``BASINPROBE_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the
    entry points of basinprobe itself.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get("BASINPROBE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    broken: list[tuple[str, str]] = []
    origins: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = _distribution_of(ep)
        if not autoload and dist != BUILTIN_DISTRIBUTION:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take the rest down
            broken.append((dist, f"{type(exc).__name__}: {exc}"))
            continue
        origins[ep.name] = dist
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or repr(plugin)
        pm.register(plugin, name=name)
        origins[name] = name
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist: {exc}") from exc
    pm.basinprobe_broken = broken
    pm.basinprobe_origins = origins
    return pm


def collect(pm) -> Registry:
    """Call every hook and index the results by name; duplicates are errors."""
    registry = Registry(broken=list(getattr(pm, "basinprobe_broken", [])))
    origins = getattr(pm, "basinprobe_origins", {})
    for hook_name, table in (
        ("basinprobe_models", registry.models),
        ("basinprobe_datasets", registry.datasets),
        ("basinprobe_losses", registry.losses),
        ("basinprobe_probes", registry.probes),
    ):
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = origins.get(impl.plugin_name, impl.plugin_name)
            provided = impl.function()
            if provided is None:
                continue
            if hook_name == "basinprobe_probes":
                items = []
                for cls in provided:
                    if not (isinstance(cls, type) and issubclass(cls, Probe)) or not cls.name:
                        raise PluginError(
                            f"plugin {plugin_name!r} returned {cls!r} from basinprobe_probes; "
                            "expected Probe subclasses with a name"
                        )
                    items.append((cls.name, cls))
            else:
                items = list(dict(provided).items())
            for name, obj in items:
                if name in table:
                    other = table[name].plugin
                    raise PluginError(
                        f"{hook_name[len('basinprobe_'):-1]} {name!r} is provided by two plugins: "
                        f"{other!r} and {plugin_name!r}; uninstall one of them"
                    )
                table[name] = Component(name, obj, plugin_name)
    return registry


def collect_registry_with(*plugins) -> Registry:
    """The installed plugins plus ``plugins`` (objects with hook implementations), e.g. in tests."""
    return collect(make_plugin_manager(extra_plugins=plugins))


_cached: Registry | None = None


def load_registry(refresh: bool = False) -> Registry:
    """The registry of the installed plugins, loaded once per process."""
    global _cached
    if _cached is None or refresh:
        _cached = collect(make_plugin_manager())
    return _cached
