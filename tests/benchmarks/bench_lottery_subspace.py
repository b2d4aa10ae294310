"""Benchmark of subspace training (run: ``python tests/benchmarks/bench_lottery_subspace.py``).

1. Memory: a d = 1000 random subspace of a ~1M-parameter MLP (float32). A dense P would be
   n·d·4 bytes = 4 GB by itself; the probe's ``projection: auto`` picks the very sparse
   projection (⌈√n⌉ nonzeros per column). Reported: the projection's bytes, the peak resident
   memory of this process (ru_maxrss) after building it and training a few steps, and the
   time per step. Target of the issue: fits in 4 GB.
2. Batching: 8 random repeats of a d = 32 subspace of a digits-sized MLP (64-32-10, 2410
   parameters, minibatches of 128), trained together (one vmapped step over the 8 models)
   against a loop of 8 single runs with the same per-step math. Target: >= 3x on CPU.
   Also 8 repeats x 5 dims in one run against the 40 single runs.
3. GPU, when CUDA is available: per-step time of the 1M-parameter case.

Times are medians of repeats after a warm-up, measured with ``time.perf_counter`` in this
one process.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from basinprobe.runtime.losses import cross_entropy
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.spec import OptimizerSpec
from basinprobe.runtime.substrate import subspace
from basinprobe.runtime.testing import make_context
from basinprobe.registry import Dataset

SMALL = {"in": 64, "hidden": [32], "out": 10}            # 2,410 parameters
LARGE = {"in": 784, "hidden": [1024, 192], "out": 10}    # 1,002,698 parameters
ADAM = OptimizerSpec("adam", 0.01, 0.0, False, 0.0, (0.9, 0.999))


def problem(widths: dict, n: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, widths["in"], generator=g)
    y = torch.randint(0, widths["out"], (n,), generator=g)
    torch.manual_seed(0)
    model = make_mlp(**widths, activation="relu")
    data = Dataset(X, y, X[:0], y[:0], task="classification", n_classes=widths["out"])
    return make_context(model, data, cross_entropy, dtype=torch.float32, device=device)


def per_step(ctx, projection, dims, steps, batch=128, repeats=3) -> float:
    """Median seconds per step of ``train_in_subspace`` (after one warm-up run)."""
    def once():
        start = time.perf_counter()
        subspace.train_in_subspace(ctx.forward, ctx.loss_fn, ctx.flat_params, projection, dims, ctx.data.X_train,
                                   ctx.data.y_train, ADAM, steps, batch, torch.Generator().manual_seed(0))
        return (time.perf_counter() - start) / steps

    once()
    return statistics.median(once() for _ in range(repeats))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory(device: str = "cpu") -> None:
    ctx = problem(LARGE, 512, device)
    n, d = ctx.n_params, 1000
    print(f"1. memory: MLP {LARGE['in']}-{LARGE['hidden']}-{LARGE['out']}, n = {n:,}, d = {d}, float32")
    print(f"   dense P would need {n * d * 4 / 2**30:.2f} GB; peak RSS before: {peak_rss_gb():.2f} GB")
    start = time.perf_counter()
    P = subspace.SparseProjection(n, d, 1, torch.Generator().manual_seed(0), torch.float32, device)
    built = time.perf_counter() - start
    print(f"   sparse P: {P.nbytes / 2**20:.1f} MB ({P.values.numel():,} nonzeros), built in {built:.2f} s")
    step = per_step(ctx, P, [d], steps=5, repeats=2)
    print(f"   {step * 1e3:.1f} ms per training step (batch 128); peak RSS after: {peak_rss_gb():.2f} GB "
          f"(target < 4 GB)")


def batching() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = problem(SMALL, 1437)
    n, d, repeats, steps = ctx.n_params, 32, 8, 50
    P = subspace.DenseProjection(subspace.random_dense_basis(n, d, repeats, torch.Generator().manual_seed(0)))
    batched = per_step(ctx, P, [d], steps)
    singles = [subspace.DenseProjection(P.matrices[g:g + 1]) for g in range(repeats)]
    loop = sum(per_step(ctx, single, [d], steps) for single in singles)
    print(f"2. batching: MLP 64-32-10 (n = {n:,}), d = {d}, minibatch 128, 1 thread")
    print(f"   {repeats} repeats batched: {batched * 1e3:.2f} ms/step; loop of {repeats}: {loop * 1e3:.2f} ms/step; "
          f"ratio {loop / batched:.1f}x (target >= 3x)")
    dims = [4, 8, 16, 32, 64]
    P = subspace.DenseProjection(subspace.random_dense_basis(n, max(dims), repeats, torch.Generator().manual_seed(0)))
    all_at_once = per_step(ctx, P, dims, steps)
    singles = [subspace.DenseProjection(P.matrices[g:g + 1]) for g in range(repeats)]
    one_by_one = sum(per_step(ctx, single, [dd], steps, repeats=1) for single in singles for dd in dims)
    print(f"   {repeats} repeats x {len(dims)} dims in one run: {all_at_once * 1e3:.2f} ms/step; "
          f"{repeats * len(dims)} single runs: {one_by_one * 1e3:.2f} ms/step; ratio {one_by_one / all_at_once:.1f}x")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        memory()
    batching()
    if torch.cuda.is_available():
        print("3. GPU:")
        memory("cuda")


if __name__ == "__main__":
    main()
