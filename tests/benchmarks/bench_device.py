"""Per-cell time on a GPU against the CPU for a ~1M-parameter MLP (issue 8), through the runtime.

    python tests/benchmarks/bench_device.py [--devices cpu cuda] [--repeats 2] [--compile [DEVICE ...]]
                                            [--steps 200]

One cell of a realistic study: a 64-1024-896-10 ReLU MLP (1,000,330 parameters, float32)
trained ``--steps`` Adam steps on the digits data (minibatches of 128), then probed at its last
checkpoint (every probe has ``at: last``) by ``evaluate``, ``hessian_spectrum`` (Lanczos top 5,
Hutch++ trace, a small SLQ density), ``langevin`` (8 chains x 100 draws, minibatches of 128) and
``behavioral_gradients`` (the Jacobian on 128 inputs x 10 outputs and its rank). ``langevin`` has
a fixed step: ``step_size: auto`` calibrates with 64 full-batch chains of 64 steps, which on this
model is many times the sampling itself (README, langevin's calibration advice).

Each device runs the same spec through ``run_spec`` ``--repeats`` times, each into a fresh store;
the first run on a device pays the device's start (CUDA context, kernel loading), so the fastest
run is reported, with the time of every probe entry as the runtime itself measured it. With
``--compile`` a device also runs ``execution: {compile: true}`` (the substrate's per-step
functions under ``torch.compile``): the measurement the ``compile`` default waits for. Devices
that are not present are reported as such and skipped.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch

from basinprobe.runtime.execute import run_spec
from basinprobe.runtime.progress import Reporter
from basinprobe.runtime.spec import load_spec

SPEC = """\
version: 1
name: bench-device
seed: 0
device: {device}
dtype: float32
model: {{kind: mlp, with: {{in: 64, hidden: [1024, 896], out: 10, activation: relu}}}}
data: {{kind: digits, batch_size: 128}}
loss: cross_entropy
train: {{optimizer: {{kind: adam, lr: 0.001}}, steps: {steps}, checkpoints: {{at: [{steps}]}}}}
probes:
  - {{name: eval, probe: evaluate, at: last}}
  - {{name: hess, probe: hessian_spectrum, at: last,
     with: {{method: lanczos, top_k: 5, tol: 0.001, trace_samples: 30, probes: 4, steps: 40}}}}
  - {{name: llc, probe: langevin, at: last, with: {{chains: 8, draws: 100, batch_size: 128, step_size: 0.00001}}}}
  - {{name: jac, probe: behavioral_gradients, at: last, with: {{inputs: 128}}}}
execution: {{compile: {compile}}}
output: {output}
"""

DONE = re.compile(r"^(?P<entry>\S+): done in (?P<seconds>[0-9.]+)s")


class EntryTimes(Reporter):
    """A quiet reporter that keeps the runtime's own time of each probe entry."""

    def __init__(self):
        super().__init__(quiet=True)
        self.seconds: dict[str, float] = {}

    def cell_done(self, label: str, outcome: str, count: int = 1) -> None:
        super().cell_done(label, outcome, count)
        match = DONE.match(f"{label.split()[-1]}: {outcome}")
        if match is None:
            raise RuntimeError(f"{label}: {outcome}")
        self.seconds[match["entry"]] = float(match["seconds"])


def one_cell(device: str, steps: int, compile_: bool) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(SPEC.format(device=device, steps=steps, compile=str(compile_).lower(),
                                    output=Path(tmp) / "out.zarr"))
        reporter = EntryTimes()
        started = time.perf_counter()
        report = run_spec(load_spec(path), reporter=reporter)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if not report.ok:
            raise RuntimeError(f"{device}: {report.failures}")
    return elapsed, reporter.seconds


def present(device: str) -> bool:
    return device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", nargs="*", default=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2, help="runs per device; the fastest is reported")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps of the cell's training run")
    parser.add_argument("--compile", nargs="*", metavar="DEVICE",
                        help="also run with execution: {compile: true}, on these devices (none named: all)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # a briefly trained cell is not at a minimum; the probes say so
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; one cell: MLP 64-1024-896-10 "
          f"(1,000,330 parameters, float32), {args.steps} Adam steps on digits, then evaluate, hessian_spectrum, "
          "langevin, behavioral_gradients")
    totals = {}
    for device in args.devices:
        if not present(device):
            print(f"{device:5s}  not present, skipped")
            continue
        if device.startswith("cuda"):
            print(f"{device:5s}  {torch.cuda.get_device_name()}")
        compiled = args.compile is not None and (not args.compile or device in args.compile)
        for compile_ in (False, True) if compiled else (False,):
            runs = [one_cell(device, args.steps, compile_) for _ in range(args.repeats)]
            total, entries = min(runs, key=lambda run: run[0])
            totals[device, compile_] = total
            label = f"{device}{' compiled' if compile_ else ''}"
            print(f"{label:14s} cell {total:7.2f} s (runs: {', '.join(f'{t:.2f}' for t, _ in runs)}); "
                  + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in entries.items()))
    for (device, compile_), total in totals.items():
        if device != "cpu" and ("cpu", compile_) in totals:
            print(f"per-cell time {device} / cpu{' (compiled)' if compile_ else ''}: "
                  f"{total / totals['cpu', compile_]:.3f} ({totals['cpu', compile_] / total:.1f}x faster)")
        if compile_ and (device, False) in totals:
            print(f"{device}: compiled / eager {total / totals[device, False]:.3f}")


if __name__ == "__main__":
    main()
