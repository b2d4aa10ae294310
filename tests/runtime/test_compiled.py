import pytest
import torch

from basinprobe.runtime.substrate.compiled import maybe_compile


def step(w, g):
    return w - 0.1 * g + torch.tanh(w) * 1e-3


def test_disabled_returns_the_eager_function():
    assert maybe_compile(step, False) is step


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = maybe_compile(step, True, "step")
    w, g = torch.randn(5), torch.randn(5)
    with pytest.warns(RuntimeWarning, match="compiled step failed"):
        out = wrapped(w, g)
    assert torch.equal(out, step(w, g))
    assert torch.equal(wrapped(w, g), step(w, g))  # stays eager without warning again
