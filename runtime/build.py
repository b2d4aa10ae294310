"""Building a sweep point's pieces from its typed config: data, model, loss, checkpoints."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from basinprobe.registry import Dataset, Registry


class BuildError(Exception):
    """A piece of a spec could not be built; ``path`` names the spec location."""

    def __init__(self, path: tuple, message: str):
        self.path = path
        super().__init__(message)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(("device",), f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BuildError(("device",), f"device {name!r} was asked for but this machine has "
                                      f"{torch.cuda.device_count()} GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BuildError(("device",), f"device {name!r} was asked for but MPS is not available; use 'auto' or 'cpu'")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def import_factory(target: str):
    module_name, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise BuildError(("model", "factory"), f"cannot import factory {target!r}: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise BuildError(("model", "factory"), f"factory {target!r} is not callable")
    return obj


def build_data(spec_data, registry: Registry) -> Dataset:
    factory = registry.datasets[spec_data.kind].obj
    try:
        data = factory(seed=spec_data.seed, **spec_data.with_)
    except ImportError as exc:
        raise BuildError(("data", "kind"), str(exc)) from None
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise BuildError(("data",), f"cannot build dataset {spec_data.kind!r}: {exc}") from None
    if not isinstance(data, Dataset):
        raise BuildError(("data", "kind"), f"dataset factory {spec_data.kind!r} returned {type(data).__name__}, not a Dataset")
    return data


def build_model(spec_model, seed: int, registry: Registry) -> torch.nn.Module:
    factory = registry.models[spec_model.kind].obj if spec_model.kind else import_factory(spec_model.factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(**spec_model.with_)
        except TypeError as exc:
            raise BuildError(("model", "with"), f"cannot build the model: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise BuildError(("model",), f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    if sum(p.numel() for p in model.parameters()) == 0:
        raise BuildError(("model",), "the model has no parameters to probe")
    return model


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def load_checkpoint(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The flat parameters of ``model`` with the state_dict in ``path`` loaded (weights only)."""
    if not Path(path).is_file():
        raise BuildError(("model", "checkpoints"), f"checkpoint file {path} does not exist")
    from basinprobe.runtime.datasets import load_tensors

    try:
        state = load_tensors(path, "checkpoint")
    except ValueError as exc:
        raise BuildError(("model", "checkpoints"), str(exc)) from None
    if not isinstance(state, dict):
        raise BuildError(("model", "checkpoints"), f"checkpoint {path} is not a state_dict (a dict of tensors)")
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if problems:
        raise BuildError(("model", "checkpoints"),
                         f"checkpoint {path} does not fit the model: " + "; ".join(problems[:5]))
    clone = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(clone)
    return flat_parameters(model)
