"""A probe entry's own sweep over its ``with:`` block: one dim of its group per swept parameter."""

import json
import re

import numpy as np
import pytest
import xarray as xr

from basinprobe.registry import Probe, ProbeError, collect_registry_with, hookimpl
from basinprobe.runtime import open_results
from basinprobe.runtime.execute import run_spec
from basinprobe.runtime.progress import Reporter
from basinprobe.runtime.spec import SpecError, load_spec
from conftest import TINY_SPEC

LLC = "{chains: 2, draws: 12, burn_in: 4, step_size: 0.001, nbeta: 10.0}"


def with_entries(*entries: str, spec: str = TINY_SPEC, out: str = "out.zarr") -> str:
    return spec.replace("  - {name: eval, probe: evaluate}", "\n".join(f"  - {e}" for e in entries)).replace(
        "out.zarr", out)


def test_a_swept_entry_equals_one_entry_per_value_bit_for_bit(write_spec, tmp_path):
    swept = with_entries(f"{{name: llc, probe: langevin, at: last, with: {LLC}, sweep: {{localization: [1.0, 30.0]}}}}",
                         "{name: hess, probe: hessian_spectrum, at: last, with: {density: false}, "
                         "sweep: {top_k: [2, 3]}}")
    assert run_spec(load_spec(write_spec(swept))).ok
    tree = open_results(tmp_path / "out.zarr")
    llc, hess = tree["llc"].to_dataset(), tree["hess"].to_dataset()
    assert llc["llc"].dims == ("seed", "checkpoint", "localization")
    assert llc["localization"].values.tolist() == [1.0, 30.0]
    assert hess["top_eigenvalues"].dims == ("seed", "checkpoint", "top_k", "k_top")
    assert hess["hvp_count"].dtype.kind == "i"   # counts stay integers where nothing is missing
    # the swept values are coordinates, not params; the sweep is recorded
    assert "localization" not in tree["llc"].attrs["params"] and tree["llc"].attrs["params"]["chains"] == 2
    assert tree["llc"].attrs["sweep"] == {"localization": [1.0, 30.0]}
    # top_k 2 is padded to 3 eigenvalues, and the padding is said to be padding
    top = hess["top_eigenvalues"]
    assert np.isnan(top.sel(top_k=2, k_top=3)).all() and np.isfinite(top.sel(top_k=3)).all()
    assert "padding" in top.attrs["nan_means"]
    for value, top_k in ((1.0, 2), (30.0, 3)):
        single = with_entries(f"{{name: llc, probe: langevin, at: last, with: "
                              f"{LLC[:-1]}, localization: {value}}}}}",
                              f"{{name: hess, probe: hessian_spectrum, at: last, with: {{density: false, top_k: {top_k}}}}}",
                              out=f"single{top_k}.zarr")
        assert run_spec(load_spec(write_spec(single, f"single{top_k}.yaml"))).ok
        alone = open_results(tmp_path / f"single{top_k}.zarr")
        # the same random numbers for every point of the sweep: only the parameter differs
        np.testing.assert_array_equal(llc["llc"].sel(localization=value).values, alone["llc"]["llc"].values)
        np.testing.assert_array_equal(llc["loss_trace"].sel(localization=value).values,
                                      alone["llc"]["loss_trace"].values)
        np.testing.assert_array_equal(top.sel(top_k=top_k).isel(k_top=slice(0, top_k)).values,
                                      alone["hess"]["top_eigenvalues"].values)
    assert not np.array_equal(llc["llc"].sel(localization=1.0), llc["llc"].sel(localization=30.0))


def test_batched_cells_give_the_swept_entry_the_same_results(write_spec, tmp_path):
    entry = f"{{name: llc, probe: langevin, at: last, with: {LLC}, sweep: {{localization: [1.0, 30.0]}}}}"
    assert run_spec(load_spec(write_spec(with_entries(entry)))).ok
    batched = with_entries(entry, out="batched.zarr") + "execution: {batch_cells: true}\n"
    assert run_spec(load_spec(write_spec(batched, "batched.yaml"))).ok
    a, b = open_results(tmp_path / "out.zarr")["llc"], open_results(tmp_path / "batched.zarr")["llc"]
    # float32: the batched gradient sums in another order
    np.testing.assert_allclose(a["llc"].values, b["llc"].values, rtol=1e-4, atol=1e-4)
    assert a["llc"].dims == b["llc"].dims


def test_query_selects_along_an_entry_sweep_and_plan_counts_its_runs(write_spec, cli, tmp_path):
    spec = write_spec(with_entries("{name: hess, probe: hessian_spectrum, at: last, "
                                   "with: {density: false, top_k: 2}, sweep: {operator: [hessian, ggn]}}"))
    code, out, _ = cli("plan", spec)
    assert code == 0 and "hess x2 (operator)" in out
    assert cli("run", spec, "-q")[0] == 0
    code, out, _ = cli("query", tmp_path / "out.zarr", "hess/loss", "--sel", "operator=ggn", "--format", "csv")
    assert code == 0 and out.count("\n") == 1 + 2   # header, two seeds
    tree = open_results(tmp_path / "out.zarr")
    top = tree["hess"]["top_eigenvalues"]
    assert top["operator"].values.tolist() == ["hessian", "ggn"]
    # the GGN and the Hessian are different operators away from a zero-residual minimum
    assert not np.allclose(top.sel(operator="hessian"), top.sel(operator="ggn"))


def test_a_group_probe_entry_can_sweep_its_parameters(write_spec, tmp_path):
    entry = "{name: mc, probe: mode_connectivity, at: last, with: {pairs: {sweep: seed}}, sweep: {alphas: [3, 5]}}"
    assert run_spec(load_spec(write_spec(with_entries(entry)))).ok
    mc = open_results(tmp_path / "out.zarr")["mc"].to_dataset()
    assert "alphas" in mc.dims and mc["alphas"].values.tolist() == [3, 5]
    barrier = next(name for name in mc.data_vars if "barrier" in name)
    assert np.isfinite(mc[barrier].sel(alphas=5).values).all()


def test_changing_an_entry_sweep_recomputes_that_entry_only(write_spec, tmp_path, monkeypatch):
    from basinprobe.runtime import execute

    first = with_entries("{name: eval, probe: evaluate}",
                         "{name: hess, probe: hessian_spectrum, at: last, with: {density: false}, sweep: {top_k: [2]}}")
    assert run_spec(load_spec(write_spec(first))).ok
    notes = []
    reporter = Reporter(quiet=True)
    monkeypatch.setattr(reporter, "note", notes.append)
    monkeypatch.setattr(execute, "train", lambda *a, **k: pytest.fail("the models were trained again"))
    report = run_spec(load_spec(write_spec(first.replace("top_k: [2]", "top_k: [2, 3]"))), reporter=reporter)
    assert report.ok and report.done == 2 and "kept eval; recomputing hess (changed)" in notes[0]
    assert open_results(tmp_path / "out.zarr")["hess"]["top_k"].values.tolist() == [2, 3]


@pytest.mark.parametrize("entry, line, message", [
    ("{probe: langevin, sweep: {localisation: [1.0, 10.0]}}", 11,
     r"sweep.localisation: langevin has no parameter 'localisation'; did you mean 'localization'"),
    ("{probe: langevin, sweep: {with.localization: [1.0, 10.0]}}", 11,
     r"paths lead into 'with:': write 'localization'"),
    ("{probe: hessian_spectrum, sweep: {data: [{split: train}], data.split: [test]}}", 11,
     r"'data.split' lies inside 'data', which is swept too; sweep one of them"),
    ("{probe: langevin, sweep: {localization: [1, 1.0]}}", 11, r"1.0 is the same point as the axis's value number 1"),
    ("{probe: langevin, sweep: {localization: [1.0, -2.0]}}", 11, r"-2.0 is out of range"),
    ("{probe: langevin, sweep: {localization: [1.0, 1.0]}}", 11, r"1.0 is the same point as the axis's value number 1"),
    ("{probe: langevin, with: {chains: 4}, sweep: {chains: [2, 8]}}", 11,
     r"'chains' is both set in 'with:' and swept; remove it from 'with:'"),
    ("{probe: hessian_spectrum, sweep: {method: [dense, lanczos]}}", 11,
     r"a sweep axis may not be named 'method' .*; write one entry per value instead"),
    ("{probe: langevin, with: {chains: 4}, sweep: {chains.x: [1]}}", 11, r"'chains.x' is not a path into the entry's 'with:' block"),
    ("{probe: langevin, sweep: {localization: []}}", 11, r"should be non-empty"),
])
def test_bad_entry_sweeps_are_errors_at_their_line(write_spec, entry, line, message):
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(write_spec(with_entries(entry)))
    assert re.search(rf"spec\.yaml:{line}:", str(caught.value)), str(caught.value)


@pytest.mark.parametrize("entry, path, message", [
    ("{probe: hessian_spectrum, sweep: {top_kk: [2, 4]}}", "top_kk", "no parameter 'top_kk'; did you mean 'top_k'"),
    ("{probe: lottery_subspace, sweep: {stability.kk: [1, 2]}}", "stability.kk",
     "no key 'kk' in 'stability'; did you mean 'k'? (known: k)"),
    ("{probe: hessian_spectrum, sweep: {data.splt: [train, test]}}", "data.splt", "no key 'splt' in 'data'"),
])
def test_an_unknown_parameter_is_reported_once_at_its_key(write_spec, entry, path, message):
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(with_entries(entry)))
    (problem,) = caught.value.problems
    assert problem.path == ("probes", 0, "sweep", path) and message in problem.message


def test_what_every_value_gets_wrong_is_said_once_at_the_key(write_spec):
    with pytest.raises(SpecError) as caught:   # a mapping without the required k, twice
        load_spec(write_spec(with_entries("{probe: lottery_subspace, sweep: {stability: [{}, {}]}}")))
    assert len(caught.value.problems) == 2   # the two values are the same point; the first lacks k
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(with_entries("{probe: langevin, sweep: {chains: [0, -1]}}")))
    assert len(caught.value.problems) == 2   # each value wrong in its own way: at its own column
    with pytest.raises(SpecError) as caught:   # both values carry the same unknown key
        load_spec(write_spec(with_entries("{probe: lottery_subspace, sweep: {stability: [{k: 2, x: 1}, {k: 3, x: 1}]}}")))
    (problem,) = caught.value.problems
    assert problem.path == ("probes", 0, "sweep", "stability", "x") and "unknown key 'x'" in problem.message


def test_a_bad_value_is_named_where_it_is_written(write_spec):
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(with_entries("{probe: hessian_spectrum, sweep: {operator: [hessian, gnn]}}")))
    (problem,) = caught.value.problems
    assert problem.path == ("probes", 0, "sweep", "operator", 1) and "did you mean 'ggn'" in problem.message


def test_values_of_mixed_kinds_are_text_labels_and_each_point_is_stored(write_spec, tmp_path):
    entries = (f"{{name: llc, probe: langevin, at: last, with: {LLC.replace(', step_size: 0.001', '')}, "
               "sweep: {step_size: [auto, 0.001]}}",
               "{name: sub, probe: lottery_subspace, at: last, with: {repeats: 1, steps: 5, dims: [2]}, "
               "sweep: {stability: [{k: 2}, false]}}",
               # a nested path into a parameter whose default is no mapping (stability: false)
               "{name: nested, probe: lottery_subspace, at: last, with: {repeats: 1, steps: 5, dims: [2]}, "
               "sweep: {stability.k: [2]}}")
    assert run_spec(load_spec(write_spec(with_entries(*entries)))).ok
    tree = open_results(tmp_path / "out.zarr")
    llc = tree["llc"].to_dataset()
    assert llc["step_size"].values.tolist() == ["auto", "0.001"]
    # the step size the probe reports cannot share the dim's name: it is kept beside it
    assert llc["step_size_result"].sel(step_size="0.001").values.tolist() == [[0.001], [0.001]]   # seed, checkpoint
    assert "stored_as" in llc["step_size_result"].attrs
    assert np.isfinite(llc["llc"].values).all() and np.isfinite(llc["step_size_result"].values).all()
    sub = tree["sub"].to_dataset()
    assert sub["stability"].values.tolist() == ['{"k":2}', "false"]
    finite = [name for name, var in sub.data_vars.items() if "stability" in var.dims and var.dtype.kind == "f"
              and "nan_means" not in var.attrs]
    assert finite and all(np.isfinite(sub[name].values).all() for name in finite)
    for value in (2, False):   # each point equals the entry with the value fixed
        fixed = with_entries(f"{{name: sub, probe: lottery_subspace, at: last, with: {{repeats: 1, steps: 5, "
                             f"dims: [2], stability: {json.dumps({'k': value} if value else value)}}}}}",
                             out=f"fixed{value}.zarr")
        assert run_spec(load_spec(write_spec(fixed, f"fixed{value}.yaml"))).ok
        alone = open_results(tmp_path / f"fixed{value}.zarr")["sub"]
        label = '{"k":2}' if value else "false"
        for name in finite:
            np.testing.assert_array_equal(sub[name].sel(stability=label).values, alone[name].values)
    assert tree["nested"]["k"].values.tolist() == [2]
    # the default the sweep replaced is no param of the group either
    assert "stability" not in tree["nested"].attrs["params"] and tree["nested"].attrs["sweep"] == {"stability.k": [2]}


def test_a_probe_dim_named_like_a_swept_parameter_fails_with_the_fix(write_spec):
    report = run_spec(load_spec(write_spec(with_entries(
        "{name: vol, probe: basin_volume, at: last, with: {directions: 8, estimators: [monte_carlo]}, "
        "sweep: {epsilon: [[0.01, 0.1], [0.2]]}}"))))
    assert len(report.failures) == 2
    assert "a dim 'epsilon' of their own, which the entry's sweep also names: give the values as one list in 'with:'" \
        in report.failures[0]


def test_a_probe_parameter_in_the_spec_sweep_points_to_the_entry_sweep(write_spec):
    spec = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep: {probes.0.with.splits: [[train], [test]]}")
    with pytest.raises(SpecError, match=r"'probes' cannot be swept here; a probe's parameters are swept in its entry"):
        load_spec(write_spec(spec))


class Scaled(Probe):
    """Returns a dim named like its parameter, and refuses one value in ``check``."""

    name = "scaled"
    schema = {"type": "object", "properties": {"factor": {"type": "number", "default": 1.0}},
              "additionalProperties": False}

    def check(self, params, n_params, n_train):
        if params["factor"] > n_params:
            raise ProbeError(f"factor {params['factor']} exceeds the {n_params} parameters; lower it")

    def run(self, ctx, params):
        return xr.Dataset({"value": ("factor", [params["factor"] * ctx.checkpoint])})


class Plugin:
    @hookimpl
    def basinprobe_probes(self):
        return [Scaled]


def test_a_probe_dim_named_like_a_swept_parameter_fails_its_cells_clearly(write_spec):
    registry = collect_registry_with(Plugin())
    spec = load_spec(write_spec(with_entries("{name: s, probe: scaled, sweep: {factor: [1.0, 2.0]}}")),
                     registry=registry)
    report = run_spec(spec, registry=registry)
    assert not report.ok and len(report.failures) == 6
    assert "the probe's results have a dim 'factor' of their own" in report.failures[0]


def test_probe_check_runs_for_every_point_of_an_entry_sweep(write_spec):
    registry = collect_registry_with(Plugin())
    spec = load_spec(write_spec(with_entries("{name: s, probe: scaled, sweep: {factor: [1.0, 1000.0]}}")),
                     registry=registry)
    with pytest.raises(SpecError, match=r"at probes.0.with: at factor=1000.0: factor 1000.0 exceeds the 51 "):
        run_spec(spec, registry=registry)


def test_labels_the_probe_gives_keep_its_order_where_points_differ_in_them(write_spec, tmp_path):
    spec = write_spec(with_entries("{name: ev, probe: evaluate, sweep: {splits: [[train], [train, test]]}}"))
    assert run_spec(load_spec(spec)).ok
    loss = open_results(tmp_path / "out.zarr")["ev"]["loss"]
    assert loss["split"].values.tolist() == ["train", "test"]   # not sorted: test, train
    assert np.isnan(loss.sel(splits='["train"]', split="test")).all()
    assert np.isfinite(loss.sel(splits='["train","test"]')).all()


def test_plot_puts_a_sweep_over_decades_on_a_log_axis(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from basinprobe.runtime import results

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    llc = xr.DataArray([3.7, 2.0, 0.9], dims=["localization"], coords={"localization": [1.0, 10.0, 100.0]}, name="llc")
    results.plot(llc, tmp_path / "a.png")
    results.plot(llc.assign_coords(localization=[1.0, 2.0, 3.0]), tmp_path / "b.png")
    assert [fig.axes[0].get_xscale() for fig in drawn] == ["log", "linear"]


def test_plot_draws_error_bars_from_a_standard_error_beside_the_variable(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from basinprobe.runtime import results

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    coords = {"seed": [0, 1], "hidden": ["[16]", "[48]"], "localization": [1.0, 10.0, 100.0]}
    llc = xr.DataArray(np.arange(12.0).reshape(2, 2, 3), dims=list(coords), coords=coords, name="llc")
    results.plot(llc.sel(seed=0, hidden="[16]"), tmp_path / "a.png", 0.1 + 0 * llc.sel(seed=0, hidden="[16]"))
    results.plot(llc, tmp_path / "b.png", 0.1 + 0 * llc)
    one, facets = drawn
    assert len(one.axes[0].containers) == 1
    # a facet per seed, a line per width: each line has its bars
    assert [len(ax.containers) for ax in facets.axes if ax.get_lines()] == [2, 2]


def test_the_plot_command_finds_the_standard_error(write_spec, cli, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from basinprobe.runtime import results

    assert run_spec(load_spec(write_spec(with_entries(
        f"{{name: llc, probe: langevin, at: last, with: {LLC}, sweep: {{localization: [1.0, 100.0]}}}}")))).ok
    passed = []
    monkeypatch.setattr(results, "plot", lambda obj, out, stderr=None: passed.append(stderr) or out)
    assert cli("plot", tmp_path / "out.zarr", "llc/llc", "--sel", "seed=0", "-o", tmp_path / "p.png")[0] == 0
    assert passed[0] is not None and passed[0].name == "llc_stderr"
