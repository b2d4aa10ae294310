"""``plan --time``: timing sweep points in a scratch store and scaling them to the whole run."""

import pytest

from basinprobe.registry import collect_registry_with, load_registry
from basinprobe.runtime.build import resolve_device, resolve_dtype
from basinprobe.runtime.execute import PointTiming, Workshop, time_points
from basinprobe.runtime.plan import compile_plan, estimate_cost, estimate_seconds, points_to_time
from basinprobe.runtime.spec import load_spec
from conftest import TINY_SPEC
from test_run import Flaky, plugin_with

WIDTHS = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep:\n  seed: [0, 1, 2]\n  model.with.hidden: [[2], [16]]").replace(
    "  - {name: eval, probe: evaluate}",
    "  - {name: eval, probe: evaluate}\n  - {name: hess, probe: hessian_spectrum, at: last, with: {top_k: 2}}")


def costed(path, registry=None):
    registry = registry or load_registry()
    spec = load_spec(path, registry=registry)
    plan = compile_plan(spec, registry)
    sizes = Workshop(spec, registry, resolve_device("cpu"), resolve_dtype(spec.dtype)).preflight(plan)
    cost = estimate_cost(plan, {k: v[0] for k, v in sizes.items()}, {k: v[1] for k, v in sizes.items()}, registry)
    return spec, plan, cost


def test_points_alike_count_the_timed_points_time(tiny_spec):
    _, plan, cost = costed(tiny_spec)
    keys = points_to_time(plan, cost)
    assert keys == ["p00000"]   # two seeds of one model: one point is timed
    timing = PointTiming("p00000", {"seed": 0}, 5.0, {"eval": 1.0}, [])
    estimate = estimate_seconds(plan, cost, [timing])
    assert estimate["train"] == pytest.approx(2 * 4.0) and estimate["probes"] == {"eval": pytest.approx(2 * 1.0)}


def test_two_timed_points_fix_a_time_per_run_and_a_time_per_flop(write_spec):
    _, plan, cost = costed(write_spec(WIDTHS))
    cheapest, costliest = points_to_time(plan, cost)
    points = {p.key: p for p in plan.points}
    assert points[cheapest].coords["hidden"] == "[2]" and points[costliest].coords["hidden"] == "[16]"

    # timings made to follow seconds = a * runs + b * flop exactly, for each part
    law = {"train": (0.5, 2e-7), "eval": (0.01, 1e-8), "hess": (0.2, 3e-8)}

    def seconds(key, part):
        a, b = law[part]
        own = cost["points"][key]
        flop = own["train"] if part == "train" else own["probes"][part]
        runs = 1 if part == "train" else sum(part in [e.name for e in c.entries] for c in points[key].cells)
        return a * runs + b * flop

    timings = [PointTiming(key, points[key].coords, 0.0, {"eval": seconds(key, "eval"), "hess": seconds(key, "hess")},
                           []) for key in (cheapest, costliest)]
    for timing in timings:   # setup is the rest of the point's time
        timing.seconds = seconds(timing.point, "train") + sum(timing.probes.values())
    estimate = estimate_seconds(plan, cost, timings)
    assert estimate["train"] == pytest.approx(sum(seconds(p.key, "train") for p in plan.points))
    for part in ("eval", "hess"):
        assert estimate["probes"][part] == pytest.approx(sum(seconds(p.key, part) for p in plan.points))


def test_timing_runs_the_points_in_a_scratch_store_and_reports_failures(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(Flaky))
    path = write_spec(TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: flaky, probe: flaky}")
                      .replace("sweep: {seed: [0, 1]}", "sweep: {seed: [1, 0]}"))
    spec, plan, cost = costed(path, registry)
    timings, device = time_points(spec, plan, registry, points_to_time(plan, cost))
    (timing,) = timings
    assert device == "cpu" and timing.coords == {"seed": 1}
    assert set(timing.probes) == {"eval", "flaky"} and timing.seconds >= sum(timing.probes.values())
    assert timing.failures == ["seed=1,checkpoint=10 flaky: cannot measure this cell: try a smaller step"]
    assert not (tmp_path / "out.zarr").exists()


def test_points_only_group_probes_use_are_trained_and_timed(write_spec):
    path = write_spec(TINY_SPEC.replace("  - {name: eval, probe: evaluate}",
                                        "  - {name: mc, probe: mode_connectivity, at: last, "
                                        "with: {pairs: {sweep: seed}, alphas: 3}}"))
    spec, plan, cost = costed(path)
    (timing,), _ = time_points(spec, plan, load_registry(), points_to_time(plan, cost))
    assert timing.probes == {} and timing.setup > 0
    estimate = estimate_seconds(plan, cost, [timing])
    assert estimate["train"] == pytest.approx(2 * timing.setup) and estimate["probes"] == {}


def test_plan_time_prints_an_estimate_and_writes_nothing(write_spec, cli, tmp_path):
    spec = write_spec(WIDTHS.replace("seed: [0, 1, 2]", "seed: [0]"))
    code, out, err = cli("plan", spec, "--time", "--max-cells", "1")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "timed sweep point seed=0, hidden=[2] on cpu:" in flat and "timed sweep point seed=0, hidden=[16]" in flat
    assert "estimated time of the whole run, one process on cpu: about" in flat
    assert not (tmp_path / "out.zarr").exists()
    assert cli("plan", spec, "--time", "--device", "cuda:7")[0] == 2
    assert cli("plan", spec, "--device", "garbage")[0] == 2


def test_plan_time_says_each_cause_of_failure_once(write_spec, cli):
    # gradient descent far above 2/lambda_max on a linear regression diverges: every later cell fails alike
    spec = write_spec(TINY_SPEC.replace("lr: 0.1", "lr: 50.0").replace("hidden: [6], out: 3", "hidden: [], out: 1").replace(
        "{kind: gaussian_mixture, with: {n: 60, in: 4, classes: 3}, batch_size: 32}",
        "{kind: teacher_student, with: {n: 60, in: 4}, batch_size: 32}").replace("cross_entropy", "mse").replace(
        "steps: 20", "steps: 200").replace("at: [0, 10, 20]", "at: [0, 100, 200]").replace("sweep: {seed: [0, 1]}", ""))
    code, out, err = cli("plan", spec, "--time", "--max-cells", "1")
    assert code == 0, err
    failed = [line for line in " ".join(out.split()).split("failed while timing")[1:]]
    assert len(failed) == 1 and "checkpoint=100 eval: no checkpoint at step 100: training diverged" in failed[0]
    assert "training diverged" in failed[0] and "[and 1 more like it] estimated time" in failed[0], out
    assert "done in" not in err   # no line per cell


def test_validate_and_plan_say_what_run_will_make_of_the_store_there(tiny_spec, write_spec, cli):
    assert "note:" not in cli("validate", tiny_spec)[1]
    assert cli("run", tiny_spec, "-q")[0] == 0
    assert "holds this spec's results: run resumes it" in cli("validate", tiny_spec)[1]
    amended = write_spec(TINY_SPEC.replace("probe: evaluate}", "probe: evaluate, with: {splits: [test]}}"), "b.yaml")
    assert "run amends it, training nothing again" in cli("plan", amended)[1]
    other = write_spec(TINY_SPEC.replace("lr: 0.1", "lr: 0.2"), "c.yaml")
    code, out, _ = cli("validate", other)
    assert code == 0 and "holds results of a different spec: run will refuse it (exit 2); pass --overwrite" in out
