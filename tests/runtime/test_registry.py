"""The plugin registry: hooks, duplicates, broken plugins, misspelled hooks."""

import importlib.metadata
import types

import pytest

from basinprobe.registry import PluginError, Probe, hookimpl, make_plugin_manager
from basinprobe.registry.manager import collect


def test_builtins_are_registered_through_the_entry_point():
    registry = collect(make_plugin_manager())
    assert registry.probes["evaluate"].plugin == "basinprobe"
    assert {"mlp", "deep_linear"} <= set(registry.models)
    assert {"teacher_student", "gaussian_mixture", "modular_addition", "digits", "npz", "pt"} <= set(registry.datasets)
    assert {"mse", "cross_entropy"} <= set(registry.losses)


class Evaluate2(Probe):
    name = "evaluate"


class Clash:
    @hookimpl
    def basinprobe_probes(self):
        return [Evaluate2]


def test_duplicate_names_name_both_plugins():
    with pytest.raises(PluginError, match=r"probe 'evaluate' is provided by two plugins: 'basinprobe' and .*Clash"):
        collect(make_plugin_manager(extra_plugins=[Clash()]))


class Misspelled:
    @hookimpl
    def basinprobe_probe(self):
        return []


def test_misspelled_hook_is_an_error():
    with pytest.raises(PluginError, match="basinprobe_probe"):
        make_plugin_manager(extra_plugins=[Misspelled()])


class FakeDist:
    name = "basinprobe-broken"


class FakeEntryPoint:
    name = "broken"
    value = "basinprobe_broken_plugin"
    group = "basinprobe"
    dist = FakeDist()

    def load(self):
        raise ImportError("No module named 'basinprobe_broken_plugin'")


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(monkeypatch):
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        return [FakeEntryPoint(), *real(**kw)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    registry = collect(make_plugin_manager())
    assert registry.broken == [("basinprobe-broken", "ImportError: No module named 'basinprobe_broken_plugin'")]
    assert "evaluate" in registry.probes


def test_disable_autoload_loads_only_the_builtins(monkeypatch):
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [FakeEntryPoint(), *real(**kw)])
    monkeypatch.setenv("BASINPROBE_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = collect(make_plugin_manager())
    assert registry.broken == [] and "evaluate" in registry.probes


def test_probes_command_lists_providers(cli):
    code, out, err = cli("probes")
    assert code == 0
    line = next(l for l in out.splitlines() if " evaluate " in l)
    assert "basinprobe" in line and "probe" in line


def test_schema_command_prints_merged_schema(cli):
    import json

    code, out, err = cli("schema")
    schema = json.loads(out)
    assert "probe.evaluate" in schema["definitions"]
    assert "mlp" in schema["properties"]["model"]["properties"]["kind"]["enum"]
    # draft-07 keywords only, so editors understand it
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "$defs" not in json.dumps(schema) and "unevaluatedProperties" not in json.dumps(schema)
