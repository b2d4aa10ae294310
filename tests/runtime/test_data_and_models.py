"""Built-in datasets, models, losses and training."""

import numpy as np
import pytest
import torch

from basinprobe.runtime import datasets
from basinprobe.runtime.models import make_deep_linear, make_mlp


def test_mlp_with_no_hidden_layer_is_linear():
    model = make_mlp(**{"in": 3, "hidden": [], "out": 2})
    x = torch.randn(5, 3)
    W, b = model[0].weight, model[0].bias
    assert torch.allclose(model(x), x @ W.T + b)


def test_deep_linear_has_no_bias_and_multiplies_matrices():
    model = make_deep_linear(widths=[3, 4, 2])
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "2.weight"]
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), x @ (model[2].weight @ model[0].weight).T, atol=1e-6)


def test_splits_are_seeded_and_recorded():
    a = datasets.teacher_student(seed=3, n=50, test_fraction=0.2)
    b = datasets.teacher_student(seed=3, n=50, test_fraction=0.2)
    c = datasets.teacher_student(seed=4, n=50, test_fraction=0.2)
    assert torch.equal(a.X_train, b.X_train) and not torch.equal(a.X_train, c.X_train)
    assert (a.info["n_train"], a.info["n_test"], a.info["seed"]) == (40, 10, 3)


def test_low_rank_linear_teacher_has_that_rank():
    data = datasets.teacher_student(seed=0, n=200, **{"in": 6, "out": 5}, rank=2, noise=0.0, test_fraction=0.0)
    solution = torch.linalg.lstsq(data.X_train.double(), data.y_train.double()).solution
    assert torch.linalg.matrix_rank(solution, rtol=1e-6) == 2


def test_modular_addition_labels():
    data = datasets.modular_addition(seed=0, p=7, train_fraction=0.5)
    X = torch.cat([data.X_train, data.X_test])
    y = torch.cat([data.y_train, data.y_test])
    a, b = X[:, :7].argmax(1), X[:, 7:].argmax(1)
    assert torch.equal((a + b) % 7, y) and len(y) == 49 and data.n_classes == 7


def test_digits_is_the_real_offline_dataset():
    pytest.importorskip("sklearn")
    data = datasets.digits(seed=0)
    assert data.X_train.shape[1] == 64 and len(data.X_train) + len(data.X_test) == 1797 and data.n_classes == 10


def test_digits_read_from_the_file_equal_load_digits(monkeypatch):
    """The table is read from scikit-learn's file (fast) or through load_digits (when the file
    is not found); both give exactly load_digits' data."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits()
    expected = np.column_stack([raw.data, raw.target])
    assert np.array_equal(datasets._digits_table(), expected)
    monkeypatch.setattr(datasets.Path, "is_file", lambda self: False)
    assert np.array_equal(datasets._digits_table(), expected)


def test_npz_and_pt_files(tmp_path):
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    np.savez(tmp_path / "d.npz", X=X, y=y)
    data = datasets.npz(path=str(tmp_path / "d.npz"), seed=0, test_fraction=0.25)
    assert data.task == "classification" and len(data.X_train) == 15
    torch.save({"X": torch.tensor(X), "y": torch.tensor(X[:, 0]), "X_test": torch.zeros(4, 3), "y_test": torch.zeros(4)},
               tmp_path / "d.pt")
    data = datasets.pt(path=str(tmp_path / "d.pt"), seed=0)
    assert data.task == "regression" and data.y_train.shape == (20, 1) and len(data.X_test) == 4
    # a float64 file keeps its precision (a float64 run would otherwise see float32-rounded data)
    X64 = np.random.default_rng(1).normal(size=(20, 3)) / 3
    np.savez(tmp_path / "d64.npz", X=X64, y=X64[:, 0] ** 2)
    data = datasets.npz(path=str(tmp_path / "d64.npz"), seed=0, test_fraction=0.25)
    both = torch.cat([data.X_train, data.X_test])
    assert both.dtype == torch.float64 and sorted(both[:, 0].tolist()) == sorted(X64[:, 0].tolist())
    assert data.y_train.dtype == torch.float64
    np.savez(tmp_path / "bad.npz", inputs=X)
    with pytest.raises(ValueError, match="no array named 'X'"):
        datasets.npz(path=str(tmp_path / "bad.npz"))


def test_training_is_reproducible_bit_for_bit_and_checkpoints_every(write_spec):
    from basinprobe.runtime.spec import load_spec
    from basinprobe.runtime.train import train

    spec = load_spec(write_spec("""
        version: 1
        model: {kind: mlp, with: {in: 3, hidden: [5], out: 1}}
        data: {kind: teacher_student, with: {n: 40, in: 3}, batch_size: 16}
        loss: mse
        train: {optimizer: {kind: adamw, lr: 1e-2, weight_decay: 1e-3}, steps: 25, checkpoints: {every: 10}}
        probes: [{probe: evaluate}]
    """))
    (_, config), = spec.points()
    assert config.train.checkpoint_steps == (0, 10, 20, 25)
    data = datasets.teacher_student(seed=0, n=40, **{"in": 3})
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make_mlp(**{"in": 3, "hidden": [5], "out": 1})
        runs.append(train(model, data, torch.nn.functional.mse_loss, config.train, torch.Generator().manual_seed(1)))
    assert list(runs[0]) == [0, 10, 20, 25]
    assert all(torch.equal(runs[0][s], runs[1][s]) for s in runs[0])
    assert not torch.equal(runs[0][0], runs[0][25])


def test_a_classification_dataset_needs_integer_labels():
    from basinprobe.registry import Dataset

    X = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"integer class labels .* y\.long\(\)"):
        Dataset(X, torch.tensor([0.0, 1.0, 1.0, 0.0]), X[:0], torch.zeros(0), task="classification")
    assert Dataset(X, torch.tensor([0, 1, 1, 0]), X[:0], torch.zeros(0, dtype=torch.long),
                   task="classification").n_classes == 2
