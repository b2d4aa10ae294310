"""Benchmark of the batched Langevin chains (run: ``python tests/benchmarks/bench_langevin.py``).

1. CPU, MLP of ~10k parameters, minibatches of 16: 64 chains advanced together
   (``sgld.sample``) against the same 64 chains run one after another
   a) with the same per-step math (``sgld.sample`` with ``chains=1``: vmap over one chain),
   b) the way devinterp runs them (devinterp is not installed here; this is a faithful
      re-implementation of its loop: per chain a deep copy of the model, an SGLD
      ``torch.optim.Optimizer`` whose step loops over the parameter tensors, minibatches
      from a shuffled ``DataLoader`` cycled with ``itertools.cycle``, ``loss.backward()``
      and ``loss.item()`` at every step). Target of the issue: >= 20x.
2. CPU, batched cells: 8 cells (one network initialized from 8 seeds) through
   ``Langevin.run_batched`` against 8 calls of ``Langevin.run``, with minibatches and
   with the defaults (full batch, step_size auto).
3. CPU, ``execution: {compile: true}``: per-step time of the compiled vmapped gradient
   against eager, compilation time reported separately.
4. GPU, only when CUDA is available: per-step time of 1..256 chains on an MLP of ~1M
   parameters, and the CPU/GPU ratio for 64 chains.

Times are medians of repeats after a warm-up, measured with ``time.perf_counter``
in this one process; [1] takes its ratios round by round (see its docstring).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time
import warnings

import torch

from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate import sgld
from basinprobe.runtime.testing import make_context, regression_data
from timing import timed

SMALL = {"in": 32, "hidden": [128, 48], "out": 1}          # 10,465 parameters
LARGE = {"in": 256, "hidden": [1024, 768], "out": 1}       # 1,051,905 parameters


def problem(widths: dict, n: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, widths["in"], generator=g)
    y = torch.tanh(X[:, :1]) + 0.1 * torch.randn(n, 1, generator=g)
    torch.manual_seed(0)
    model = make_mlp(**widths, activation="relu")
    return make_context(model, regression_data(X, y), mse, dtype=dtype, device=device)


def posterior_for(ctx, compile: bool = False) -> sgld.LocalPosterior:
    n = len(ctx.data.X_train)
    return sgld.LocalPosterior(ctx.forward, ctx.loss_fn, ctx.data.X_train, ctx.data.y_train, ctx.flat_params,
                               nbeta=n / math.log(n), localization=1.0, compile=compile,
                               param_shapes=dict(zip(ctx.param_names, ctx.param_shapes)))


class DevinterpStyleSGLD(torch.optim.Optimizer):
    """devinterp's SGLD optimizer step (devinterp.optim.sgld.SGLD, elasticity = γ, temperature
    = nβ/n): per parameter tensor, Δw = nβ·∇L_B + γ·(w − w*), w ← w − (ε/2)·Δw + √ε·N(0, 1)."""

    def __init__(self, params, lr, nbeta, localization):
        super().__init__(params, dict(lr=lr, nbeta=nbeta, localization=localization))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["initial_param"] = p.data.clone().detach()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dw = p.grad.data * group["nbeta"]
                dw.add_(p.data - self.state[p]["initial_param"], alpha=group["localization"])
                p.data.add_(dw, alpha=-0.5 * group["lr"])
                noise = torch.normal(mean=0.0, std=1.0, size=dw.size(), device=dw.device)
                p.data.add_(noise, alpha=group["lr"] ** 0.5)


def devinterp_style_chains(ctx, chains: int, steps: int, batch_size: int, step_size: float) -> list[list[float]]:
    """Chains one after another, as devinterp.slt.sampler.sample with cores=1 runs them."""
    dataset = torch.utils.data.TensorDataset(ctx.data.X_train, ctx.data.y_train)
    n = len(dataset)
    reference = copy.deepcopy(ctx.model)
    torch.nn.utils.vector_to_parameters(ctx.flat_params, reference.parameters())
    traces = []
    for chain in range(chains):
        torch.manual_seed(chain)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
        model = copy.deepcopy(reference)
        optimizer = DevinterpStyleSGLD(model.parameters(), lr=step_size, nbeta=n / math.log(n), localization=1.0)
        losses = []
        model.train()
        for _, (xs, ys) in zip(range(steps), itertools.cycle(loader)):
            optimizer.zero_grad()
            loss = ctx.loss_fn(model(xs), ys)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
        traces.append(losses)
    return traces


def bench_batched_vs_sequential(chains: int = 64, steps: int = 40, batch_size: int = 16,
                                rounds: int = 5) -> dict[str, float]:
    """Each round times the three ways back to back and takes their ratios, so that the load of a
    shared machine, which drifts over seconds, divides out. Within a round every run is short and
    timed alone (the batched run 5 times, each sequential chain once), and each way's time is
    its median run, times 64 for the chains run one by one: a burst of load on the machine
    spoils one run, not the round. Reported: the median over rounds."""
    ctx = problem(SMALL, n=1024, device="cpu")
    post = posterior_for(ctx)
    kwargs = dict(step_size=1e-5, draws=steps, batch_size=batch_size, draw_loss="minibatch")

    def once(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def batched():
        return statistics.median(once(lambda: sgld.sample(post, chains=chains, seed=0, **kwargs)) for _ in range(5))

    def same_math_one_by_one():
        return chains * statistics.median(
            once(lambda: sgld.sample(post, chains=1, seed=k, **kwargs)) for k in range(chains))

    def devinterp_style():
        return chains * statistics.median(
            once(lambda: devinterp_style_chains(ctx, 1, steps, batch_size, step_size=1e-5)) for _ in range(chains))

    ways = {"batched": batched, "same_math": same_math_one_by_one, "devinterp_style": devinterp_style}
    times = {name: [] for name in ways}
    for fn in ways.values():
        fn()                                              # warm-up
    for _ in range(rounds):
        for name, fn in ways.items():
            times[name].append(fn())
    ratios = {name: [other / mine for other, mine in zip(times[name], times["batched"])]
              for name in ("same_math", "devinterp_style")}
    per_step = {name: statistics.median(t) / steps * 1e3 for name, t in times.items()}
    print(f"[1] CPU, MLP {SMALL} ({post.d} parameters), float32, minibatch {batch_size}, {steps} steps, "
          f"{torch.get_num_threads()} threads, {rounds} rounds (medians)")
    print(f"  {chains} chains together (vmap):                 {per_step['batched']:8.2f} ms/step")
    print(f"  {chains} chains one by one, same math:           {per_step['same_math']:8.2f} ms/step (all chains)")
    print(f"  {chains} chains one by one, devinterp-style loop: {per_step['devinterp_style']:8.2f} ms/step (all chains)")
    for name, label, target in [("same_math", "same math one by one", " (target >= 20x)"),
                                ("devinterp_style", "devinterp-style loop", "")]:
        r = ratios[name]
        print(f"  speed-up vs {label + ':':22s} {statistics.median(r):5.1f}x median of rounds "
              f"({min(r):.1f}-{max(r):.1f}x){target}")
    return {name: statistics.median(r) for name, r in ratios.items()}


def bench_batched_cells(cells: int = 8) -> dict[str, float]:
    """Cells of a seed sweep through one run_batched call against one run per cell, in two regimes:
    minibatches and a fixed step (per-step work is small, so per-op overhead dominates and batching
    pays), and the defaults (full batch, step_size auto: the 64 calibration chains per cell make
    each step compute-bound already, so batching saves little)."""
    from basinprobe.probes.langevin import Langevin

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = torch.tanh(X[:, :2].sum(1, keepdim=True)) + 0.1 * torch.randn(256, 1, generator=g, dtype=torch.float64)
    data = regression_data(X, y)
    contexts = []
    for seed in range(cells):
        torch.manual_seed(seed)
        model = make_mlp(**{"in": 8, "hidden": [32], "out": 1, "activation": "tanh"}).double()
        contexts.append(make_context(model, data, mse, seed=seed))
    probe = Langevin()
    print(f"[2] CPU, batched cells: {cells} seeds of an MLP 8->32->1 ({contexts[0].n_params} parameters), n = 256, "
          "float64, 8 chains per cell")
    ratios = {}
    for label, params in [("minibatch 32, step 1e-3, 200 draws", {"batch_size": 32, "step_size": 1e-3}),
                          ("full batch, step_size auto, 100 draws", {"draws": 100})]:
        params = probe.resolve({"chains": 8, "draws": 200, **params})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_each = timed(lambda: [probe.run(ctx, params) for ctx in contexts], "cpu", repeats=1)
            t_together = timed(lambda: probe.run_batched(contexts, params), "cpu", repeats=1)
        ratios[label] = t_each / t_together
        print(f"  {label:40s} one by one {t_each:7.2f} s, together (run_batched) {t_together:7.2f} s: "
              f"{ratios[label]:.1f}x")
    return ratios


def bench_compile(chains: int = 64, steps: int = 40, batch_size: int = 16) -> float | None:
    ctx = problem(SMALL, n=1024, device="cpu")
    kwargs = dict(chains=chains, step_size=1e-5, draws=steps, batch_size=batch_size, draw_loss="minibatch", seed=0)
    eager = posterior_for(ctx)
    compiled = posterior_for(ctx, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        sgld.sample(compiled, **{**kwargs, "draws": 1})       # compiles
        t_compile = time.perf_counter() - start
    fell_back = [str(w.message) for w in caught if "sgld step" in str(w.message)]
    t_eager = timed(lambda: sgld.sample(eager, **kwargs), "cpu", repeats=5)
    t_compiled = timed(lambda: sgld.sample(compiled, **kwargs), "cpu", repeats=5)
    print(f"[3] CPU, compile: {chains} chains, MLP {SMALL}, minibatch {batch_size}"
          + (f" (FELL BACK TO EAGER: {fell_back[0]})" if fell_back else ""))
    print(f"  eager {t_eager / steps * 1e3:.2f} ms/step, compiled {t_compiled / steps * 1e3:.2f} ms/step "
          f"(eager/compiled {t_eager / t_compiled:.2f}x), first call incl. compilation {t_compile:.1f} s")
    return t_eager / t_compiled


def bench_gpu(chain_counts=(1, 16, 64, 256), steps: int = 50, batch_size: int = 64, compile: bool = False):
    if not torch.cuda.is_available():
        print("[4] GPU: CUDA not available, skipped")
        return None
    ctx = problem(LARGE, n=8192, device="cuda")
    post = posterior_for(ctx, compile=compile)
    print(f"[4] GPU {torch.cuda.get_device_name()}, MLP {LARGE} ({post.d} parameters), minibatch {batch_size}, "
          f"float32{', compiled' if compile else ''}")
    per_step = {}
    for chains in chain_counts:
        elapsed = timed(lambda: sgld.sample(post, chains=chains, step_size=1e-6, draws=steps, batch_size=batch_size,
                                            draw_loss="minibatch", seed=0), "cuda", repeats=3)
        per_step[chains] = elapsed / steps
        print(f"  {chains:4d} chains: {per_step[chains] * 1e3:8.2f} ms/step, "
              f"{per_step[chains] / chains * 1e6:8.1f} us/chain-step, "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak")
    cpu_post = posterior_for(problem(LARGE, n=8192, device="cpu"))
    cpu_steps = 3
    t_cpu = timed(lambda: sgld.sample(cpu_post, chains=64, step_size=1e-6, draws=cpu_steps, batch_size=batch_size,
                                      draw_loss="minibatch", seed=0), "cpu", repeats=1) / cpu_steps
    if 64 in per_step:
        print(f"  CPU ({torch.get_num_threads()} threads) 64 chains: {t_cpu * 1e3:.1f} ms/step; "
              f"GPU speed-up {t_cpu / per_step[64]:.0f}x")
    return per_step


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["chains", "cells", "compile", "gpu"], nargs="*")
    parser.add_argument("--gpu-compile", action="store_true", help="compile the SGLD step in the GPU benchmark")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a shared, "
                        "oversubscribed machine 1 avoids OpenMP barrier stalls that slow small ops 10x or more")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["chains", "cells", "compile", "gpu"])
    if "chains" in only:
        bench_batched_vs_sequential()
    if "cells" in only:
        bench_batched_cells()
    if "compile" in only:
        bench_compile()
    if "gpu" in only:
        bench_gpu(compile=args.gpu_compile)
