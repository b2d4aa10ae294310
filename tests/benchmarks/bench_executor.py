"""Local executor vs a 2-worker dask LocalCluster on a 16-cell sweep, timed in one process.

Run: python tests/benchmarks/bench_executor.py
The ratio includes starting the cluster (the price a user pays for --executor dask), a few
seconds, so the cells are made big enough (a few seconds of training each) for the ratio to say
how the executor scales rather than how fast a cluster starts.
"""

import shutil
import tempfile
import textwrap
import time
from pathlib import Path

SPEC = textwrap.dedent("""
    version: 1
    name: bench-executor
    device: cpu
    model: {kind: mlp, with: {in: 64, hidden: [64, 64], out: 10, activation: relu}}
    data: {kind: digits, batch_size: 128}
    loss: cross_entropy
    train: {optimizer: {kind: sgd, lr: 0.05, momentum: 0.9}, steps: 4000, checkpoints: {at: [0, 4000]}}
    sweep: {seed: [0, 1, 2, 3, 4, 5, 6, 7]}
    probes:
      - {name: eval, probe: evaluate}
    output: OUT
""")


def timed_run(folder: Path, name: str, **kw) -> float:
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.spec import load_spec

    path = folder / f"{name}.yaml"
    path.write_text(SPEC.replace("OUT", f"{name}.zarr"))
    spec = load_spec(path)
    started = time.perf_counter()
    report = run_spec(spec, **kw)
    elapsed = time.perf_counter() - started
    assert report.ok and report.done == 16, report
    return elapsed


def cluster_startup() -> float:
    """What --executor dask pays before the first cell: a 2-worker LocalCluster whose workers
    import torch and basinprobe and report their plugins."""
    import distributed

    from basinprobe.runtime.distributed import worker_inventory

    started = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    client.run(worker_inventory)
    elapsed = time.perf_counter() - started
    client.close()
    cluster.close()
    return elapsed


def main(repeats: int = 3) -> None:
    import sys
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else repeats
    local, dask = [], []
    for i in range(repeats):
        folder = Path(tempfile.mkdtemp())
        try:
            local.append(timed_run(folder, f"local{i}"))
            dask.append(timed_run(folder, f"dask{i}", executor="dask", workers=2))
        finally:
            shutil.rmtree(folder)
    local.sort(), dask.sort()
    med_l, med_d = local[len(local) // 2], dask[len(dask) // 2]
    print(f"16-cell sweep (8 seeds x 2 checkpoints, 4000 training steps each), median of {repeats}:")
    print(f"  local executor      {med_l:6.2f} s   (all: {', '.join(f'{t:.2f}' for t in local)})")
    print(f"  dask, 2 workers     {med_d:6.2f} s   (all: {', '.join(f'{t:.2f}' for t in dask)})")
    print(f"  ratio dask / local  {med_d / med_l:6.2f}   (target <= 0.65)")
    startup = sorted(cluster_startup() for _ in range(repeats))[repeats // 2]
    print(f"  cluster start-up    {startup:6.2f} s   (LocalCluster + workers importing torch and basinprobe)")
    print(f"  ratio without it    {(med_d - startup) / med_l:6.2f}")


if __name__ == "__main__":
    main()
