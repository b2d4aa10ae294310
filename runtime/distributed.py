"""The dask executor: sweep points fanned out over a dask.distributed cluster.

The unit of work is a sweep point (its training run and all its cells),
because the cells of a point share the training. Each worker writes only its
own cells' staging groups (``_cells/<cell>/<entry>``, ``_points/<point>``), so
no two workers touch the same files and no lock is needed; the coordinator
creates the store before any worker starts and assembles and consolidates it
once at the end. Group-scoped probes (which compare points) run on the
coordinator after the points are done. A task whose worker dies is retried
by the scheduler; the retry reads the store and redoes only unfinished cells.
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path

import torch

from basinprobe.registry import load_registry
from basinprobe.runtime.plan import code_versions, components_of
from basinprobe.runtime.store import RunStore, cell_label


class ExecutorError(Exception):
    """The cluster cannot run this spec (unreachable, or its workers lack what the spec needs)."""


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ExecutorError("the dask executor needs dask.distributed: pip install 'basinprobe[dask]'") from None
    return distributed


def dask_setup(worker) -> None:
    """Preloaded into each worker of a cluster that basinprobe starts (dask calls it by this
    name). Ctrl-C in a terminal reaches every process of its group, and each worker printed
    a KeyboardInterrupt traceback; the coordinator cancels the futures and closes the workers
    itself, so they ignore it. A worker does not outlive its coordinator: dask's nanny makes it
    exit when its parent does. Cancelled tasks are the coordinator's doing, not news."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def worker_inventory() -> dict:
    """What a worker can run (called on every worker before any task is sent)."""
    try:
        registry = load_registry(refresh=True)
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator as text
        return {"error": f"basinprobe cannot load its plugins: {type(exc).__name__}: {exc}"}
    provided = {kind: set(getattr(registry, kind)) for kind in ("probes", "models", "datasets", "losses")}
    return {
        **{kind: sorted(names) for kind, names in provided.items()},
        "gpus": torch.cuda.device_count(), "versions": code_versions(registry, provided),
    }


def factory_failures(targets: list[str]) -> dict[str, str]:
    """The model factories (``module:function``) this process cannot import, with why."""
    from basinprobe.runtime.build import BuildError, import_factory

    failed = {}
    for target in targets:
        try:
            import_factory(target)
        except BuildError as exc:
            failed[target] = str(exc)
    return failed


def sees_store(output: str, spec_sha256: str) -> bool:
    """Whether this process sees the store that the coordinator created for the spec."""
    return RunStore(output).root_attrs().get("spec_sha256") == spec_sha256


def _unseen_store(output: str, where: str) -> ExecutorError:
    return ExecutorError(f"{where} cannot see the store {output} that the coordinator created; workers write "
                         "their cells into it, so they need the coordinator's filesystem at the same path "
                         "(a shared disk)")


# The spec, registry, plan and workshops of the last spec this worker ran tasks of.
_PREPARED: dict[tuple, tuple] = {}


def run_points_task(spec_text: str, spec_path: str | None, output: str, point_keys: list[str], device: str,
                    threads: int, batch_cells: bool = False) -> tuple[int, list[str], list[str]]:
    """On a worker: run every unfinished cell of some sweep points (batched probes once over
    them with ``batch_cells``); return (cell results written, failures, warnings)."""
    from basinprobe.runtime.build import resolve_device, resolve_dtype
    from basinprobe.runtime.context import ProbeWarning
    from basinprobe.runtime.execute import RunReport, Workshop, run_points
    from basinprobe.runtime.plan import compile_plan
    from basinprobe.runtime.progress import Reporter
    from basinprobe.runtime.spec import load_spec

    torch.set_num_threads(threads)
    key = (spec_text, spec_path, output)
    if key not in _PREPARED:
        # Kept for the tasks that follow on this worker: a sweep is one task per point, and
        # loading and compiling the whole spec in every task made a long sweep quadratic.
        _PREPARED.clear()
        registry = load_registry()
        spec = load_spec(spec_path, text=spec_text, output=output, registry=registry)
        _PREPARED[key] = (spec, registry, {p.key: p for p in compile_plan(spec, registry).points}, {})
    spec, registry, points_by_key, shops = _PREPARED[key]
    points = [points_by_key[k] for k in point_keys if k in points_by_key]
    torch_device = resolve_device(device)
    if torch_device.type == "cuda" and torch_device.index is None and torch.cuda.device_count() > 1:
        # Without dask-cuda every worker sees every GPU: pin one per worker.
        from distributed import get_worker

        name = get_worker().name
        slot = name if isinstance(name, int) else abs(hash(name))
        torch_device = torch.device("cuda", slot % torch.cuda.device_count())
    if not sees_store(output, spec.sha256):  # its cells would be written where nobody reads them
        raise _unseen_store(output, "this worker")
    if torch_device not in shops:
        shops[torch_device] = Workshop(spec, registry, torch_device, resolve_dtype(spec.dtype))
    shop = shops[torch_device]   # it keeps the data sets it has built
    store = RunStore(spec.output)
    report = RunReport(str(spec.output))
    with warnings.catch_warnings():
        # returned to the coordinator, which prints them with the cells (a spawned worker does
        # not inherit the coordinator's filter)
        warnings.simplefilter("ignore", ProbeWarning)
        status = store.status([cell.key for point in points for cell in point.cells])
        run_points(points, spec, shop, store, status, Reporter(quiet=True), report, {}, batch_cells=batch_cells)
    return report.done, report.failures, report.warnings


def _start_method(device: str) -> str:
    """How a LocalCluster starts its worker processes.

    ``fork`` on CPU: the workers inherit the coordinator's imported torch and basinprobe
    instead of importing them again, which took a 2-worker cluster from 6.3 s to 2.1 s
    to start here. ``spawn`` (dask's default) when the work goes to a GPU or CUDA is
    already initialized, because a forked child cannot use its parent's CUDA state.
    """
    from basinprobe.runtime.build import BuildError, resolve_device

    try:
        on_cpu = resolve_device(device).type == "cpu"
    except BuildError:   # reported where the device is built
        on_cpu = False
    return "fork" if on_cpu and not torch.cuda.is_initialized() else "spawn"


def _local_cluster(distributed, workers: int, threads: int, device: str, gpus: int):
    """A cluster of ``workers`` processes on this machine for work on ``device``.

    For work on the GPUs (``device`` ``cuda`` or ``auto`` with GPUs here), dask-cuda's
    ``LocalCUDACluster`` where it is installed and there are no more workers than GPUs: it gives
    each worker one GPU of its own through ``CUDA_VISIBLE_DEVICES``. Otherwise distributed's
    ``LocalCluster``, whose workers, when they see several GPUs, pin ``cuda:(index mod GPUs)``
    (:func:`run_points_task`).
    """
    import dask

    method = _start_method(device)
    preload = {"distributed.worker.preload": [__name__]}   # dask_setup, above
    if method == "spawn" and device in ("cuda", "auto") and 0 < workers <= gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            with dask.config.set(preload):
                return LocalCUDACluster(n_workers=workers, threads_per_worker=threads, dashboard_address=None)
    if method == "fork":
        # xarray imports dask.array (~0.7 s) when it first builds a variable with dask installed;
        # imported once here, before the fork, the workers inherit it
        import dask.array  # noqa: F401
    with dask.config.set({"distributed.worker.multiprocessing-method": method, **preload}):
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                        dashboard_address=None)


class DaskCells:
    """A connection to a cluster that runs the sweep points of one spec."""

    def __init__(self, client, cluster, spec, device: str, threads: int):
        self.client, self.cluster, self.spec, self.device, self.threads = client, cluster, spec, device, threads
        self.futures = []
        self.workers = 1
        # workers have their own working directories: they get absolute paths (the spec file's,
        # against which its relative paths resolve, and the store's)
        self.spec_path = str(Path(spec.source).absolute()) if spec.source else None
        self.output = str(Path(spec.output).absolute())

    @classmethod
    def connect(cls, spec, plan, registry, execution: dict, device: str) -> "DaskCells":
        distributed = _import_distributed()
        threads = int(execution.get("threads_per_worker", 1))
        timeout = float(execution.get("timeout", 10))
        cluster = None
        address = execution.get("scheduler")
        try:
            if address:
                client = distributed.Client(address, timeout=timeout)
            else:
                gpus = torch.cuda.device_count()
                workers = int(execution.get("workers") or gpus or 2)
                cluster = _local_cluster(distributed, workers, threads, device, gpus)
                client = distributed.Client(cluster, timeout=timeout)
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise ExecutorError(f"cannot reach the dask scheduler {address or '(local)'} within {timeout:g} s: "
                                f"{exc}; check the address, or leave out --scheduler to start a local cluster") from None
        self = cls(client, cluster, spec, device, threads)
        try:
            self._check_workers(plan, registry)
        except Exception:
            self.close()
            raise
        return self

    def _check_workers(self, plan, registry) -> None:
        try:
            inventories = self.client.run(worker_inventory)
        except Exception as exc:  # noqa: BLE001 - a worker could not even unpickle the question
            if "No module named 'basinprobe" in str(exc):
                raise ExecutorError(f"the dask workers cannot import basinprobe ({exc}); install basinprobe, "
                                    "and the plugins the spec needs, in every worker's environment") from None
            raise ExecutorError(f"cannot ask the dask workers what they can run: {type(exc).__name__}: {exc}") from None
        if not inventories:
            raise ExecutorError("the dask cluster has no workers")
        self.workers = len(inventories)
        needs = components_of(plan)
        versions = code_versions(registry, needs)
        gpus_needed = (torch.device(self.device).index or 0) + 1 if self.device.startswith("cuda") else 0
        problems = []
        for worker, inventory in sorted(inventories.items()):
            if "error" in inventory:
                problems.append(f"worker {worker}: {inventory['error']}")
                continue
            if inventory["gpus"] < gpus_needed:
                problems.append(f"worker {worker} has {inventory['gpus']} GPUs, but the spec asks for device "
                                f"{self.device!r} (use 'auto' to run on the GPUs where there are some)")
            for package, ours in versions.items():
                theirs = inventory["versions"].get(package, ours)   # one it lacks is reported below
                if theirs != ours:
                    problems.append(f"worker {worker} runs {package} {theirs}, the coordinator {versions[package]} "
                                    "(install the same version on every worker)")
            for kind, wanted in needs.items():
                missing = sorted(wanted - set(inventory[kind]))
                if missing:
                    problems.append(f"worker {worker} lacks {kind[:-1]} {', '.join(map(repr, missing))} "
                                    "(install the plugin that provides it on every worker)")
        factories = sorted({p.config.model.factory for p in plan.points if p.config.model.factory})
        if factories:
            for worker, failed in sorted(self.client.run(factory_failures, factories).items()):
                problems += [f"worker {worker}: {why} (the module must be importable on every worker)"
                             for why in failed.values()]
        if problems:
            raise ExecutorError("; ".join(problems))

    def check_store(self) -> None:
        """Every worker must see the store the coordinator has just created."""
        seen = self.client.run(sees_store, self.output, self.spec.sha256)
        blind = sorted(worker for worker, sees in seen.items() if not sees)
        if blind:
            raise _unseen_store(self.output, f"dask worker{'s' * (len(blind) > 1)} {', '.join(blind)}")

    def _tasks(self, plan, status, batch_cells: bool) -> list[tuple[list, int]]:
        """The points with unfinished cells, one task each; with ``batch_cells``, the points
        that can be batched together are split into as many tasks as there are workers."""
        todo = {}
        for point in plan.points:
            units = [(c.key, e.name) for c in point.cells for e in c.entries]
            count = sum(status.get(u, {}).get("status") != "done" for u in units)
            if count:
                todo[point.key] = (point, count)
        if not batch_cells:
            return [([point], count) for point, count in todo.values()]
        from basinprobe.runtime.execute import batch_key

        together: dict[tuple, list] = {}
        for point, _ in todo.values():
            together.setdefault(batch_key(point), []).append(point)
        tasks = []
        for points in together.values():
            shares = min(len(points), self.workers)
            for i in range(shares):
                share = points[i::shares]
                tasks.append((share, sum(todo[p.key][1] for p in share)))
        return tasks

    def run_points(self, plan, status, reporter, report, batch_cells: bool = False) -> None:
        from distributed import as_completed

        pending = {}
        for points, count in self._tasks(plan, status, batch_cells):
            future = self.client.submit(
                run_points_task, self.spec.text, self.spec_path, self.output, [p.key for p in points],
                self.device, self.threads, batch_cells,
                key=f"basinprobe-{self.spec.sha256[:10]}-{points[0].key}-{len(points)}", pure=False, retries=2)
            pending[future] = (points, count)
        self.futures = list(pending)
        for future in as_completed(self.futures):
            points, count = pending[future]
            label = ", ".join(cell_label(p.coords) or p.key for p in points)
            try:
                done, failures, warnings_ = future.result()
            except Exception as exc:  # the task failed beyond its retries (e.g. workers kept dying)
                done, failures, warnings_ = 0, [f"{label}: {type(exc).__name__}: {exc}"], []
            report.done += done
            report.failures.extend(failures)
            report.warnings.extend(warnings_)
            reporter.cell_done(label, f"{done} cell results written, {len(failures)} failed", count)

    def cancel(self) -> None:
        if self.futures:
            self.client.cancel(self.futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
