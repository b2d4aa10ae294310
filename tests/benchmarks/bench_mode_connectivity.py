"""Benchmark of the batched interpolation path (run: ``python tests/benchmarks/bench_mode_connectivity.py``).

Loss and accuracy at 25 points α of the straight path between two MLPs on a
digits-sized classification set (1,437 examples of 64 features, 10 classes, batches of
256 as in the example spec), on CPU, for a small MLP (64 -> 32 -> 32 -> 10, the example
spec's) and a wider one (64 -> 128 -> 128 -> 10):

- batched: all 25 points in one ``stacked_loss_and_accuracy`` call (one vmapped forward
  per data batch), as the probe does;
- loop (plain): a Python loop over α, each point evaluated with ``ctx.loss`` and
  ``ctx.accuracy`` (one ``functional_call`` forward per batch, as tools that walk the path
  point by point do);
- loop (same function): a loop over α calling ``stacked_loss_and_accuracy`` on one vector.

Prints the times and the speed-ups over each loop (target ≥ 5×), plus the time of one
weight matching of the two networks. Times are medians of repeats after a warm-up,
measured with ``time.perf_counter`` in this one process. With CUDA available, the same
comparison runs on the GPU.

    python tests/benchmarks/bench_mode_connectivity.py [--threads N]   (0: torch's default)
"""

from __future__ import annotations

import argparse

import torch

from basinprobe.registry import Dataset
from basinprobe.runtime.losses import cross_entropy
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate import permutation
from basinprobe.runtime.substrate.evaluation import stacked_loss_and_accuracy
from basinprobe.runtime.substrate.interpolation import linear_path
from basinprobe.runtime.testing import make_context
from timing import sync, timed

POINTS = 25
HIDDEN = {"small": [32, 32], "wide": [128, 128]}


def setup(device: str, hidden: list[int], dtype=torch.float32):
    widths = {"in": 64, "hidden": hidden, "out": 10, "activation": "relu"}
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1437, 64, generator=g)
    y = torch.randint(10, (1437,), generator=g)
    data = Dataset(X, y, X[:0], y[:0], task="classification", n_classes=10)
    torch.manual_seed(0)
    ctx = make_context(make_mlp(**widths), data, cross_entropy, dtype=dtype, device=device, batch_size=256)
    torch.manual_seed(1)
    other = make_context(make_mlp(**widths), data, cross_entropy, dtype=dtype, device=device, batch_size=256)
    return ctx, other


def compare(device: str, hidden: list[int], repeats: int = 7) -> None:
    ctx, other = setup(device, hidden)
    alphas = torch.linspace(0, 1, POINTS, dtype=torch.float64)
    path = linear_path(ctx.flat_params, other.flat_params, alphas)

    def batched():
        return stacked_loss_and_accuracy(ctx, path)

    def loop_plain():
        return [(ctx.loss(path[k]), ctx.accuracy(path[k])) for k in range(POINTS)]

    def loop_same():
        return [stacked_loss_and_accuracy(ctx, path[k:k + 1]) for k in range(POINTS)]

    expected = torch.stack([loss for loss, _ in loop_plain()]).double()
    assert torch.allclose(batched()[0], expected, rtol=1e-5), "the batched path must equal the loop"
    t_batched = timed(batched, device, repeats)
    t_plain, t_same = timed(loop_plain, device, repeats), timed(loop_same, device, repeats)
    axes = permutation.hidden_axes(ctx.model)
    t_match = timed(lambda: permutation.weight_matching(ctx.params, other.params, axes), device, repeats)
    print(f"[{device}] MLP 64-{'-'.join(map(str, hidden))}-10, {ctx.n_params} parameters, {POINTS} points, "
          f"{len(ctx.data.X_train)} examples in batches of {ctx.batch_size}, {torch.get_num_threads()} CPU threads")
    print(f"  batched path (vmap):        {t_batched * 1e3:8.2f} ms")
    print(f"  loop over alpha (plain):    {t_plain * 1e3:8.2f} ms   speed-up {t_plain / t_batched:5.1f}x")
    print(f"  loop over alpha (same fn):  {t_same * 1e3:8.2f} ms   speed-up {t_same / t_batched:5.1f}x   "
          f"(target >= 5x)")
    print(f"  weight matching:            {t_match * 1e3:8.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}")
    for hidden in HIDDEN.values():
        compare("cpu", hidden)
    if torch.cuda.is_available():
        for hidden in HIDDEN.values():
            compare("cuda", hidden)
