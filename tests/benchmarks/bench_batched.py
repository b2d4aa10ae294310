"""Benchmark of batched cells: 16 seeds of a small MLP through ``evaluate`` + ``hessian_spectrum``,
as one batched run (``Probe.run_batched``: vmapped forward passes and Hessian-vector products,
the cells' Lanczos and SLQ recurrences as rows of one, Hutch++ in lockstep) against 16 separate
cells (``Probe.run``).

    python tests/benchmarks/bench_batched.py [--threads 1] [--seeds 16] [--spec] [--rounds 3]

Prints, for the dense path (the default below 1500 parameters) and the Lanczos path, the time
of 16 separate cells, of one batched call, and their ratio (issue 8 target: >= 4x on CPU).
With --spec it also times the whole runtime (``run_spec``) on a 16-seed sweep with and
without ``execution: {batch_cells: true}``. All timings in this process, in paired rounds (both
ways back to back, fresh cells each time); the speed-up is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

from basinprobe.probes.evaluate import Evaluate
from basinprobe.probes.hessian_spectrum import HessianSpectrum
from basinprobe.registry import Dataset
from basinprobe.runtime.losses import cross_entropy
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.testing import make_context

WIDTHS = {"in": 8, "hidden": [32], "out": 3, "activation": "tanh"}  # 387 parameters
N = 256


def contexts(seeds: int, dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, WIDTHS["in"], generator=g)
    y = torch.randint(0, WIDTHS["out"], (N,), generator=g)
    data = Dataset(X[:192], y[:192], X[192:], y[192:], task="classification", n_classes=WIDTHS["out"])
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        out.append(make_context(make_mlp(**WIDTHS), data, cross_entropy, dtype=dtype, seed=seed))
    return out


def paired_rounds(separate, batched, make_args, rounds):
    """Time both ways back to back in each round (fresh contexts each time: nothing cached), so
    that the machine's drifting load divides out of each round's ratio. Returns the two lists."""
    separate(make_args()), batched(make_args())  # warm-up
    t_sep, t_bat = [], []
    for _ in range(rounds):
        for fn, times in ((separate, t_sep), (batched, t_bat)):
            args = make_args()
            start = time.perf_counter()
            fn(args)
            times.append(time.perf_counter() - start)
    return t_sep, t_bat


def report(label, t_sep, t_bat, n=None):
    ratios = sorted(a / b for a, b in zip(t_sep, t_bat))
    size = f"n={n:4d}" if n else " " * 6
    print(f"{label:58s} {size}  separate {statistics.median(t_sep):7.3f} s   batched {statistics.median(t_bat):7.3f} s   "
          f"speed-up {statistics.median(ratios):5.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}; target >= 4)")


def compare(label, hessian_params, seeds, dtype, rounds):
    evaluate, hessian = Evaluate(), HessianSpectrum()
    ep, hp = evaluate.resolve({}), hessian.resolve(hessian_params)

    def separate(ctxs):
        for ctx in ctxs:
            evaluate.run(ctx, ep)
            hessian.run(ctx, hp)

    def batched(ctxs):
        evaluate.run_batched(ctxs, ep)
        hessian.run_batched(ctxs, hp)

    t_sep, t_bat = paired_rounds(separate, batched, lambda: contexts(seeds, dtype), rounds)
    report(label, t_sep, t_bat, contexts(1, dtype)[0].n_params)


SPEC = """
version: 1
name: bench-batched
seed: 0
device: cpu
dtype: {dtype}
model: {{kind: mlp, with: {{in: 8, hidden: [32], out: 3, activation: tanh}}}}
data: {{kind: gaussian_mixture, with: {{n: 256, in: 8, classes: 3}}, batch_size: 256}}
loss: cross_entropy
sweep: {{seed: [{seeds}]}}
probes:
  - {{name: eval, probe: evaluate}}
  - {{name: hess, probe: hessian_spectrum, with: {{top_k: 10}}}}
output: {output}
"""


def compare_spec(seeds, dtype, rounds):
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.progress import Reporter
    from basinprobe.runtime.spec import load_spec

    def timed_run(batch: bool):
        with tempfile.TemporaryDirectory() as tmp:
            text = SPEC.format(dtype=dtype, seeds=", ".join(map(str, range(seeds))), output=Path(tmp) / "out.zarr")
            if batch:
                text += "execution: {batch_cells: true}\n"
            path = Path(tmp) / "spec.yaml"
            path.write_text(textwrap.dedent(text))
            assert run_spec(load_spec(path), reporter=Reporter(quiet=True)).ok

    # spec loading and the store are inside the timing: the whole runtime, both ways
    t_sep, t_bat = paired_rounds(lambda _: timed_run(False), lambda _: timed_run(True), lambda: None, rounds)
    report("run_spec, 16-seed sweep, evaluate + hessian_spectrum", t_sep, t_bat)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--spec", action="store_true", help="also time run_spec with and without batch_cells")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (median ratio reported)")
    parser.add_argument("--paths", nargs="*", default=["dense", "lanczos"], choices=["dense", "lanczos"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # untrained cells warn that they are not near a minimum
    dtype = getattr(torch, args.dtype)
    print(f"MLP 8-32-3 tanh, {N} examples, cross-entropy, {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    if "dense" in args.paths:
        compare("dense path (hessian_spectrum defaults, top_k 20)", {}, args.seeds, dtype, args.rounds)
    if "lanczos" in args.paths:
        compare("Lanczos path (top_k 10, bottom_k 5, SLQ 8x80, Hutch++ 60)",
                {"method": "lanczos", "top_k": 10, "bottom_k": 5}, args.seeds, dtype, args.rounds)
    if args.spec:
        compare_spec(args.seeds, args.dtype, args.rounds)


if __name__ == "__main__":
    main()
