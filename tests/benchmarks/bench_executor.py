"""Local executor vs a 2-worker dask LocalCluster on a 16-cell sweep, as whole commands.

Run: python tests/benchmarks/bench_executor.py [repeats] [--steps N]
Each repeat runs ``basinprobe run SPEC`` and ``basinprobe run SPEC --executor dask --workers 2``
in turn, each in a fresh process writing a fresh store, so both pay what a user pays
(imports, and for dask the cluster's start); the ratio is taken pair by pair and its median
printed. The cells are seconds of training each (``--steps``, default 4000 training steps per
seed, ~4 s here), so the ratio says how the executor scales rather than how fast a cluster
starts; each command also pays ~5 s that no executor can split (imports, the store), which
longer cells amortize.
"""

import argparse
import shutil
import subprocess
import sys
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
    train: {optimizer: {kind: sgd, lr: 0.05, momentum: 0.9}, steps: STEPS, checkpoints: {at: [0, STEPS]}}
    sweep: {seed: [0, 1, 2, 3, 4, 5, 6, 7]}
    probes:
      - {name: eval, probe: evaluate}
    output: OUT
""")


def timed_command(folder: Path, name: str, steps: int, *extra: str) -> float:
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.replace("OUT", "unused.zarr").replace("STEPS", str(steps)))
    store = folder / f"{name}.zarr"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "basinprobe.runtime.cli", "run", str(spec), "-o", str(store), "-q",
                           *extra], check=True, capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - started
    assert "16 cell results written" in done and ", 0 failed" in done, done
    shutil.rmtree(store)
    return elapsed


STARTUP = textwrap.dedent("""
    import time
    import dask, distributed
    from basinprobe.runtime.distributed import _start_method, worker_inventory
    started = time.perf_counter()
    with dask.config.set({"distributed.worker.multiprocessing-method": _start_method("cpu")}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    client = distributed.Client(cluster)
    client.run(worker_inventory)
    print(time.perf_counter() - started)
    client.close()
    cluster.close()
""")


def cluster_startup() -> float:
    """What --executor dask pays before the first cell, in a fresh process: a 2-worker
    LocalCluster whose workers report their plugins."""
    out = subprocess.run([sys.executable, "-c", STARTUP], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repeats", nargs="?", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4000, help="training steps per seed")
    args = parser.parse_args()
    repeats, steps = args.repeats, args.steps
    folder = Path(tempfile.mkdtemp())
    local, dask, ratios = [], [], []
    try:
        timed_command(folder, "warmup", steps)   # file caches, compiled bytecode
        for i in range(repeats):
            local.append(timed_command(folder, f"local{i}", steps))
            dask.append(timed_command(folder, f"dask{i}", steps, "--executor", "dask", "--workers", "2"))
            ratios.append(dask[-1] / local[-1])
    finally:
        shutil.rmtree(folder)

    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"16-cell sweep (8 seeds x 2 checkpoints, {steps} training steps each), whole commands, {repeats} pairs:")
    print(f"  local executor      {median(local):6.2f} s   (all: {', '.join(f'{t:.2f}' for t in local)})")
    print(f"  dask, 2 workers     {median(dask):6.2f} s   (all: {', '.join(f'{t:.2f}' for t in dask)})")
    print(f"  ratio dask / local  {median(ratios):6.2f}   (pairs: {', '.join(f'{r:.2f}' for r in ratios)}; "
          "target <= 0.65)")
    startup = median([cluster_startup() for _ in range(repeats)])
    print(f"  cluster start-up    {startup:6.2f} s   (LocalCluster + workers reporting their plugins)")


if __name__ == "__main__":
    main()
