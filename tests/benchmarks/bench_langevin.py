"""Benchmark of the batched Langevin chains (run: ``python tests/benchmarks/bench_langevin.py``).

1. CPU: 64 chains advanced together vs the same 64 chains run one after another,
   with the same per-step math (the same ``sgld.sample`` with ``chains=1``), on an
   MLP of ~10k parameters with minibatches of 32. Prints the speed-up (target ≥ 20×).
2. GPU, only when CUDA is available: per-step time of 1..256 chains on an MLP of
   ~1M parameters.

Times are medians of repeats after a warm-up, measured with ``time.perf_counter``
in this one process.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate import sgld
from basinprobe.runtime.testing import make_context, regression_data


def posterior_for(widths: dict, n: int, device: str, dtype=torch.float32) -> sgld.LocalPosterior:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, widths["in"], generator=g)
    y = torch.tanh(X[:, :1]) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(0)
    model = make_mlp(**widths, activation="relu")
    ctx = make_context(model, regression_data(X, y), mse, dtype=dtype, device=device)
    return sgld.LocalPosterior(ctx.forward, ctx.loss_fn, ctx.data.X_train, ctx.data.y_train, ctx.flat_params,
                               nbeta=n / math.log(n), localization=1.0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_batched_vs_sequential(chains: int = 64, steps: int = 40, batch_size: int = 16) -> float:
    widths = {"in": 32, "hidden": [128, 48], "out": 1}
    post = posterior_for(widths, n=1024, device="cpu")
    kwargs = dict(step_size=1e-5, draws=steps, batch_size=batch_size, draw_loss="minibatch")

    def batched():
        sgld.sample(post, chains=chains, seed=0, **kwargs)

    def sequential():
        for k in range(chains):
            sgld.sample(post, chains=1, seed=k, **kwargs)

    t_batched = timed(batched, "cpu", repeats=5)
    t_sequential = timed(sequential, "cpu", repeats=3)
    print(f"CPU, MLP {widths} ({post.d} parameters), minibatch {batch_size}, {steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  {chains} chains together:     {t_batched / steps * 1e3:8.2f} ms/step")
    print(f"  {chains} chains one by one:   {t_sequential / steps * 1e3:8.2f} ms/step (all chains)")
    ratio = t_sequential / t_batched
    print(f"  speed-up: {ratio:.1f}x (target >= 20x)")
    return ratio


def bench_gpu(chain_counts=(1, 16, 64, 256), steps: int = 50, batch_size: int = 64) -> dict[int, float] | None:
    if not torch.cuda.is_available():
        print("GPU: CUDA not available, skipped")
        return None
    widths = {"in": 256, "hidden": [1024, 768], "out": 1}
    post = posterior_for(widths, n=8192, device="cuda")
    print(f"GPU {torch.cuda.get_device_name()}, MLP {widths} ({post.d} parameters), minibatch {batch_size}, float32")
    per_step = {}
    for chains in chain_counts:
        elapsed = timed(lambda: sgld.sample(post, chains=chains, step_size=1e-6, draws=steps, batch_size=batch_size,
                                            draw_loss="minibatch", seed=0), "cuda", repeats=3)
        per_step[chains] = elapsed / steps
        print(f"  {chains:4d} chains: {per_step[chains] * 1e3:8.2f} ms/step, "
              f"{per_step[chains] / chains * 1e6:8.1f} us/chain-step")
    return per_step


if __name__ == "__main__":
    bench_batched_vs_sequential()
    bench_gpu()
