"""End to end: spec -> run -> store -> query, resume, failures."""

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from basinprobe.registry import Probe, ProbeError, collect_registry_with, hookimpl, load_registry
from basinprobe.runtime import open_results
from basinprobe.runtime.execute import run_spec
from basinprobe.runtime.progress import Reporter
from basinprobe.runtime.spec import SpecError, load_spec
from basinprobe.runtime.store import StoreMismatch
from conftest import TINY_SPEC


def test_run_writes_labelled_cells_and_query_reads_them(tiny_spec, cli, tmp_path):
    code, out, err = cli("run", tiny_spec, "-q")
    assert code == 0, err
    tree = open_results(tmp_path / "out.zarr")
    loss = tree["eval"]["loss"]
    assert loss.dims == ("seed", "checkpoint", "split")
    assert loss["seed"].values.tolist() == [0, 1]
    assert loss["checkpoint"].values.tolist() == [0, 10, 20]
    assert loss["split"].values.tolist() == ["train", "test"]
    assert np.isfinite(loss.values).all()
    # training lowers the training loss
    assert (loss.sel(split="train", checkpoint=20) < loss.sel(split="train", checkpoint=0)).all()
    assert tree["eval"].attrs["params"] == {"splits": ["train", "test"]}
    assert tree["eval"].attrs["plugin"] == "basinprobe" and tree["eval"].attrs["probe"] == "evaluate"
    root = tree.attrs
    assert root["spec"] == tiny_spec.read_text() and len(root["spec_sha256"]) == 64
    assert {"basinprobe_version", "created", "torch_version", "device", "dtype"} <= set(root)
    params = tree["_checkpoints"]["params"]
    assert params.dims == ("seed", "checkpoint", "param") and params.sizes["param"] == 4 * 6 + 6 + 6 * 3 + 3
    assert not (tmp_path / "out.zarr" / "_cells").exists()

    code, out, err = cli("query", tmp_path / "out.zarr")
    assert "eval/" in out and "loss(seed, checkpoint, split)" in out
    code, out, err = cli("query", tmp_path / "out.zarr", "eval/accuracy", "--sel", "seed=1", "--sel", "split=test",
                         "--format", "json")
    records = json.loads(out)
    assert [r["checkpoint"] for r in records] == [0, 10, 20]
    assert records[2]["accuracy"] == pytest.approx(float(tree["eval"]["accuracy"].sel(seed=1, split="test",
                                                                                        checkpoint=20)))
    code, out, err = cli("query", tmp_path / "out.zarr", "eval/loss", "--sel", "seed=7")
    assert code == 2 and "seed=7 is not in the store" in err


def test_query_reads_a_store_without_importing_torch(tiny_spec, cli, tmp_path):
    """Reading results needs xarray and zarr only; torch's import alone takes ~2 s."""
    assert cli("run", tiny_spec, "-q")[0] == 0
    script = textwrap.dedent(f"""
        import sys
        from basinprobe.runtime.cli import main
        assert main(["query", {str(tmp_path / "out.zarr")!r}, "eval/loss", "--sel", "seed=0"]) == 0
        print("torch imported:", "torch" in sys.modules)
        assert main(["query", {str(tmp_path / "out.zarr")!r}, "eval/loss", "--sel", "seed=7"]) == 2
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "checkpoint" in done.stdout and "torch imported: False" in done.stdout
    assert "seed=7 is not in the store" in done.stderr   # the error path still exits 2 with the message


def test_checkpoint_parameters_recompute_the_stored_loss(tiny_spec, cli, tmp_path):
    import torch

    from basinprobe.runtime.datasets import gaussian_mixture
    from basinprobe.runtime.models import make_mlp
    from basinprobe.runtime.train import set_flat

    assert cli("run", tiny_spec, "-q")[0] == 0
    tree = open_results(tmp_path / "out.zarr")
    flat = torch.tensor(tree["_checkpoints"]["params"].sel(seed=1, checkpoint=10).values)
    model = make_mlp(**{"in": 4, "hidden": [6], "out": 3, "activation": "tanh"})
    set_flat(model, flat.float())
    data = gaussian_mixture(seed=0, n=60, **{"in": 4}, classes=3)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(data.X_train), data.y_train)
    assert float(loss) == pytest.approx(float(tree["eval"]["loss"].sel(seed=1, checkpoint=10, split="train")), rel=1e-5)


def test_probe_at_selects_checkpoints(write_spec, cli, tmp_path):
    spec = write_spec(TINY_SPEC.replace("  - {name: eval, probe: evaluate}",
                                        "  - {name: eval, probe: evaluate}\n  - {name: final, probe: evaluate, at: last}\n"
                                        "  - {name: some, probe: evaluate, at: [0, 20]}"))
    assert cli("run", spec, "-q")[0] == 0
    tree = open_results(tmp_path / "out.zarr")
    assert tree["final"]["loss"]["checkpoint"].values.tolist() == [20]
    assert tree["some"]["loss"]["checkpoint"].values.tolist() == [0, 20]
    assert tree["eval"]["loss"]["checkpoint"].values.tolist() == [0, 10, 20]


def test_sweep_over_list_values_labels_and_pads(write_spec, cli, tmp_path):
    spec = write_spec(TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep:\n  model.with.hidden: [[6], [2, 3]]\n  seed: [0]"))
    assert cli("run", spec, "-q")[0] == 0
    tree = open_results(tmp_path / "out.zarr")
    assert tree["eval"]["loss"].dims[:3] == ("hidden", "seed", "checkpoint")
    assert tree["eval"]["loss"]["hidden"].values.tolist() == ["[6]", "[2,3]"]
    n = tree["_checkpoints"]["n_params"].sel(seed=0)
    assert n.values.tolist() == [4 * 6 + 6 + 6 * 3 + 3, 4 * 2 + 2 + 2 * 3 + 3 + 3 * 3 + 3]
    padded = tree["_checkpoints"]["params"].sel(seed=0, hidden="[2,3]", checkpoint=0).values
    assert np.isnan(padded[int(n[1]):]).all() and np.isfinite(padded[: int(n[1])]).all()


def test_same_seed_gives_bit_identical_results(write_spec, cli, tmp_path):
    a = write_spec(TINY_SPEC.replace("out.zarr", "a.zarr"), "a.yaml")
    b = write_spec(TINY_SPEC.replace("out.zarr", "b.zarr"), "b.yaml")
    assert cli("run", a, "-q")[0] == 0 and cli("run", b, "-q")[0] == 0
    ta, tb = open_results(tmp_path / "a.zarr"), open_results(tmp_path / "b.zarr")
    assert np.array_equal(ta["_checkpoints"]["params"].values, tb["_checkpoints"]["params"].values)
    assert np.array_equal(ta["eval"]["loss"].values, tb["eval"]["loss"].values)
    assert not np.array_equal(ta["_checkpoints"]["params"].sel(seed=0).values,
                              ta["_checkpoints"]["params"].sel(seed=1).values)


def test_rerun_skips_finished_cells(tiny_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    before = open_results(tmp_path / "out.zarr")["eval"]["loss"].values.copy()
    code, out, err = cli("run", tiny_spec, "-q")
    assert code == 0 and "0 cell results written, 6 kept" in out
    assert np.array_equal(open_results(tmp_path / "out.zarr")["eval"]["loss"].values, before)


def test_a_zarr_store_basinprobe_did_not_write_is_never_replaced(tiny_spec, cli, tmp_path):
    xr.Dataset({"theirs": ("x", np.arange(3.0))}).to_zarr(tmp_path / "out.zarr", zarr_format=3, consolidated=False)
    for extra in ((), ("--overwrite",)):
        code, out, err = cli("run", tiny_spec, "-q", *extra)
        assert code == 2 and "is a Zarr store that basinprobe did not write" in err
    assert xr.open_zarr(tmp_path / "out.zarr", consolidated=False)["theirs"].values.tolist() == [0.0, 1.0, 2.0]


def test_an_output_that_cannot_be_created_is_a_clear_error(tiny_spec, cli, tmp_path):
    (tmp_path / "afile.txt").write_text("")
    code, out, err = cli("run", tiny_spec, "-q", "-o", str(tmp_path / "afile.txt" / "x.zarr"))
    assert code == 2 and f"cannot create the output {tmp_path / 'afile.txt' / 'x.zarr'}" in err
    assert "Traceback" not in err


def test_comments_layout_and_execution_do_not_make_another_spec(tiny_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    text = tiny_spec.read_text()
    edited = "# the same spec, reformatted\n" + text.replace("seed: 0\n", "seed: 0   # of the model\n")
    # a default written out is the same spec as one left out
    tiny_spec.write_text(edited + "execution: {batch_cells: true}\ndtype: float32\n")
    code, out, err = cli("run", tiny_spec, "-q")
    assert code == 0 and "0 cell results written, 6 kept" in out


def test_the_order_of_sweep_axes_is_part_of_the_spec(write_spec, cli):
    # the order numbers the sweep points and orders the dims: resuming across it lost a point
    two = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep: {seed: [0, 1], data.seed: [3, 4]}")
    assert cli("run", write_spec(two), "-q")[0] == 0
    code, out, err = cli("run", write_spec(two.replace("{seed: [0, 1], data.seed: [3, 4]}",
                                                       "{data.seed: [3, 4], seed: [0, 1]}")), "-q")
    assert code == 2 and "different spec" in err


def test_axes_sharing_a_last_key_are_named_by_the_keys_that_tell_them_apart(write_spec, cli, tmp_path):
    text = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep: {seed: [0, 1], data.seed: [3, 4]}")
    assert cli("run", write_spec(text), "-q")[0] == 0
    loss = open_results(tmp_path / "out.zarr")["eval"]["loss"]
    assert loss.dims[:3] == ("seed", "data_seed", "checkpoint") and loss["data_seed"].values.tolist() == [3, 4]
    # another data seed is another data set: the untrained models' losses differ
    first = loss.sel(seed=0, checkpoint=0, split="train")
    assert first.sel(data_seed=3) != first.sel(data_seed=4)


def test_a_store_is_amended_when_only_its_probes_change_without_training_again(write_spec, tmp_path, monkeypatch):
    from basinprobe.runtime import execute

    first = TINY_SPEC.replace("  - {name: eval, probe: evaluate}",
                              "  - {name: eval, probe: evaluate}\n"
                              "  - {name: hess, probe: hessian_spectrum, at: last, with: {top_k: 2}}\n"
                              "  - {name: gone, probe: evaluate, at: first, with: {splits: [test]}}")
    assert run_spec(load_spec(write_spec(first))).ok
    second = TINY_SPEC.replace("  - {name: eval, probe: evaluate}",
                               "  - {name: eval, probe: evaluate}\n"
                               "  - {name: hess, probe: hessian_spectrum, at: last, with: {top_k: 3}}\n"
                               "  - {name: norms, probe: behavioral_gradients, at: last, with: {inputs: 8}}")
    # with another version of the code, the store is not amended: it is left exactly as it was
    written = {f: f.read_bytes() for f in (tmp_path / "out.zarr").rglob("*") if f.is_file()}
    upgraded = {**execute.code_versions(load_registry(), {}), "basinprobe": "99.0"}
    monkeypatch.setattr(execute, "code_versions", lambda registry, components: upgraded)
    with pytest.raises(StoreMismatch, match="installed: 99.0"):
        run_spec(load_spec(write_spec(second)))
    assert {f: f.read_bytes() for f in (tmp_path / "out.zarr").rglob("*") if f.is_file()} == written
    monkeypatch.undo()
    monkeypatch.setattr(execute, "train", lambda *a, **k: pytest.fail("the models were trained again"))
    notes = []
    reporter = Reporter(quiet=True)
    monkeypatch.setattr(reporter, "note", notes.append)
    report = run_spec(load_spec(write_spec(second)), reporter=reporter)
    assert report.ok and report.skipped == 6 and report.done == 2 + 2   # eval kept; hess and norms at 2 cells
    assert notes[0].endswith("the spec's probes changed and its training did not: kept eval; recomputing hess "
                             "(changed); adding norms; dropping gone (no longer in the spec)")
    monkeypatch.undo()
    amended = open_results(tmp_path / "out.zarr")
    assert run_spec(load_spec(write_spec(second.replace("out.zarr", "fresh.zarr"), "fresh.yaml"))).ok
    fresh = open_results(tmp_path / "fresh.zarr")
    assert set(amended.children) == set(fresh.children) and "gone" not in amended.children
    for name in ("eval", "hess", "norms", "_checkpoints"):
        xr.testing.assert_identical(amended[name].to_dataset(), fresh[name].to_dataset())
    assert amended.attrs["spec_sha256"] == fresh.attrs["spec_sha256"]
    assert not any(key.endswith("/gone") for key in amended["_status"].attrs["cells"])
    assert amended.attrs["code_versions"] == fresh.attrs["code_versions"]
    # training that changes is still another spec
    with pytest.raises(StoreMismatch, match="different spec"):
        run_spec(load_spec(write_spec(second.replace("lr: 0.1", "lr: 0.2"))))


def test_dtype_and_device_cannot_be_swept(write_spec):
    for key, values in (("dtype", "[float32, float64]"), ("device", "[cpu, cuda]")):
        with pytest.raises(SpecError, match=rf"sweep.{key}: '{key}' cannot be swept"):
            load_spec(write_spec(TINY_SPEC.replace("sweep: {seed: [0, 1]}", f"sweep: {{{key}: {values}}}")))


def test_a_different_spec_is_refused_unless_overwrite(tiny_spec, write_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    other = write_spec(TINY_SPEC.replace("steps: 20", "steps: 30").replace("at: [0, 10, 20]", "at: [0, 30]"), "other.yaml")
    code, out, err = cli("run", other, "-q")
    assert code == 2 and "different spec" in err and "--overwrite" in err
    assert open_results(tmp_path / "out.zarr")["eval"]["loss"]["checkpoint"].values.tolist() == [0, 10, 20]
    assert cli("run", other, "-q", "--overwrite")[0] == 0
    assert open_results(tmp_path / "out.zarr")["eval"]["loss"]["checkpoint"].values.tolist() == [0, 30]


def test_a_store_resumes_only_with_the_code_versions_that_computed_it(tiny_spec, cli, tmp_path, monkeypatch):
    from basinprobe.runtime import execute, plan

    assert cli("run", tiny_spec, "-q")[0] == 0
    tree = open_results(tmp_path / "out.zarr")
    assert tree.attrs["code_versions"]["basinprobe"] == tree["eval"].attrs["plugin_version"] == \
        importlib.metadata.version("basinprobe")
    written = {f: f.read_bytes() for f in (tmp_path / "out.zarr").rglob("*") if f.is_file()}
    upgraded = {**plan.code_versions(load_registry(), {}), "basinprobe": "99.0"}
    monkeypatch.setattr(execute, "code_versions", lambda registry, components: upgraded)
    code, out, err = cli("run", tiny_spec, "-q")
    assert code == 2 and f"computed with basinprobe {importlib.metadata.version('basinprobe')} (installed: 99.0)" in err
    assert "--overwrite" in err
    assert {f: f.read_bytes() for f in (tmp_path / "out.zarr").rglob("*") if f.is_file()} == written
    assert cli("run", tiny_spec, "-q", "--overwrite")[0] == 0
    assert open_results(tmp_path / "out.zarr").attrs["code_versions"]["basinprobe"] == "99.0"


def plugin_with(*probes):
    """A plugin whose one hook contributes ``probes``, as an installed distribution's would."""

    class Plugin:
        @hookimpl
        def basinprobe_probes(self):
            return list(probes)

    return Plugin()


class Flaky(Probe):
    name = "flaky"
    schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def run(self, ctx, params):
        if ctx.cell["seed"] == 1 and ctx.checkpoint == 10:
            raise ProbeError("cannot measure this cell: try a smaller step")
        if ctx.cell["seed"] == 0 and ctx.checkpoint == 20:
            return xr.Dataset({"value": float("nan")})
        return xr.Dataset({"value": float(ctx.checkpoint)})


def test_a_failing_probe_records_the_cell_and_the_rest_finish(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(Flaky))
    spec = load_spec(write_spec(TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: flaky, probe: flaky}")),
                     registry=registry)
    report = run_spec(spec, registry=registry)
    assert not report.ok and len(report.failures) == 2
    assert any("seed=1,checkpoint=10 flaky: cannot measure this cell: try a smaller step" in f for f in report.failures)
    assert any("seed=0,checkpoint=20 flaky: variable 'value' holds NaN" in f for f in report.failures)
    tree = open_results(tmp_path / "out.zarr")
    value = tree["flaky"]["value"]
    assert value.sel(seed=0, checkpoint=10) == 10 and value.sel(seed=1, checkpoint=20) == 20
    assert np.isnan(value.sel(seed=1, checkpoint=10)) and np.isnan(value.sel(seed=0, checkpoint=20))
    assert len(tree["flaky"].attrs["failed"]) == 2
    assert np.isfinite(tree["eval"]["loss"].values).all()
    # the failed cells are retried on the next run; the finished ones are kept
    again = run_spec(spec, registry=registry)
    assert again.skipped == 6 + 4 and len(again.failures) == 2


class Misshapen(Probe):
    """Fails inside torch: a layer fed inputs of the wrong width."""
    name = "misshapen"
    schema = {"type": "object", "properties": {}, "additionalProperties": False}

    def run(self, ctx, params):
        return torch.nn.Linear(2, 3)(torch.zeros(4, 5))   # the line a failure must name


def test_a_failure_inside_torch_names_the_probes_line_and_keeps_the_traceback(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(Misshapen))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: bad, probe: misshapen}")
    report = run_spec(load_spec(write_spec(text), registry=registry), registry=registry)
    line = next(i for i, text in enumerate(open(__file__), 1) if "the line a failure must name" in text)
    assert len(report.failures) == 6
    assert all(f"RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 2x3) (at {__file__}:{line}, in "
               in failure and "torch/nn/modules/linear.py:" in failure for failure in report.failures)
    cells = open_results(tmp_path / "out.zarr")["_status"].attrs["cells"]
    failed = [record for key, record in cells.items() if key.endswith("/bad")]
    assert len(failed) == 6 and all(r["traceback"].startswith("Traceback") and "in run\n" in r["traceback"]
                                    for r in failed)
    assert not any("traceback" in record for key, record in cells.items() if key.endswith("/eval"))
    # every cell's time is kept, failed or not
    assert all(record["seconds"] >= 0 for record in cells.values())


def test_probe_warnings_are_printed_once_with_their_cells_and_stored(write_spec, cli, tmp_path, recwarn):
    # an untrained model is not at a minimum: hessian_spectrum warns for each of the two cells
    spec = write_spec(TINY_SPEC.replace("probe: evaluate}", "probe: hessian_spectrum, at: [0], with: {top_k: 3}}"))
    code, out, err = cli("run", spec, "-q")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "not near a minimum" in line]
    assert [line.split(": not near")[0] for line in lines] == ["warning: seed=0,checkpoint=0 eval",
                                                                "warning: seed=1,checkpoint=0 eval"]
    assert "ctx.warn(" not in err and not [w for w in recwarn if "not near a minimum" in str(w.message)]
    stored = open_results(tmp_path / "out.zarr")["eval"].attrs["warnings"]
    assert len(stored) == 2 and all("not near a minimum" in w for w in stored)
    code, out, err = cli("query", tmp_path / "out.zarr")
    assert out.count("  WARNING seed=") == 2 and "WARNING seed=1,checkpoint=0: not near a minimum" in out


def test_diverging_training_fails_its_cells_with_advice(write_spec, cli, tmp_path):
    # gradient descent on a quadratic with lr far above 2/lambda_max blows up geometrically
    spec = write_spec(TINY_SPEC.replace("lr: 0.1", "lr: 50.0").replace("hidden: [6], out: 3", "hidden: [], out: 1").replace(
        "{kind: gaussian_mixture, with: {n: 60, in: 4, classes: 3}, batch_size: 32}",
        "{kind: teacher_student, with: {n: 60, in: 4}, batch_size: 32}").replace("cross_entropy", "mse").replace(
        "steps: 20", "steps: 200").replace("at: [0, 10, 20]", "at: [0, 200]"))
    code, out, err = cli("run", spec, "-q")
    assert code == 1 and "training diverged" in err and "lower train.optimizer.lr" in err
    # the checkpoints before the divergence (here the initialization) are measured
    loss = open_results(tmp_path / "out.zarr")["eval"]["loss"]
    assert np.isfinite(loss.sel(checkpoint=0)).all() and np.isnan(loss.sel(checkpoint=200)).all()
    assert err.count("no checkpoint at step 200: training diverged at step") == 2
    # a rerun retries the failed cells from the stored checkpoints, without training again, and
    # says why they have none as the first run did
    first = err.count("no checkpoint at step 200: training diverged at step")
    code, out, err = cli("run", spec, "-q")
    assert code == 1 and "2 kept from an earlier run" in out
    assert err.count("no checkpoint at step 200: training diverged at step") == first == 2
    assert "lower train.optimizer.lr (now 50.0)" in err


def test_cells_before_a_divergence_are_measured_and_match_an_undiverged_run(write_spec, tmp_path, monkeypatch):
    import dataclasses

    from basinprobe.runtime import execute, train

    def diverging_after_ten(model, data, loss_fn, cfg, generator, progress=None):
        """Training as it is up to step 10, then a divergence."""
        short = dataclasses.replace(cfg, steps=10, checkpoint_steps=(0, 10))
        reached = train.train(model, data, loss_fn, short, generator, progress)
        raise train.TrainingDiverged("training diverged at step 11 (loss nan); lower train.optimizer.lr", reached)

    monkeypatch.setattr(execute, "train", diverging_after_ten)
    report = run_spec(load_spec(write_spec(TINY_SPEC)))
    assert report.done == 4 and len(report.failures) == 2
    monkeypatch.undo()
    ref = TINY_SPEC.replace("steps: 20, checkpoints: {at: [0, 10, 20]}", "steps: 10, checkpoints: {at: [0, 10]}")
    assert run_spec(load_spec(write_spec(ref.replace("out.zarr", "ref.zarr"), "ref.yaml"))).ok
    got, want = open_results(tmp_path / "out.zarr"), open_results(tmp_path / "ref.zarr")
    np.testing.assert_array_equal(got["eval"]["loss"].sel(checkpoint=[0, 10]).values, want["eval"]["loss"].values)
    assert np.isnan(got["eval"]["loss"].sel(checkpoint=20)).all()
    assert "no checkpoint at step 20: training diverged at step 11" in got["eval"].attrs["failed"][0]


def test_killed_run_resumes_to_the_same_store(write_spec, tmp_path):
    slow = TINY_SPEC.replace("seed: [0, 1]", "seed: [0, 1, 2, 3]").replace("steps: 20", "steps: 400").replace(
        "at: [0, 10, 20]", "every: 100")
    spec = write_spec(slow)
    reference = write_spec(slow.replace("out.zarr", "ref.zarr"), "ref.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "basinprobe.runtime.cli", "run", str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    staged = tmp_path / "out.zarr" / "_cells"

    def finished():
        # stage.json is moved into place whole, so a readable one is a finished cell
        marks = [json.loads(p.read_text()) for p in staged.glob("p*/eval/stage.json")]
        return sum(1 for m in marks if m.get("basinprobe_complete"))

    deadline = time.time() + 120
    while time.time() < deadline and finished() < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = finished()
    assert finished_before >= 3, "the run finished too few cells before it was killed"
    assert not (tmp_path / "out.zarr" / "eval").exists()
    resumed = subprocess.run([sys.executable, "-m", "basinprobe.runtime.cli", "run", str(spec)],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from an earlier run" in resumed.stdout
    kept = int(resumed.stdout.split(" written, ")[1].split(" kept")[0])
    assert finished_before <= kept < 20  # nothing finished was redone, and the rest was run
    whole = subprocess.run([sys.executable, "-m", "basinprobe.runtime.cli", "run", str(reference)],
                           capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr
    a, b = open_results(tmp_path / "out.zarr"), open_results(tmp_path / "ref.zarr")
    assert np.array_equal(a["eval"]["loss"].values, b["eval"]["loss"].values)
    assert np.array_equal(a["_checkpoints"]["params"].values, b["_checkpoints"]["params"].values)


def test_at_naming_a_step_that_is_no_checkpoint_is_a_spec_error(write_spec, cli, tmp_path):
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate, at: [0, 15]}")
    code, out, err = cli("validate", write_spec(text))
    assert code == 2 and "spec.yaml:11:" in err and ("at probes.0.at: 15 is not a checkpoint at sweep point seed=0 (its checkpoint "
                                           "steps: 0, 10, 20); pick from those, or add them to train.checkpoints.at") in err


def test_ctrl_c_while_the_store_is_assembled_is_held_until_it_is_whole(tiny_spec, tmp_path, monkeypatch):
    from basinprobe.runtime.store import RunStore

    assemble = RunStore.assemble

    def interrupted_assembly(self, *args):
        os.kill(os.getpid(), signal.SIGINT)   # the handler runs here, between two bytecodes
        assemble(self, *args)

    monkeypatch.setattr(RunStore, "assemble", interrupted_assembly)
    report = run_spec(load_spec(tiny_spec))
    assert report.interrupted and report.done == 6
    assert open_results(tmp_path / "out.zarr")["eval"]["loss"].sizes["checkpoint"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_plan_shows_cells_and_shared_data(write_spec, cli):
    spec = write_spec(TINY_SPEC)
    code, out, err = cli("plan", spec)
    assert code == 0
    assert "2 sweep points, 6 cells" in out and "data sets built: 1 (shared by 1 further sweep points)" in out
    assert "estimated cost" in out
    code, out, err = cli("plan", spec, "--max-cells", "1")
    assert "... and 1 more sweep points" in out and "... and 5 more cells" in out


def test_plan_estimates_the_cost_of_group_probes_too(write_spec, cli):
    text = TINY_SPEC.replace("  - {name: eval, probe: evaluate}",
                             "  - {name: mc, probe: mode_connectivity, at: last, with: {pairs: {sweep: seed}}}")
    code, out, err = cli("plan", write_spec(text))
    cost = next(line for line in out.splitlines() if line.startswith("estimated cost"))
    assert code == 0 and re.search(r"; mc \d\.\d\de\+\d\d flop$", cost), cost


def test_cost_estimates_count_langevins_calibration_and_the_jacobians_svd():
    from basinprobe.probes.behavioral_gradients import BehavioralGradients
    from basinprobe.probes.langevin import Langevin

    llc = Langevin()
    auto, fixed = llc.cost(llc.resolve({}), 1000, 500), llc.cost(llc.resolve({"step_size": 1e-3}), 1000, 500)
    assert auto - fixed == 3.0 * 4 * 64 * 16 * 500   # 4 chains x 64 steps x 16 grid steps, full batch
    bg = BehavioralGradients()
    small, large = (bg.cost(bg.resolve({"inputs": k}), 100_000, 10_000) for k in (100, 1000))
    assert large > 50 * small   # the SVD grows with the square of the rows


def test_plot_draws_a_png(tiny_spec, cli, tmp_path):
    pytest.importorskip("matplotlib")
    assert cli("run", tiny_spec, "-q")[0] == 0
    png = tmp_path / "loss.png"
    code, out, err = cli("plot", tmp_path / "out.zarr", "eval/loss", "--sel", "split=train", "-o", png)
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    heat = tmp_path / "heat.png"
    code, out, err = cli("plot", tmp_path / "out.zarr", "eval/loss", "--sel", "split=train", "--sel", "seed=0", "-o", heat)
    assert code == 0 and heat.read_bytes()[:4] == b"\x89PNG"


def test_plot_draws_variables_along_text_coordinates(write_spec, cli, tmp_path):
    pytest.importorskip("matplotlib")
    text = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep: {seed: [0, 1], model.with.hidden: [[6], [3]]}")
    assert cli("run", write_spec(text), "-q")[0] == 0
    store = tmp_path / "out.zarr"
    for name, sel in (("line", ["split=train", "seed=0", "checkpoint=20"]),   # along hidden, whose labels are text
                      ("heat", ["split=train", "checkpoint=20"]),
                      ("facets", ["split=train"])):
        png = tmp_path / f"{name}.png"
        code, out, err = cli("plot", store, "eval/loss", *[a for s in sel for a in ("--sel", s)], "-o", png)
        assert code == 0 and png.read_bytes()[:4] == b"\x89PNG", err


def test_validate_refuses_a_device_this_machine_lacks_as_run_does(write_spec, cli):
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    path = write_spec(TINY_SPEC.replace("device: cpu", f"device: {missing}"))
    for command in ("validate", "run"):
        code, out, err = cli(command, path)
        assert code == 2 and f"at device: device '{missing}' was asked for but" in err, command


def test_a_bad_device_option_is_an_error_about_the_option(tiny_spec, cli, tmp_path):
    code, out, err = cli("run", tiny_spec, "--device", "gpu")
    assert code == 2 and "error: --device gpu: expected auto, cpu, cuda, cuda:N or mps" in err
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    code, out, err = cli("run", tiny_spec, "--device", missing)
    assert code == 2 and f"error: --device {missing}: device '{missing}' was asked for but" in err
    assert str(tiny_spec) not in err and not (tmp_path / "out.zarr").exists()


def test_query_into_a_closed_pipe_exits_quietly(tiny_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    # the reader is gone before anything is written (as `| head` is after its lines)
    reader = subprocess.Popen([sys.executable, "-m", "basinprobe.runtime.cli", "query", str(tmp_path / "out.zarr"),
                               "eval"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()
    err = reader.stderr.read()
    assert reader.wait() == 0 and "BrokenPipeError" not in err, err


def test_exported_checkpoints_load_into_another_spec_as_the_same_models(tiny_spec, write_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    code, out, err = cli("export", str(tmp_path / "out.zarr"), str(tmp_path / "exported"), "--sel", "seed=1")
    assert code == 0 and "3 checkpoints written as state_dicts in 1 folders" in out
    assert sorted(p.name for p in (tmp_path / "exported" / "seed=1").iterdir()) == ["step_0.pt", "step_10.pt",
                                                                                     "step_20.pt"]
    # a spec that loads them (no training) measures what the training run's cells measured
    loaded = TINY_SPEC.replace("train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}\n",
                               "").replace("sweep: {seed: [0, 1]}\n", "seed: 1\n").replace(
        "activation: tanh}}", "activation: tanh}, checkpoints: ['exported/seed=1/step_*.pt']}").replace(
        "out.zarr", "loaded.zarr").replace("seed: 0\n", "")
    assert cli("run", write_spec(loaded, "loaded.yaml"), "-q")[0] == 0
    trained = open_results(tmp_path / "out.zarr")["eval"]["loss"].sel(seed=1).values
    np.testing.assert_array_equal(open_results(tmp_path / "loaded.zarr")["eval"]["loss"].values, trained)


def test_untrained_model_is_checkpoint_zero(write_spec, cli, tmp_path):
    text = TINY_SPEC.replace("train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}\n", "")
    assert cli("run", write_spec(text), "-q")[0] == 0
    assert open_results(tmp_path / "out.zarr")["eval"]["loss"]["checkpoint"].values.tolist() == [0]


def test_model_checkpoint_files_become_checkpoints(write_spec, cli, tmp_path):
    import torch

    from basinprobe.runtime.models import make_mlp

    def save(step):
        torch.manual_seed(step)
        torch.save(make_mlp(**{"in": 4, "hidden": [6], "out": 3}).state_dict(), tmp_path / "ckpt" / f"step_{step}.pt")

    (tmp_path / "ckpt").mkdir()
    for step in (0, 50, 100):   # as text, step_100 would sort before step_50
        save(step)
    text = TINY_SPEC.replace("train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}\n", "")
    text = text.replace("activation: tanh}}", "activation: relu}, checkpoints: ['ckpt/step_*.pt']}")
    spec = write_spec(text)
    assert cli("run", spec, "-q")[0] == 0
    tree = open_results(tmp_path / "out.zarr")
    assert tree["eval"]["loss"]["checkpoint"].values.tolist() == [0, 1, 2]
    torch.manual_seed(100)
    expected = torch.nn.utils.parameters_to_vector(make_mlp(**{"in": 4, "hidden": [6], "out": 3}).parameters())
    assert np.allclose(tree["_checkpoints"]["params"].sel(seed=0, checkpoint=2).values, expected.detach().numpy())
    layout = json.loads(tree["_checkpoints"].attrs["layouts"])["seed=0"]
    assert [Path(f).name for f in layout["files"]] == ["step_0.pt", "step_50.pt", "step_100.pt"]
    # a file added under the glob shifts what the indices mean: the store is another spec's
    save(20)
    code, out, err = cli("run", spec, "-q")
    assert code == 2 and "different spec" in err
    assert cli("run", spec, "-q", "--overwrite")[0] == 0
    assert open_results(tmp_path / "out.zarr")["eval"]["loss"]["checkpoint"].values.tolist() == [0, 1, 2, 3]


class SeedDistance(Probe):
    """A group probe: distance between the parameters of every pair of seeds at one checkpoint."""

    name = "seed_distance"
    scope = "group"
    schema = {"type": "object", "properties": {"axis": {"type": "string", "default": "seed"}},
              "additionalProperties": False}

    def spans(self, params, cell_dims):
        if params["axis"] not in cell_dims:
            raise ProbeError(f"there is no sweep axis {params['axis']!r}")
        return [params["axis"]]

    def run(self, ctx, params):
        import torch

        flats = [m.context().flat_params for m in ctx.members]
        labels = [m.coords["seed"] for m in ctx.members]
        dist = [[float(torch.linalg.vector_norm(a - b)) for b in flats] for a in flats]
        return xr.Dataset({"distance": (("seed_a", "seed_b"), dist)}, coords={"seed_a": labels, "seed_b": labels})


def test_group_probe_runs_once_per_remaining_cell_dims(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(SeedDistance))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: dist, probe: seed_distance}")
    spec = load_spec(write_spec(text), registry=registry)
    report = run_spec(spec, registry=registry)
    assert report.ok, report.failures
    tree = open_results(tmp_path / "out.zarr")
    distance = tree["dist"]["distance"]
    assert distance.dims == ("checkpoint", "seed_a", "seed_b")
    params = tree["_checkpoints"]["params"]
    for step in (0, 10, 20):
        expected = np.linalg.norm(params.sel(seed=0, checkpoint=step).values - params.sel(seed=1, checkpoint=step).values)
        assert float(distance.sel(checkpoint=step, seed_a=0, seed_b=1)) == pytest.approx(expected, rel=1e-5)
        assert float(distance.sel(checkpoint=step, seed_a=1, seed_b=1)) == 0.0
    again = run_spec(spec, registry=registry)
    assert again.done == 0 and again.skipped == 6 + 3


def test_group_probe_spanning_a_missing_axis_is_a_spec_error(write_spec, tmp_path):
    from basinprobe.runtime.plan import compile_plan
    from basinprobe.runtime.spec import SpecError

    registry = collect_registry_with(plugin_with(SeedDistance))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: dist, probe: seed_distance, with: {axis: width}}")
    spec = load_spec(write_spec(text), registry=registry)
    with pytest.raises(SpecError, match=r"spec.yaml:12:\d+: at probes.1.with: there is no sweep axis 'width'"):
        compile_plan(spec, registry)


def test_batched_cells_equal_the_unbatched_run(write_spec, tmp_path):
    text = TINY_SPEC.replace("seed: [0, 1]", "seed: [0, 1, 2]").replace("device: cpu", "device: cpu\ndtype: float64")
    plain = load_spec(write_spec(text.replace("out.zarr", "plain.zarr"), "plain.yaml"))
    batched = load_spec(write_spec(text.replace("out.zarr", "batched.zarr") + "execution: {batch_cells: true}\n",
                                   "batched.yaml"))
    assert run_spec(plain).ok and run_spec(batched).ok
    a, b = open_results(tmp_path / "plain.zarr")["eval"], open_results(tmp_path / "batched.zarr")["eval"]
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, atol=0)


class Draw(Probe):
    """Draws from the cell's generator and warns; its batched form does the same, then fails."""

    name = "draw"
    batched = True

    def run(self, ctx, params):
        ctx.warn("drew")
        return xr.Dataset({"value": float(torch.rand((), generator=ctx.generator, dtype=torch.float64))})

    def run_batched(self, ctxs, params):
        for ctx in ctxs:
            self.run(ctx, params)
        raise RuntimeError("vmap cannot batch this model")


def test_a_failed_batch_reruns_each_cell_exactly_as_an_unbatched_run(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(Draw))
    text = TINY_SPEC.replace("probe: evaluate}", "probe: draw}")
    plain = load_spec(write_spec(text.replace("out.zarr", "plain.zarr"), "plain.yaml"), registry=registry)
    batched = load_spec(write_spec(text.replace("out.zarr", "batched.zarr") + "execution: {batch_cells: true}\n",
                                   "batched.yaml"), registry=registry)
    with pytest.warns(RuntimeWarning, match="drew"):
        reports = run_spec(plain, registry=registry), run_spec(batched, registry=registry)
    assert all(r.ok for r in reports)
    a, b = open_results(tmp_path / "plain.zarr")["eval"], open_results(tmp_path / "batched.zarr")["eval"]
    np.testing.assert_array_equal(a["value"].values, b["value"].values)  # the same draws: fresh generators
    assert len(b.attrs["warnings"]) == 6 and len(reports[1].warnings) == 6  # once per cell, not per attempt


def test_a_big_sweeps_warnings_are_shown_once_per_kind_so_a_rare_one_is_not_buried():
    from basinprobe.runtime.cli import SHOWN_AFTER_RUN, capped

    few = capped("warning", ["a: x", "b: y"], "out.zarr")
    assert few == ["warning: a: x", "warning: b: y"]
    common = [f"seed={i},checkpoint=10 hess: not near a minimum: a step lowers the loss by {i / 7:.3g}"
              for i in range(40)]
    rare = ["seed=3,checkpoint=20 llc: R-hat 1.43 > 1.1: the chains have not mixed"]
    many = capped("warning", common[:30] + rare + common[30:], "out.zarr")
    assert many == [
        "warning: seed=0,checkpoint=10 hess: not near a minimum: a step lowers the loss by 0  [and 39 more like it]",
        "warning: seed=3,checkpoint=20 llc: R-hat 1.43 > 1.1: the chains have not mixed",
        "warning: 41 in all, kept in their groups' `warnings` attrs: `basinprobe query out.zarr` lists every one"]
    kinds = capped("failed", [f"seed={i} e{i}: boom" for i in range(SHOWN_AFTER_RUN + 5)], "out.zarr")
    assert len(kinds) == SHOWN_AFTER_RUN + 2 and kinds[-2] == "failed: ... and 5 more kinds"