"""Assembling a store writes each cell's arrays into place when the cells are alike; the result
must be exactly what aligning them with xr.merge gives."""

import numpy as np
import pytest
import xarray as xr

from basinprobe.registry import Probe, ProbeError, collect_registry_with
from basinprobe.runtime import open_results
from basinprobe.runtime import store as store_module
from basinprobe.runtime.execute import run_spec
from basinprobe.runtime.spec import load_spec
from conftest import TINY_SPEC
from test_run import Flaky, plugin_with

pytestmark = pytest.mark.filterwarnings("ignore:not near a minimum")

SWEEP_SPEC = """
version: 1
name: assembly
seed: 0
device: cpu
dtype: float64
model: {kind: mlp, with: {in: 3, hidden: [4], out: 2, activation: tanh}}
data: {kind: gaussian_mixture, with: {n: 40, in: 3, classes: 2}, batch_size: 20}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}
sweep: {seed: [0, 1], model.with.activation: [tanh, relu], model.with.hidden: [[4], [5]]}
probes:
  - {name: eval, probe: evaluate}
  - {name: hess, probe: hessian_spectrum, at: [20], with: {method: dense}}
  - {name: jac, probe: behavioral_gradients, at: [0]}
  - {name: flaky, probe: flaky}
  - {name: mc, probe: mode_connectivity, at: last, with: {pairs: {sweep: seed}, alphas: 3, align: [none], init_to_final: true}}
output: out.zarr
"""


def stores(write_spec, tmp_path, monkeypatch, text):
    """The store assembled as it is, and again with every group aligned by xr.merge; and which
    groups were written into place."""
    registry = collect_registry_with(plugin_with(Flaky))
    alike = []
    combine_alike = store_module._combine_alike

    def recording(cells, dims, order, failed=()):
        result = combine_alike(cells, dims, order, failed)
        alike.append(result is not None)
        return result

    monkeypatch.setattr(store_module, "_combine_alike", recording)
    run_spec(load_spec(write_spec(text), registry=registry), registry=registry)
    fast = open_results(tmp_path / "out.zarr")
    monkeypatch.setattr(store_module, "_combine_alike", lambda cells, dims, order, failed=(): None)
    run_spec(load_spec(write_spec(text.replace("out.zarr", "merged.zarr")), registry=registry), registry=registry)
    return fast, open_results(tmp_path / "merged.zarr"), alike


def assert_same_groups(fast, merged):
    """Every group identical; in ``_status``, all but each cell's time."""
    assert set(fast.children) == set(merged.children)
    for name in fast.children:
        if name == "_status":
            def untimed(tree):
                return {key: {k: v for k, v in record.items() if k != "seconds"}
                        for key, record in tree["_status"].attrs["cells"].items()}
            assert untimed(fast) == untimed(merged)
        else:
            xr.testing.assert_identical(fast[name].to_dataset(), merged[name].to_dataset())


def test_cells_written_into_place_equal_the_merged_ones(write_spec, tmp_path, monkeypatch):
    fast, merged, alike = stores(write_spec, tmp_path, monkeypatch, SWEEP_SPEC)
    # eval, flaky (failed cells: NaN) and mc (whose variables carry seed) go into place; hess, jac
    # and _checkpoints differ in size across the hidden widths, so xr.merge aligns them
    assert alike.count(True) >= 2 and alike.count(False) >= 2
    assert_same_groups(fast, merged)
    loss = fast["eval"]["loss"]
    assert loss.dims[:4] == ("seed", "activation", "hidden", "checkpoint")
    assert loss["activation"].values.tolist() == ["tanh", "relu"] and loss["hidden"].values.tolist() == ["[4]", "[5]"]
    assert np.isnan(fast["flaky"]["value"].sel(seed=1, checkpoint=10)).all()
    # NaN that no cell stored says why: a failed cell, or padding of the smaller width
    assert fast["flaky"]["value"].attrs["nan_means"] == store_module.FAILED_CELL
    assert fast["jac"]["singular_values"].attrs["nan_means"] == store_module.PADDED
    assert "nan_means" not in fast["hess"]["top_eigenvalues"].attrs


@pytest.mark.parametrize("width", [[4], [5]])
def test_a_sweep_of_one_width_is_written_into_place_whole(write_spec, tmp_path, monkeypatch, width):
    text = SWEEP_SPEC.replace("model.with.hidden: [[4], [5]]", f"model.with.hidden: [{width}]")
    fast, merged, alike = stores(write_spec, tmp_path, monkeypatch, text)
    assert all(alike)
    assert_same_groups(fast, merged)


class Sometimes(Probe):
    """Fails on one cell while ``failing`` is set (a cell that a rerun retries)."""
    name = "sometimes"
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    failing = True

    def run(self, ctx, params):
        if Sometimes.failing and ctx.cell["seed"] == 1 and ctx.checkpoint == 10:
            raise ProbeError("not this time")
        # with an attr that differs between cells, which a rerun must not lose
        return xr.Dataset({"value": ("k", np.arange(3.0) + ctx.checkpoint + 100 * ctx.cell["seed"])},
                          attrs={"step": ctx.checkpoint})


def test_a_rerun_merges_retried_cells_into_the_assembled_groups_and_leaves_finished_ones(write_spec, tmp_path,
                                                                                          monkeypatch):
    registry = collect_registry_with(plugin_with(Sometimes))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: some, probe: sometimes}")
    spec = load_spec(write_spec(text), registry=registry)
    monkeypatch.setattr(Sometimes, "failing", True)
    assert len(run_spec(spec, registry=registry).failures) == 1
    eval_written = (tmp_path / "out.zarr" / "eval" / "zarr.json").stat().st_mtime_ns
    monkeypatch.setattr(Sometimes, "failing", False)
    report = run_spec(spec, registry=registry)
    assert report.ok and report.done == 1    # only the failed cell ran again
    # the eval group had nothing new: it was left as it was
    assert (tmp_path / "out.zarr" / "eval" / "zarr.json").stat().st_mtime_ns == eval_written
    resumed = open_results(tmp_path / "out.zarr")
    fresh_spec = load_spec(write_spec(text.replace("out.zarr", "fresh.zarr"), "fresh.yaml"), registry=registry)
    assert run_spec(fresh_spec, registry=registry).ok
    fresh = open_results(tmp_path / "fresh.zarr")
    for name in ("eval", "some", "_checkpoints"):
        xr.testing.assert_identical(resumed[name].to_dataset(), fresh[name].to_dataset())
    assert resumed["some"]["value"].sel(seed=1, checkpoint=10).values.tolist() == [110.0, 111.0, 112.0]
    assert resumed["some"].attrs["step"] == "varies by cell: 0; 10; 20"
    assert run_spec(spec, registry=registry).done == 0


class FailsOnSeedOne(Probe):
    """Fails on every cell of seed 1, and stores a NaN it explains on the others."""
    name = "fails_on_seed_one"
    schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def run(self, ctx, params):
        if ctx.cell["seed"] == 1:
            raise ProbeError("cannot measure seed 1")
        return xr.Dataset({"value": ("k", [float(ctx.checkpoint), np.nan], {"nan_means": "no second value"}),
                           "count": ((), ctx.checkpoint)})


def test_a_coordinate_whose_every_cell_failed_keeps_its_place_and_says_why(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(FailsOnSeedOne))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: half, probe: fails_on_seed_one}")
    assert len(run_spec(load_spec(write_spec(text), registry=registry), registry=registry).failures) == 3
    tree = open_results(tmp_path / "out.zarr")
    half = tree["half"].to_dataset()
    # the group has the shape of its neighbours, so that arithmetic across groups does not drop seed 1
    assert half["seed"].values.tolist() == tree["eval"]["seed"].values.tolist() == [0, 1]
    assert half["checkpoint"].values.tolist() == [0, 10, 20]
    np.testing.assert_array_equal(half["value"].sel(seed=0), [[0.0, np.nan], [10.0, np.nan], [20.0, np.nan]])
    assert np.isnan(half["value"].sel(seed=1)).all() and np.isnan(half["count"].sel(seed=1)).all()
    assert half["count"].sel(seed=0).values.tolist() == [0, 10, 20]
    for name in ("value", "count"):
        own = ["no second value"] if name == "value" else []
        assert half[name].attrs["nan_means"].split(store_module.OR) == own + [store_module.FAILED_CELL]
    assert len(half.attrs["failed"]) == 3
    assert store_module.FAILED_CELL not in tree["eval"]["loss"].attrs.get("nan_means", "")


def test_querying_a_group_whose_every_cell_failed_says_so(write_spec, tmp_path, cli):
    registry = collect_registry_with(plugin_with(FailsOnSeedOne))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: half, probe: fails_on_seed_one}")
    spec = load_spec(write_spec(text.replace("seed: [0, 1]", "seed: [1]")), registry=registry)
    assert len(run_spec(spec, registry=registry).failures) == 3
    code, out, err = cli("query", str(tmp_path / "out.zarr"), "half")
    assert code == 2 and "group 'half' holds no results: its 3 cell(s) failed, e.g. seed=1,checkpoint=0: " \
                          "cannot measure seed 1" in err
    code, out, _ = cli("query", str(tmp_path / "out.zarr"))
    assert code == 0 and out.count("FAILED seed=1") == 3
    # the group still has its cells' coordinates
    half = open_results(tmp_path / "out.zarr")["half"].to_dataset()
    assert half["seed"].values.tolist() == [1] and half["checkpoint"].values.tolist() == [0, 10, 20]
