#!/usr/bin/env bash
# The GPU checks of the issues in one command, for a machine with CUDA (a lent GPU machine has
# torch, numpy, xarray, scikit-learn and pytest, but no package index and none of the other
# dependencies, so they travel as wheels).
#
#   bash tests/benchmarks/device_checks.sh prepare    # here: cp312 wheels into .wheelhouse/
#                                                     # (WHEEL_PYTHON=3.11 for another Python)
#   bash tests/benchmarks/device_checks.sh            # there, with .wheelhouse carried along
#
# It installs basinprobe from .wheelhouse without an index, runs the tests marked `cuda`, then
# the GPU parts of the benchmarks, each under its own time limit so that one hang does not take
# the others with it. Everything printed also goes to $OUT/device_checks.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "prepare" ]]; then
    # numpy and torch are left out: the machine's own builds must stay.
    rm -rf .wheelhouse
    python -m pip download -q --dest .wheelhouse --python-version "${WHEEL_PYTHON:-3.12}" --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        "zarr>=3" "jsonschema>=4.18" "rich>=13" "dask[distributed]>=2024.8" "pluggy>=1.3" "pyyaml>=6" \
        "setuptools>=69" wheel
    rm -f .wheelhouse/numpy-*.whl
    du -sh .wheelhouse
    exit 0
fi

LOG=${OUT:+$OUT/device_checks.log}
exec > >(tee ${LOG:+"$LOG"}) 2>&1

step() {  # step SECONDS TITLE COMMAND...: one check under its own limit; a failure is reported, not fatal
    local limit=$1 title=$2
    shift 2
    echo "=== $title ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@"
    local status=$?
    [[ $status -ne 0 ]] && echo "=== $title: exit status $status"
    return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -m pip install -q --no-index --find-links .wheelhouse -e ".[dask]" -e plugins/basinprobe-weightnorms || exit 1
"$PYTHON" -c "import torch, basinprobe.runtime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

step 150 "tests marked cuda" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
step 200 "bench_device: one 1M-parameter cell, cpu and cuda, eager and compiled on cuda" \
    "$PYTHON" tests/benchmarks/bench_device.py --compile cuda --repeats 2
step 60 "bench_langevin: GPU chains" "$PYTHON" tests/benchmarks/bench_langevin.py --only gpu --gpu-compile
step 60 "bench_lottery_subspace: GPU memory" "$PYTHON" tests/benchmarks/bench_lottery_subspace.py --skip-memory
echo "=== done ($(date +%T))"
