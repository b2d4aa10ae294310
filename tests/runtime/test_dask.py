"""The dask executor: identical results, failures and bad clusters reported clearly."""

import contextlib
import multiprocessing
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("distributed")

from basinprobe.registry import collect_registry_with, load_registry
from basinprobe.runtime import open_results
from basinprobe.runtime.distributed import DaskCells, ExecutorError, run_points_task
from basinprobe.runtime.execute import run_spec
from basinprobe.runtime.plan import compile_plan
from basinprobe.runtime.spec import load_spec
from conftest import TINY_SPEC
from test_run import Flaky, plugin_with

SWEEP = TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep:\n  seed: [0, 1]\n  model.with.hidden: [[6], [3]]")


def assert_same_store(a, b):
    ta, tb = open_results(a), open_results(b)
    assert set(ta.children) == set(tb.children)
    for group in ta.children:
        for name, var in ta[group].to_dataset().data_vars.items():
            np.testing.assert_array_equal(var.values, tb[group][name].values, err_msg=f"{group}/{name}")


def test_dask_run_is_bit_identical_to_local(write_spec, cli, tmp_path, one_intra_op_thread):
    # the untrained cells' hessian_spectrum warns (not near a minimum), once per point of its
    # entry's own sweep: workers report it back. The local run has the workers' one intra-op
    # thread: multithreaded LAPACK would change the last bits of behavioral_gradients' SVD.
    sweep = SWEEP.replace("probe: evaluate}", "probe: evaluate}\n  - {name: hess, probe: hessian_spectrum, at: [0], "
                                              "sweep: {top_k: [2, 3]}}"
                          "\n  - {name: jac, probe: behavioral_gradients, at: [20]}")
    local = write_spec(sweep.replace("out.zarr", "local.zarr"), "local.yaml")
    dask = write_spec(sweep.replace("out.zarr", "dask.zarr"), "dask.yaml")
    code, out, local_err = cli("run", local, "-q")
    assert code == 0, local_err
    code, out, err = cli("run", dask, "--executor", "dask", "--workers", "2")
    assert code == 0, err
    assert_same_store(tmp_path / "local.zarr", tmp_path / "dask.zarr")
    # one progress line per sweep point (4 of them, 5 cell results each), as its future finishes
    finished = sorted(line for line in err.splitlines() if "cell results written" in line)
    assert len(finished) == 4 and all(line.endswith(": 5 cell results written, 0 failed") for line in finished), err
    warned = sorted(line for line in err.splitlines() if line.startswith("warning:"))
    assert len(warned) == 8 and warned == sorted(line for line in local_err.splitlines() if line.startswith("warning:"))
    assert open_results(tmp_path / "dask.zarr")["eval"]["loss"].dims == ("seed", "hidden", "checkpoint", "split")
    # resuming on dask keeps everything
    code, out, err = cli("run", dask, "-q", "--executor", "dask", "--workers", "2")
    assert code == 0 and "0 cell results written, 20 kept" in out


def test_batch_cells_on_dask_batches_each_workers_share_of_the_seeds(write_spec, cli, tmp_path):
    sweep = (TINY_SPEC.replace("sweep: {seed: [0, 1]}", "sweep: {seed: [0, 1, 2, 3]}")
             .replace("device: cpu", "device: cpu\ndtype: float64")
             .replace("probe: evaluate}", "probe: evaluate}\n  - {name: hess, probe: hessian_spectrum, at: last, "
                                          "with: {top_k: 3, method: lanczos, probes: 3, steps: 12}}"))
    local = write_spec(sweep.replace("out.zarr", "local.zarr"), "local.yaml")
    dask = write_spec(sweep.replace("out.zarr", "dask.zarr") + "execution: {batch_cells: true}\n", "dask.yaml")
    assert cli("run", local, "-q")[0] == 0
    code, out, err = cli("run", dask, "--executor", "dask", "--workers", "2")
    assert code == 0, err
    # two workers, one architecture: two tasks of two seeds each (3 evaluate cells + 1 hess each)
    finished = sorted(line for line in err.splitlines() if "cell results written" in line)
    assert finished == ["seed=0, seed=2: 8 cell results written, 0 failed",
                        "seed=1, seed=3: 8 cell results written, 0 failed"], err
    # batched results equal the unbatched ones up to floating-point reassociation
    ta, tb = open_results(tmp_path / "local.zarr"), open_results(tmp_path / "dask.zarr")
    for group in ("eval", "hess", "_checkpoints"):
        for name, var in ta[group].to_dataset().data_vars.items():
            np.testing.assert_allclose(tb[group][name].values, var.values, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{group}/{name}")


def test_unreachable_scheduler_is_a_clear_error_and_writes_nothing(tiny_spec, cli, tmp_path):
    started = time.time()
    code, out, err = cli("run", tiny_spec, "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert code == 2 and "cannot reach the dask scheduler tcp://127.0.0.1:9" in err
    assert time.time() - started < 60
    assert not (tmp_path / "out.zarr").exists()


def test_a_finished_store_needs_no_cluster_to_rerun(tiny_spec, cli, tmp_path):
    assert cli("run", tiny_spec, "-q")[0] == 0
    # nothing is left to do, so the (unreachable) scheduler is never contacted
    code, out, err = cli("run", tiny_spec, "-q", "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert code == 0 and "0 cell results written, 6 kept from an earlier run" in out, err


def test_a_worker_compiles_the_spec_once_for_all_its_tasks(tiny_spec, monkeypatch):
    """A sweep is one task per point; each task used to load and compile the whole spec."""
    from basinprobe.runtime import distributed as executor
    from basinprobe.runtime import plan as plan_module
    from basinprobe.runtime.store import RunStore

    monkeypatch.setattr(executor, "_PREPARED", {})
    compiled = []
    compile_plan = plan_module.compile_plan
    monkeypatch.setattr(plan_module, "compile_plan", lambda *a, **k: compiled.append(1) or compile_plan(*a, **k))
    spec = load_spec(tiny_spec)
    RunStore(spec.output).open_for(spec, "cpu", spec.dtype, False)
    keys = [point.key for point in compile_plan(spec).points]
    args = (spec.text, str(tiny_spec), str(spec.output))
    assert executor.run_points_task(*args, keys[:1], "cpu", 1)[0] == 3
    assert executor.run_points_task(*args, keys[1:], "cpu", 1)[0] == 3
    assert executor.run_points_task(*args, keys, "cpu", 1)[0] == 0   # all done: nothing runs again
    assert len(compiled) == 1


def test_workers_lacking_a_probe_are_named(write_spec, tmp_path):
    registry = collect_registry_with(plugin_with(Flaky))  # only this process knows 'flaky'
    spec = load_spec(write_spec(TINY_SPEC.replace("probe: evaluate}", "probe: evaluate}\n  - {name: flaky, probe: flaky}")),
                     registry=registry)
    with pytest.raises(ExecutorError, match=r"lacks probe 'flaky' \(install the plugin that provides it"):
        run_spec(spec, registry=registry, executor="dask", workers=1)
    assert not (tmp_path / "out.zarr").exists()


HIDE_BASINPROBE = """
import sys


class HideBasinprobe:
    \"\"\"A worker environment without basinprobe: its imports fail as if it were not installed.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "basinprobe" or name.startswith("basinprobe."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideBasinprobe())
"""


@contextlib.contextmanager
def cluster_preloading(source: str, folder):
    """A one-worker LocalCluster whose worker runs ``source`` before anything else."""
    import distributed

    preload = folder / "preload.py"
    preload.write_text(source)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  preload=[str(preload)]) as cluster:
        yield cluster


def test_workers_without_basinprobe_are_a_clear_error_and_nothing_is_written(tiny_spec, cli, tmp_path):
    with cluster_preloading(HIDE_BASINPROBE, tmp_path) as cluster:
        code, out, err = cli("run", tiny_spec, "--executor", "dask", "--scheduler", cluster.scheduler_address)
    assert code == 2, err
    assert "the dask workers cannot import basinprobe" in err and "in every worker's environment" in err
    assert not (tmp_path / "out.zarr").exists()


OLD_BASINPROBE = """
import importlib.metadata as metadata

if not hasattr(metadata, "real_version"):  # a preload can run more than once in a worker
    metadata.real_version = metadata.version
    metadata.version = lambda name: "0.0.1" if name == "basinprobe" else metadata.real_version(name)
"""


def test_workers_running_another_basinprobe_version_are_named(tiny_spec, tmp_path):
    with cluster_preloading(OLD_BASINPROBE, tmp_path) as cluster:
        with pytest.raises(ExecutorError, match=r"worker \S+ runs basinprobe 0.0.1, the coordinator \S+ \(install "
                                                r"the same version on every worker\)"):
            run_spec(load_spec(tiny_spec), executor="dask", scheduler=cluster.scheduler_address)
    assert not (tmp_path / "out.zarr").exists()


def test_workers_in_another_directory_get_the_spec_and_the_store_by_absolute_path(write_spec, cli, tmp_path,
                                                                                  monkeypatch):
    from basinprobe.runtime.models import make_mlp

    (tmp_path / "ckpt").mkdir()
    for i in range(2):
        torch.save(make_mlp(**{"in": 4, "hidden": [6], "out": 3}).state_dict(), tmp_path / "ckpt" / f"step_{i}.pt")
    text = TINY_SPEC.replace("train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}\n", "")
    write_spec(text.replace("activation: tanh}}", "activation: relu}, checkpoints: ['ckpt/step_*.pt']}"))
    monkeypatch.chdir(tmp_path)   # relative spec and output paths, as typed in a shell
    with cluster_preloading("import os\nos.chdir('/')\n", tmp_path) as cluster:
        code, out, err = cli("run", "spec.yaml", "-o", "relative.zarr", "-q", "--executor", "dask",
                             "--scheduler", cluster.scheduler_address)
    assert code == 0, err
    assert open_results(tmp_path / "relative.zarr")["eval"]["loss"]["checkpoint"].values.tolist() == [0, 1]


def test_a_model_factory_the_workers_cannot_import_is_named(write_spec, cli, tmp_path, monkeypatch):
    folder = tmp_path / "only_here"
    folder.mkdir()
    (folder / "local_models.py").write_text("from basinprobe.runtime.models import make_mlp as make\n")
    monkeypatch.syspath_prepend(str(folder))   # importable here; the worker, as if elsewhere, lacks the folder
    spec = write_spec(TINY_SPEC.replace("{kind: mlp, with: {in: 4, hidden: [6], out: 3, activation: tanh}}",
                                        "{factory: 'local_models:make', with: {in: 4, hidden: [6], out: 3}}"))
    elsewhere = "import sys\nsys.path[:] = [p for p in sys.path if not p.endswith('only_here')]\n"
    with cluster_preloading(elsewhere, tmp_path) as cluster:
        code, out, err = cli("run", spec, "--executor", "dask", "--scheduler", cluster.scheduler_address)
    assert code == 2, err
    assert re.search(r"worker \S+: cannot import factory 'local_models:make': ModuleNotFoundError.* \(the module "
                     r"must be importable on every worker\)", err), err
    assert not (tmp_path / "out.zarr").exists()


def test_workers_that_cannot_see_the_store_are_an_error_before_any_cell_runs(tiny_spec, tmp_path):
    # On a cluster without a shared disk a worker would write its cells where the coordinator
    # never reads them. Here the workers look before the coordinator has created the store.
    spec = load_spec(tiny_spec)
    plan = compile_plan(spec, load_registry())
    cells = DaskCells.connect(spec, plan, load_registry(), {"workers": 2}, "cpu")
    try:
        with pytest.raises(ExecutorError, match=r"dask workers \S+, \S+ cannot see the store .*out.zarr that the "
                                                r"coordinator created.*a shared disk"):
            cells.check_store()
    finally:
        cells.close()
    # a worker given a point anyway refuses it and writes nothing
    with pytest.raises(ExecutorError, match="this worker cannot see the store"):
        run_points_task(spec.text, str(tiny_spec), str(tmp_path / "out.zarr"), [plan.points[0].key], "cpu", 1)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs workers without a GPU")
def test_a_cuda_spec_needs_gpus_on_the_workers_not_on_the_coordinator(write_spec, cli, tmp_path):
    # this coordinator has no GPU, and neither have the workers: they are named, nothing written
    spec = write_spec(TINY_SPEC.replace("device: cpu", "device: cuda"))
    code, out, err = cli("run", spec, "--executor", "dask", "--workers", "1")
    assert code == 2, err
    assert re.search(r"worker \S+ has 0 GPUs, but the spec asks for device 'cuda'", err), err
    assert not (tmp_path / "out.zarr").exists()


def test_gpu_work_gets_one_gpu_per_worker_from_dask_cuda_where_installed(monkeypatch):
    """Which local cluster starts (recorded by stand-ins, nothing is started): dask-cuda's
    LocalCUDACluster for GPU work with no more workers than GPUs, else distributed's LocalCluster."""
    import types

    from basinprobe.runtime import distributed as executor

    started = []

    def recorder(kind):
        return lambda **kwargs: started.append((kind, kwargs)) or kind

    dask_cuda = types.SimpleNamespace(LocalCUDACluster=recorder("LocalCUDACluster"))
    plain = types.SimpleNamespace(LocalCluster=recorder("LocalCluster"))
    monkeypatch.setitem(sys.modules, "dask_cuda", dask_cuda)
    monkeypatch.setattr(executor, "_start_method", lambda device: "fork" if device == "cpu" else "spawn")
    cases = [(("cuda", 2, 2), "LocalCUDACluster"), (("auto", 1, 4), "LocalCUDACluster"),
             (("cuda", 3, 2), "LocalCluster"),     # more workers than GPUs: they share by index
             (("cuda:1", 2, 2), "LocalCluster"),   # one named GPU for every worker
             (("cpu", 2, 2), "LocalCluster"), (("auto", 2, 0), "LocalCluster")]
    for (device, workers, gpus), expected in cases:
        assert executor._local_cluster(plain, workers, 1, device, gpus) == expected, (device, workers, gpus)
    assert started[0] == ("LocalCUDACluster", {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": None})
    monkeypatch.setitem(sys.modules, "dask_cuda", None)   # not installed
    assert executor._local_cluster(plain, 2, 1, "cuda", 2) == "LocalCluster"


def test_missing_dask_names_the_extra(tiny_spec, cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "distributed", None)
    code, out, err = cli("run", tiny_spec, "--executor", "dask")
    assert code == 2 and "pip install 'basinprobe[dask]'" in err
    assert not (tmp_path / "out.zarr").exists()


def test_a_killed_worker_has_its_point_retried_and_the_store_is_whole(write_spec, tmp_path):
    slow = SWEEP.replace("steps: 20", "steps: 300").replace("at: [0, 10, 20]", "every: 100")
    spec = load_spec(write_spec(slow))
    reference = load_spec(write_spec(slow.replace("out.zarr", "ref.zarr"), "ref.yaml"))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("report", run_spec(spec, executor="dask", workers=2)))
    runner.start()
    staged = tmp_path / "out.zarr" / "_cells"
    deadline = time.time() + 120
    while time.time() < deadline and not list(staged.glob("p*/eval/stage.json")):
        time.sleep(0.05)
    workers = [p for p in multiprocessing.active_children() if p.is_alive()]
    assert workers, "no worker process to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    runner.join(timeout=240)
    report = outcome["report"]
    assert report.ok, report.failures
    assert run_spec(reference).ok
    assert_same_store(tmp_path / "out.zarr", tmp_path / "ref.zarr")


def test_ctrl_c_keeps_finished_cells_quietly_and_resumes(write_spec, tmp_path):
    import subprocess

    slow = SWEEP.replace("steps: 20", "steps: 600").replace("at: [0, 10, 20]", "every: 200")
    spec = write_spec(slow)
    command = [sys.executable, "-m", "basinprobe.runtime.cli", "run", str(spec), "-q", "--executor", "dask",
               "--workers", "2"]
    # a process group of its own, which Ctrl-C in a terminal signals whole: workers included
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    staged = tmp_path / "out.zarr" / "_cells"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staged.glob("p*/eval/stage.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "(interrupted)" in out
    # the workers leave the interrupt to the coordinator: no tracebacks, and none of them is left
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    with contextlib.suppress(ProcessLookupError):
        for _ in range(100):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        pytest.fail("worker processes outlived their coordinator")
    kept = open_results(tmp_path / "out.zarr")["eval"]["loss"]
    assert np.isfinite(kept.values).any()
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert " 0 kept" not in resumed.stdout
    # what the interrupted run said it wrote is what the rerun keeps (cells a worker finished as
    # the futures were cancelled count too)
    written = int(re.search(r"(\d+) cell results written", out).group(1))
    assert f" {written} kept from an earlier run" in resumed.stdout, (out, resumed.stdout)
    assert np.isfinite(open_results(tmp_path / "out.zarr")["eval"]["loss"].values).all()
