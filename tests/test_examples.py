"""Every example spec in specs/examples validates and runs end to end."""

import numpy as np
import pytest

from basinprobe.runtime import open_results
from conftest import EXAMPLES

SPECS = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_example_spec_runs(spec, cli, tmp_path):
    store = tmp_path / f"{spec.stem}.zarr"
    code, out, err = cli("validate", spec)
    assert code == 0, err
    code, out, err = cli("run", spec, "-o", store, "-q")
    assert code == 0, err
    tree = open_results(store)
    groups = [k for k in tree.children if not k.startswith("_")]
    assert groups
    for name in groups:
        ds = tree[name].to_dataset()
        assert ds.data_vars, name
        assert not tree[name].attrs["failed"]


def test_quickstart_trains_on_digits_with_a_two_axis_sweep(cli, tmp_path):
    store = tmp_path / "q.zarr"
    assert cli("run", EXAMPLES / "quickstart.yaml", "-o", store, "-q")[0] == 0
    tree = open_results(store)
    acc = tree["eval"]["accuracy"]
    assert acc.dims == ("seed", "hidden", "checkpoint", "split")
    assert (acc.sel(split="test").isel(checkpoint=-1) > 0.85).all()
    assert (acc.sel(split="test").isel(checkpoint=0) < 0.3).all()
    assert tree["norms"]["distance_from_init"].dims == ("seed", "hidden", "checkpoint", "layer")
