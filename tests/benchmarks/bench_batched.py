"""Benchmark of batched cells: 16 seeds of a small MLP through ``evaluate`` + ``hessian_spectrum``,
as one batched run (``Probe.run_batched``: vmapped forward passes and Hessian-vector products,
the cells' Lanczos/SLQ/Hutch++ runs in lockstep) against 16 separate cells (``Probe.run``).

    python tests/benchmarks/bench_batched.py [--threads 1] [--seeds 16] [--spec]

Prints, for the dense path (the default below 1500 parameters) and the Lanczos path, the time
of 16 separate cells, of one batched call, and their ratio (issue 8 target: >= 4x on CPU).
With --spec it also times the whole runtime (``run_spec``) on a 16-seed sweep with and
without ``execution: {batch_cells: true}``. All timings in this process, median of repeats.
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


def median_time(fn, make_args, repeats=3) -> float:
    fn(make_args())  # warm-up
    times = []
    for _ in range(repeats):
        args = make_args()  # fresh contexts: nothing cached between repeats
        start = time.perf_counter()
        fn(args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(label, hessian_params, seeds, dtype):
    evaluate, hessian = Evaluate(), HessianSpectrum()
    ep, hp = evaluate.resolve({}), hessian.resolve(hessian_params)

    def separate(ctxs):
        for ctx in ctxs:
            evaluate.run(ctx, ep)
            hessian.run(ctx, hp)

    def batched(ctxs):
        evaluate.run_batched(ctxs, ep)
        hessian.run_batched(ctxs, hp)

    t_sep = median_time(separate, lambda: contexts(seeds, dtype))
    t_bat = median_time(batched, lambda: contexts(seeds, dtype))
    n = contexts(1, dtype)[0].n_params
    print(f"{label:58s} n={n:4d}  {seeds} separate cells {t_sep:7.3f} s   batched {t_bat:7.3f} s   "
          f"speed-up {t_sep / t_bat:5.2f}x  (target >= 4)")


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


def compare_spec(seeds, dtype):
    from basinprobe.runtime.execute import run_spec
    from basinprobe.runtime.progress import Reporter
    from basinprobe.runtime.spec import load_spec

    def timed_run(batch: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            text = SPEC.format(dtype=dtype, seeds=", ".join(map(str, range(seeds))), output=Path(tmp) / "out.zarr")
            if batch:
                text += "execution: {batch_cells: true}\n"
            path = Path(tmp) / "spec.yaml"
            path.write_text(textwrap.dedent(text))
            spec = load_spec(path)
            start = time.perf_counter()
            assert run_spec(spec, reporter=Reporter(quiet=True)).ok
            return time.perf_counter() - start

    timed_run(False)  # warm-up (imports, plugin loading)
    t_sep = statistics.median(timed_run(False) for _ in range(3))
    t_bat = statistics.median(timed_run(True) for _ in range(3))
    print(f"{'run_spec, 16-seed sweep, evaluate + hessian_spectrum':58s}        "
          f"local {t_sep:7.3f} s   batch_cells {t_bat:7.3f} s   speed-up {t_sep / t_bat:5.2f}x")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--spec", action="store_true", help="also time run_spec with and without batch_cells")
    parser.add_argument("--paths", nargs="*", default=["dense", "lanczos"], choices=["dense", "lanczos"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # untrained cells warn that they are not near a minimum
    dtype = getattr(torch, args.dtype)
    print(f"MLP 8-32-3 tanh, {N} examples, cross-entropy, {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    if "dense" in args.paths:
        compare("dense path (hessian_spectrum defaults, top_k 20)", {}, args.seeds, dtype)
    if "lanczos" in args.paths:
        compare("Lanczos path (top_k 10, bottom_k 5, SLQ 8x80, Hutch++ 60)",
                {"method": "lanczos", "top_k": 10, "bottom_k": 5}, args.seeds, dtype)
    if args.spec:
        compare_spec(args.seeds, args.dtype)


if __name__ == "__main__":
    main()
