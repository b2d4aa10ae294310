"""Whole runs on a GPU: a spec with `device: cuda` stores what the CPU run stores, and dask
workers run their cells on the GPU as a local GPU run does. Skipped without CUDA
(tests/benchmarks/device_checks.sh runs them on a lent GPU machine)."""

import numpy as np
import pytest

from basinprobe.runtime import open_results
from conftest import TINY_SPEC

SPEC = TINY_SPEC.replace("device: cpu", "device: DEVICE\ndtype: float64").replace(
    "  - {name: eval, probe: evaluate}",
    "  - {name: eval, probe: evaluate}\n"
    "  - {name: hess, probe: hessian_spectrum, at: last, with: {top_k: 5, bottom_k: 2}}\n"
    "  - {name: hess_lanczos, probe: hessian_spectrum, at: last,"
    " with: {top_k: 3, method: lanczos, tol: 0.000001, probes: 4, steps: 20, trace_samples: 12}}\n"
    "  - {name: jac, probe: behavioral_gradients, at: last}\n"
    "  - {name: llc, probe: langevin, at: last, with: {chains: 8, draws: 200, step_size: 0.0001}}")

# Deterministic given the parameters: equal to rounding. Lanczos eigenvalues are certified to
# `tol` (1e-6 relative), and rounding may stop one device a step before the other, so they are
# compared to 2 tol; the Lanczos path's trace and density are left out for the same reason. SGLD
# noise comes from a generator on the cell's device: the LLC is compared statistically.
EXACT = {"eval": None, "hess": None, "jac": None, "hess_lanczos": ["loss", "gradient_norm"]}


def _run(cli, write_spec, device: str, name: str, *extra) -> object:
    path = write_spec(SPEC.replace("DEVICE", device).replace("out.zarr", f"{name}.zarr"), f"{name}.yaml")
    code, out, err = cli("run", path, "-q", *extra)
    assert code == 0, err
    return open_results(path.parent / f"{name}.zarr")


@pytest.mark.cuda
def test_a_spec_on_cuda_stores_what_the_cpu_run_stores(cli, write_spec):
    cpu, gpu = _run(cli, write_spec, "cpu", "cpu"), _run(cli, write_spec, "cuda", "gpu")
    assert gpu.attrs["device"].startswith("cuda")
    np.testing.assert_allclose(gpu["_checkpoints"]["params"].values, cpu["_checkpoints"]["params"].values,
                               rtol=1e-9, atol=1e-12)
    for group, names in EXACT.items():
        a, b = cpu[group].to_dataset(), gpu[group].to_dataset()
        for name in names or a.data_vars:
            np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-7, atol=1e-9, err_msg=f"{group}/{name}")
    np.testing.assert_allclose(gpu["hess_lanczos"]["top_eigenvalues"].values,
                               cpu["hess_lanczos"]["top_eigenvalues"].values, rtol=2e-6)
    # the LLC on each device from its own noise: equal within the two standard errors
    a, b = cpu["llc"].to_dataset(), gpu["llc"].to_dataset()
    gap = np.abs(a.llc.values - b.llc.values)
    assert np.all(gap < 4 * np.hypot(a.llc_stderr.values, b.llc_stderr.values)), (a.llc.values, b.llc.values)


@pytest.mark.cuda
def test_dask_workers_run_their_cells_on_the_gpu_as_a_local_gpu_run_does(cli, write_spec, one_intra_op_thread):
    pytest.importorskip("distributed")   # one intra-op thread, as on the worker: see test_dask
    local = _run(cli, write_spec, "auto", "local")
    dask = _run(cli, write_spec, "auto", "dask", "--executor", "dask", "--workers", "1")
    assert local.attrs["device"].startswith("cuda") and dask.attrs["device"] == local.attrs["device"]
    assert set(dask.children) == set(local.children)
    for group in local.children:
        for name, var in local[group].to_dataset().data_vars.items():
            # to rounding: bit for bit is promised on CPU; some CUDA kernels reduce in varying order
            np.testing.assert_allclose(dask[group][name].values, var.values, rtol=1e-12, atol=1e-14,
                                       err_msg=f"{group}/{name}")
