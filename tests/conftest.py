import textwrap
from pathlib import Path

import pytest
import torch

from basinprobe.runtime.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "specs" / "examples"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_intra_op_thread():
    """For tests of tiny models: intra-op threads only add synchronization there, and on an
    oversubscribed 2-core machine OpenMP barriers made a single test 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec (dedented YAML) into tmp_path and return its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def cli(capsys):
    """Run the basinprobe CLI in-process: returns (exit status, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


TINY_SPEC = """
version: 1
name: tiny
seed: 0
device: cpu
model: {kind: mlp, with: {in: 4, hidden: [6], out: 3, activation: tanh}}
data: {kind: gaussian_mixture, with: {n: 60, in: 4, classes: 3}, batch_size: 32}
loss: cross_entropy
train: {optimizer: {kind: sgd, lr: 0.1}, steps: 20, checkpoints: {at: [0, 10, 20]}}
sweep: {seed: [0, 1]}
probes:
  - {name: eval, probe: evaluate}
output: out.zarr
"""


@pytest.fixture
def tiny_spec(write_spec):
    return write_spec(TINY_SPEC)
