"""The built-in dataset kinds.

Every factory takes ``seed`` (the data seed: ``data.seed`` in the spec, default
0, so that models trained from different seeds see the same data) and returns a
:class:`basinprobe.registry.Dataset`. Splits are drawn from that seed and
recorded in ``Dataset.info``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from basinprobe.registry import Dataset, with_schema

TEST_FRACTION = {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.2,
                 "description": "fraction of the examples held out as the test split"}


def _split(X, y, test_fraction: float, generator: torch.Generator, task: str, n_classes=None, info=None) -> Dataset:
    n = len(X)
    n_test = int(round(n * test_fraction))
    if n - n_test < 1:
        raise ValueError(f"test_fraction {test_fraction} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=generator)
    test, train = order[:n_test], order[n_test:]
    info = dict(info or {})
    info.update(n_train=n - n_test, n_test=n_test, test_fraction=test_fraction)
    return Dataset(X[train], y[train], X[test], y[test], task=task, n_classes=n_classes, info=info)


@with_schema(
    {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 2, "default": 256, "description": "number of examples"},
            "in": {"type": "integer", "minimum": 1, "default": 8, "description": "input dimension"},
            "out": {"type": "integer", "minimum": 1, "default": 1, "description": "output dimension"},
            "hidden": {"type": "array", "items": {"type": "integer", "minimum": 1}, "default": [],
                       "description": "hidden widths of the teacher ([] is a linear teacher)"},
            "activation": {"enum": ["relu", "tanh", "gelu", "identity"], "default": "tanh"},
            "rank": {"type": "integer", "minimum": 1,
                     "description": "rank of a linear teacher's weight matrix (default full)"},
            "noise": {"type": "number", "minimum": 0, "default": 0.1, "description": "std of Gaussian label noise"},
            "test_fraction": TEST_FRACTION,
        },
        "additionalProperties": False,
    },
    "regression on Gaussian inputs labelled by a random teacher network",
)
def teacher_student(seed=0, n=256, hidden=(), activation="tanh", rank=None, noise=0.1, test_fraction=0.2, **dims) -> Dataset:
    from basinprobe.runtime.models import MLP

    d_in, d_out = dims.get("in", 8), dims.get("out", 1)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    if hidden:
        with torch.random.fork_rng():  # the teacher's init must not disturb the caller's RNG
            torch.manual_seed(seed)
            teacher = MLP(d_in, list(hidden), d_out, activation).double()
        with torch.no_grad():
            y = teacher(X)
    else:
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        if rank is not None and rank < min(d_in, d_out):
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            W = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        y = X @ W.T
    y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return _split(X.float(), y.float(), test_fraction, g, "regression",
                  info={"kind": "teacher_student", "seed": seed, "noise": noise})


@with_schema(
    {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 2, "default": 512},
            "in": {"type": "integer", "minimum": 1, "default": 2},
            "classes": {"type": "integer", "minimum": 2, "default": 3},
            "separation": {"type": "number", "minimum": 0, "default": 3.0,
                           "description": "distance scale between class means (unit-variance clusters)"},
            "test_fraction": TEST_FRACTION,
        },
        "additionalProperties": False,
    },
    "classification of isotropic Gaussian clusters",
)
def gaussian_mixture(seed=0, n=512, classes=3, separation=3.0, test_fraction=0.2, **dims) -> Dataset:
    d_in = dims.get("in", 2)
    g = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(classes, d_in, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    X = means[y] + torch.randn(n, d_in, generator=g)
    return _split(X, y, test_fraction, g, "classification", classes,
                  info={"kind": "gaussian_mixture", "seed": seed})


@with_schema(
    {
        "type": "object",
        "properties": {
            "p": {"type": "integer", "minimum": 2, "default": 23, "description": "the modulus"},
            "train_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5},
        },
        "additionalProperties": False,
    },
    "(a + b) mod p from one-hot pairs, the grokking task",
)
def modular_addition(seed=0, p=23, train_fraction=0.5) -> Dataset:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    X = torch.cat([torch.nn.functional.one_hot(a, p), torch.nn.functional.one_hot(b, p)], dim=1).float()
    y = (a + b) % p
    g = torch.Generator().manual_seed(seed)
    return _split(X, y, 1 - train_fraction, g, "classification", p,
                  info={"kind": "modular_addition", "seed": seed, "p": p})


@with_schema(
    {
        "type": "object",
        "properties": {
            "test_fraction": TEST_FRACTION,
            "n": {"type": "integer", "minimum": 2, "description": "use only the first n examples (default all 1797)"},
        },
        "additionalProperties": False,
    },
    "scikit-learn's 8x8 handwritten digits (1797 images, 64 inputs scaled to [0, 1], 10 classes)",
)
def digits(seed=0, test_fraction=0.2, n=None) -> Dataset:
    table = _digits_table()
    X = torch.tensor(table[:, :-1] / 16.0, dtype=torch.float32)
    y = torch.tensor(table[:, -1].astype(np.int64), dtype=torch.long)
    if n is not None:
        X, y = X[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    return _split(X, y, test_fraction, g, "classification", 10, info={"kind": "digits", "seed": seed})


def _digits_table() -> np.ndarray:
    """The digits as scikit-learn ships them: 1797 rows of 64 pixel values (0-16), then the label.

    Read from scikit-learn's own file when it is where scikit-learn keeps it, since importing
    scikit-learn (and with it scipy.stats) takes ~1.2 s of every process that loads the
    digits; otherwise through ``load_digits``, which reads the same file.
    """
    found = importlib.util.find_spec("sklearn")
    if found is None or found.origin is None:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'basinprobe[digits]'")
    path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    raw = load_digits()
    return np.column_stack([raw.data, raw.target])


FILE_SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "description": "the file, relative to the spec's folder"},
        "task": {"enum": ["classification", "regression"],
                 "description": "default: classification when y is integer, else regression"},
        "test_fraction": {**TEST_FRACTION, "description": "held out when the file has no test arrays"},
    },
    "required": ["path"],
    "additionalProperties": False,
}


def load_tensors(path, what: str):
    """``torch.load`` of a file that may only hold tensors (``weights_only``: nothing in it runs),
    its failure said in one line: ``what`` names the file's role, e.g. ``checkpoint``."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {path} holds objects other than tensors, which are not loaded (loading "
                         "them could run code): save plain tensors, e.g. a state_dict or a dict of tensors") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not its own
        raise ValueError(f"{what} {path} is not a file written by torch.save "
                         f"({type(exc).__name__}: {exc})") from None


def _from_arrays(arrays: dict, seed: int, task, test_fraction: float, source: str) -> Dataset:
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{source} has no array named {missing[0]!r} (it has {sorted(arrays)})")
    for x_name, y_name in (("X", "y"), ("X_test", "y_test")):
        if x_name in arrays and y_name in arrays and len(arrays[x_name]) != len(arrays[y_name]):
            raise ValueError(f"{source}: {x_name} has {len(arrays[x_name])} rows but {y_name} has "
                             f"{len(arrays[y_name])}; each example needs one target")
    as_tensor = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))

    def inputs(a):   # a file's float64 stays float64 (the run casts to its dtype; rounding to float32
        a = as_tensor(a)   # here made a float64 run's exact minimizer no minimum of its loss)
        return a if a.dtype == torch.float64 else a.float()

    X, y = inputs(arrays["X"]), as_tensor(arrays["y"])
    integer = not y.is_floating_point()
    task = task or ("classification" if integer else "regression")
    if task == "classification":
        y = y.long()
    else:
        y = inputs(y)
        y = y[:, None] if y.dim() == 1 else y
    info = {"kind": "file", "path": source, "seed": seed}
    if "X_test" in arrays and "y_test" in arrays:
        Xt, yt = inputs(arrays["X_test"]), as_tensor(arrays["y_test"])
        yt = yt.long() if task == "classification" else (inputs(yt)[:, None] if yt.dim() == 1 else inputs(yt))
        return Dataset(X, y, Xt, yt, task=task, info=info)
    return _split(X, y, test_fraction, torch.Generator().manual_seed(seed), task, info=info)


@with_schema(FILE_SCHEMA, "arrays X, y (and optional X_test, y_test) from a NumPy .npz file")
def npz(path, seed=0, task=None, test_fraction=0.2) -> Dataset:
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return _from_arrays(arrays, seed, task, test_fraction, str(path))


@with_schema(FILE_SCHEMA, "tensors X, y (and optional X_test, y_test) from a torch file (loaded weights_only)")
def pt(path, seed=0, task=None, test_fraction=0.2) -> Dataset:
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    arrays = load_tensors(path, "data file")
    if not isinstance(arrays, dict):
        raise ValueError(f"{path} must hold a dict of tensors with keys X, y")
    return _from_arrays(arrays, seed, task, test_fraction, str(path))


DATASETS = {
    "teacher_student": teacher_student,
    "gaussian_mixture": gaussian_mixture,
    "modular_addition": modular_addition,
    "digits": digits,
    "npz": npz,
    "pt": pt,
}
