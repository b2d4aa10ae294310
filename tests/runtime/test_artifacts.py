import pytest
import torch

from basinprobe.runtime.artifacts import artifact, cache_key
from basinprobe.runtime.losses import mse
from basinprobe.runtime.models import make_mlp
from basinprobe.runtime.testing import make_context, regression_data

CALLS = []


@artifact("test.counted")
def counted(ctx, k: int = 3, which: str = "top"):
    CALLS.append((k, which))
    return object()


def test_leaving_out_an_argument_and_passing_its_default_share_one_computation():
    torch.manual_seed(0)
    X = torch.randn(8, 2, dtype=torch.float64)
    ctx = make_context(make_mlp(**{"in": 2, "hidden": [3], "out": 1}), regression_data(X, X[:, :1]), mse)
    CALLS.clear()
    first = ctx.artifact("test.counted")
    assert ctx.artifact("test.counted", k=3) is first
    assert ctx.artifact("test.counted", which="top", k=3) is first
    assert ctx.artifact("test.counted", k=4) is not first
    assert CALLS == [(3, "top"), (4, "top")]
    assert cache_key("test.counted", {}) == cache_key("test.counted", {"which": "top"})


def test_a_misspelled_argument_names_the_artifact_and_what_it_takes():
    with pytest.raises(TypeError, match=r"artifact 'test.counted' has no argument 'kk'; "
                                        r"it takes \(with defaults\) k=3, which='top'$"):
        cache_key("test.counted", {"kk": 2})
    with pytest.raises(KeyError, match=r"unknown artifact 'test.countd'; known artifacts: .*'?test.counted"):
        cache_key("test.countd", {})


@artifact("test.at_checkpoint", run_shared=True)
def at_checkpoint(ctx, at: int | None = None):
    CALLS.append(("at", at))
    return object()


def test_a_run_shared_artifact_at_a_checkpoint_is_computed_once_for_all_cells_of_the_run():
    from basinprobe.runtime.context import CellContext

    torch.manual_seed(0)
    X = torch.randn(8, 2, dtype=torch.float64)
    model, data = make_mlp(**{"in": 2, "hidden": [3], "out": 1}), regression_data(X, X[:, :1])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    run = {}  # what the runtime keeps per training run
    cells = [CellContext(model, flat, data, mse, dtype=torch.float64, seed=s, checkpoint=s, run_seed=7,
                         run_artifacts=run, trajectory={0: flat, 1: flat}) for s in (0, 1)]
    CALLS.clear()
    assert cells[0].artifact("test.at_checkpoint", at=1) is cells[1].artifact("test.at_checkpoint", at=1)
    assert cells[0].artifact("test.at_checkpoint") is not cells[1].artifact("test.at_checkpoint")  # the cell's own
    assert CALLS == [("at", 1), ("at", None), ("at", None)]
