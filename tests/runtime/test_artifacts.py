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
