"""The training loop's optimizers against torch.optim, and what a training command imports."""

import subprocess
import sys
import textwrap

import pytest
import torch

from basinprobe.runtime.spec import OptimizerSpec
from basinprobe.runtime.train import make_optimizer

REFERENCES = {
    "sgd": lambda params, spec: torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                                                weight_decay=spec.weight_decay),
    "adam": lambda params, spec: torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay),
    "adamw": lambda params, spec: torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas,
                                                    weight_decay=spec.weight_decay),
}

SPECS = [
    OptimizerSpec("sgd", 0.05, 0.0, False, 0.0, (0.9, 0.999)),
    OptimizerSpec("sgd", 0.05, 0.9, False, 0.0, (0.9, 0.999)),
    OptimizerSpec("sgd", 0.05, 0.9, True, 1e-3, (0.9, 0.999)),
    OptimizerSpec("adam", 0.01, 0.0, False, 0.0, (0.9, 0.999)),
    OptimizerSpec("adam", 0.01, 0.0, False, 1e-2, (0.8, 0.99)),
    OptimizerSpec("adamw", 0.01, 0.0, False, 1e-2, (0.9, 0.999)),
]


def trained(spec, make, dtype):
    """Parameters after 30 minibatch steps of a tanh MLP with one layer that gets no gradient."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(5, 7), "b": torch.nn.Linear(7, 2),
                                 "unused": torch.nn.Linear(3, 3)}).to(dtype)
    initial = [p.detach().clone() for p in model["unused"].parameters()]
    X, y = torch.randn(64, 5, dtype=dtype), torch.randn(64, 2, dtype=dtype)
    optimizer = make(model.parameters(), spec)
    for step in range(30):
        idx = slice(16 * (step % 4), 16 * (step % 4 + 1))
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model["b"](torch.tanh(model["a"](X[idx]))), y[idx]).backward()
        optimizer.step()
    for p, p0 in zip(model["unused"].parameters(), initial):
        assert torch.equal(p, p0)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-m{s.momentum}-n{s.nesterov}-wd{s.weight_decay}")
def test_optimizers_equal_torch_optim_bit_for_bit(spec, dtype):
    ours = trained(spec, make_optimizer, dtype)
    reference = trained(spec, REFERENCES[spec.kind], dtype)
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer([torch.zeros(2, requires_grad=True)], OptimizerSpec("lbfgs", 0.1, 0.0, False, 0.0, (0.9, 0.999)))


def test_a_training_run_skips_the_slow_imports(tiny_spec):
    """torch._dynamo (which a torch.optim optimizer imports when built) and scipy.stats cost
    a second or two each per process; training and evaluating need neither."""
    script = textwrap.dedent(f"""
        import sys
        from basinprobe.runtime.cli import main
        assert main(["run", {str(tiny_spec)!r}, "-q"]) == 0
        print(sorted(m for m in ("torch._dynamo", "scipy.stats") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
