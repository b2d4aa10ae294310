"""Benchmarks of the per-input Jacobian (runtime/substrate/jacobian.py), measured in one process.

    python tests/benchmarks/bench_jacobian.py [--quick]

1. vmapped Jacobian vs a Python loop of per-input ``torch.autograd.grad`` calls, on an
   MLP 64 -> 256 -> 128 -> 1 (49,665 parameters) and 512 inputs, float64 and float32;
   both build the same 512 x 49,665 matrix (checked). "fresh": each call allocates J
   (as the probe does); "reused": both write into one buffer (compute only).
2. reverse (vjp rows) vs forward (jvp columns) by shape, for choose_mode.
3. peak resident memory of the Gram path against the budget it was planned for, each
   budget in a fresh process (VmHWM, reset through /proc/self/clear_refs, minus the
   resident size before; a fresh process so freed heap from earlier runs does not hide it).

Times are medians of repeats after a warm-up; loop and vmap are interleaved so load
from other processes falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
from torch.func import functional_call

from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.substrate import jacobian as jac
from basinprobe.runtime.substrate.jacobian import JacobianPlan


def mlp(inp, hidden, out, dtype, activation="tanh", seed=0):
    torch.manual_seed(seed)
    model = make_mlp(**{"in": inp, "hidden": hidden, "out": out, "activation": activation}).to(dtype)
    params = {name: p.detach() for name, p in model.named_parameters()}
    return model, params, (lambda p, x: functional_call(model, p, (x,)))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(fns: dict, repeats: int) -> dict:
    """Median (wall, cpu) seconds of each function, repeats interleaved after one warm-up each."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
            for name, v in samples.items()}


def bench_vmap_vs_loop(dtype, repeats):
    model, params, fn = mlp(64, [256, 128], 1, dtype)
    X = torch.randn(512, 64, dtype=dtype)
    n = sum(p.numel() for p in params.values())
    acts = jac.activation_numel(fn, params, X)
    plan = jac.plan_jacobian(512, 1, n, acts=acts, itemsize=X.element_size())
    network = jac.ModuleNetwork(model)  # what the probe passes: per-example identity of its Linear layers
    in_place = jac.plan_jacobian(512, 1, n, acts=acts, itemsize=X.element_size(),
                                 in_place=network.per_example_identity(params, X))
    buffer_loop = torch.zeros(512, n, dtype=dtype)
    buffer_vmap = torch.zeros(512, n, dtype=dtype)

    def loop(out=None):
        J = torch.empty(512, n, dtype=dtype) if out is None else out
        for i in range(len(X)):
            y = model(X[i:i + 1]).sum()
            grads = torch.autograd.grad(y, list(model.parameters()))
            torch.cat([g.reshape(-1) for g in grads], out=J[i])
        return J

    def vmapped(out=None):
        return jac.jacobian(fn, params, X, chunk=plan.chunk, mode=plan.mode, out=out)

    def per_example(out=None):
        return jac.jacobian(network, params, X, chunk=in_place.chunk, mode=in_place.mode, out=out)

    reference = loop()
    err = max(float((reference - vmapped()).abs().max()), float((reference - per_example()).abs().max()))
    times = compare({
        "loop fresh": loop, "vmap fresh": vmapped, "linear fresh": per_example,
        "loop reused": lambda: loop(buffer_loop), "vmap reused": lambda: vmapped(buffer_vmap),
        "linear reused": lambda: per_example(buffer_vmap),
    }, repeats)
    print(f"\n[1] Jacobian 512 x {n} ({str(dtype)[6:]}), chunk {plan.chunk} (linear: {in_place.chunk}), "
          f"max |J - J_loop| = {err:.1e}")
    print(f"    {'':14s}{'wall s':>9s}{'cpu s':>9s}   (linear: the per-example identity the probe uses)")
    for name, (wall, cpu) in times.items():
        print(f"    {name:14s}{wall:9.3f}{cpu:9.3f}")
    for path in ("vmap", "linear"):
        for kind in ("fresh", "reused"):
            wall = times[f"loop {kind}"][0] / times[f"{path} {kind}"][0]
            cpu = times[f"loop {kind}"][1] / times[f"{path} {kind}"][1]
            print(f"    speed-up {path} vs loop ({kind} J): {wall:.1f}x wall, {cpu:.1f}x cpu  [issue: >= 10x]")
    # the floor of any method: writing J once
    fill = compare({"fill": lambda: buffer_vmap.fill_(1.0)}, repeats)["fill"][0]
    print(f"    writing J once (fill_): {fill:.3f} s wall; loop reused / fill = {times['loop reused'][0] / fill:.1f}x "
          "(the most any vmapped J can gain)")


def bench_modes(repeats):
    print("\n[2] reverse (vjp rows) vs forward (jvp columns), float64; choose_mode picks forward iff n < out")
    print(f"    {'model':28s}{'n':>7s}{'out':>5s}{'k':>5s}{'reverse ms':>12s}{'forward ms':>12s}  choice")
    cases = [((4, [8], 1), 256), ((10, [32], 1), 512), ((10, [32, 32], 10), 256), ((2, [2], 64), 256)]
    for (inp, hidden, out), k in cases:
        model, params, fn = mlp(inp, hidden, out, torch.float64)
        X = torch.randn(k, inp, dtype=torch.float64)
        n = sum(p.numel() for p in params.values())
        times = compare({mode: (lambda mode=mode: jac.jacobian(fn, params, X, chunk=k, mode=mode))
                         for mode in ("reverse", "forward")}, repeats)
        print(f"    {f'mlp {inp}->{hidden}->{out}':28s}{n:7d}{out:5d}{k:5d}{times['reverse'][0] * 1e3:12.1f}"
              f"{times['forward'][0] * 1e3:12.1f}  {jac.choose_mode(n, out)}")

    # a model with fewer parameters than outputs: x -> tanh((x * θ) @ A), θ ∈ R^8, 256 outputs
    A = torch.randn(8, 256, dtype=torch.float64)
    params = {"theta": torch.randn(8, dtype=torch.float64)}
    X = torch.randn(256, 8, dtype=torch.float64)

    def fn(p, x):
        return torch.tanh((x * p["theta"]) @ A)

    times = compare({mode: (lambda mode=mode: jac.jacobian(fn, params, X, chunk=256, mode=mode))
                     for mode in ("reverse", "forward")}, repeats)
    print(f"    {'tanh((x*θ) A)':28s}{8:7d}{256:5d}{256:5d}{times['reverse'][0] * 1e3:12.1f}"
          f"{times['forward'][0] * 1e3:12.1f}  {jac.choose_mode(8, 256)}")


GRAM_CASES = {
    # side: (mlp widths, inputs, budgets in MiB)
    "outputs": ((32, [256, 64], 4), 128, (16, 32, 64)),
    "params": ((16, [48], 1), 4096, (16, 24, 48)),
}


def _mib(field):
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def gram_child(side: str, budget: int) -> None:
    """In a fresh process: the Gram spectrum under ``budget`` MiB, printing its measured peak as JSON."""
    (inp, hidden, out), k, _ = GRAM_CASES[side]
    model, params, fn = mlp(inp, hidden, out, torch.float64)
    X = torch.randn(k, inp, dtype=torch.float64)
    n = sum(p.numel() for p in params.values())
    plan = jac.plan_jacobian(k, out, n, acts=jac.activation_numel(fn, params, X), itemsize=8,
                             memory_bytes=budget << 20)
    # warm-up along the same path and side, with the same chunks, on one chunk and one input more:
    # MKL's first gemm of a shape and first syevd load kernels and cache buffers (~6-7 MiB) once
    # per process, which the budget is not about
    few = min(k, plan.chunk + 1)
    jac.jacobian_spectrum(fn, params, X[:few], JacobianPlan(**{**plan.__dict__, "rows": few * out}))
    before = _mib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")   # reset the high-water mark VmHWM to VmRSS
    start = time.perf_counter()
    spectrum = jac.jacobian_spectrum(fn, params, X, plan)
    elapsed = time.perf_counter() - start
    print(json.dumps({"rows": k * out, "n": n, "path": f"{plan.path}_{plan.side}", "chunk": plan.chunk,
                      "jvp_chunk": plan.jvp_chunk, "modelled": plan.bytes / 2**20,
                      "peak": _mib("VmHWM") - before, "seconds": elapsed, "rank": spectrum.rank}))


# glibc keeps freed blocks below its (adaptive) mmap threshold resident, and MKL's memory manager
# keeps its gemm buffers (~4 MiB here), so the default high-water mark also counts memory that
# nothing holds any more; with a fixed 64 KiB mmap threshold, no trim threshold and MKL's buffer
# cache off, every large block is unmapped on free and the mark follows what is held at once.
ALLOCATORS = {"default": {}, "live": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
                                      "MKL_DISABLE_FAST_MM": "1"}}


def bench_gram_memory(quick, threads):
    print("\n[3] peak resident memory of the Gram path vs its budget, float64, each in a fresh process "
          "(VmHWM - VmRSS before; 'default' allocators, 'live': large blocks unmapped on free)")
    ratios = []
    for side, (_, _, budgets) in GRAM_CASES.items():
        if quick and side == "params":
            continue
        print(f"    {'budget MiB':>12s}{'J MiB':>8s}{'Gram MiB':>9s}{'path':>14s}{'chunk':>7s}{'jvp_chunk':>10s}"
              f"{'modelled MiB':>14s}{'peak default':>14s}{'peak live':>11s}{'time s':>8s}{'rank':>6s}")
        for budget in budgets:
            cmd = [sys.executable, __file__, "--gram-child", side, str(budget)]
            if threads:
                cmd += ["--threads", str(threads)]
            runs = {}
            for name, env in ALLOCATORS.items():
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
                runs[name] = json.loads(out.stdout.splitlines()[-1])
            r = runs["default"]
            m = min(r["rows"], r["n"])
            print(f"    {budget:12d}{r['rows'] * r['n'] * 8 / 2**20:8.0f}{m * m * 8 / 2**20:9.1f}{r['path']:>14s}"
                  f"{r['chunk']:7d}{r['jvp_chunk']:10d}{r['modelled']:14.1f}{r['peak']:14.1f}"
                  f"{runs['live']['peak']:11.1f}{r['seconds']:8.2f}{r['rank']:6d}")
            ratios.append((runs["default"]["peak"] / budget, runs["live"]["peak"] / budget))
    print(f"    peak / budget: at most {max(r[0] for r in ratios):.2f} (default allocators), "
          f"{max(r[1] for r in ratios):.2f} (live)  [issue: bounded by the budget, <= 1]")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gram-child", nargs=2, metavar=("SIDE", "BUDGET_MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gram_child:
        return gram_child(args.gram_child[0], int(args.gram_child[1]))
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench_vmap_vs_loop(torch.float64, repeats)
    bench_vmap_vs_loop(torch.float32, repeats)
    bench_modes(repeats)
    bench_gram_memory(args.quick, args.threads)


if __name__ == "__main__":
    main()
