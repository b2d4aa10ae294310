"""The built-in model kinds: ``mlp`` and ``deep_linear``."""

from __future__ import annotations

import torch
from torch import nn

from basinprobe.registry import with_schema

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}


class MLP(nn.Sequential):
    """Fully connected network ``in -> hidden... -> out``.

    Children are numbered: ``nn.Linear`` layers alternate with activations, so
    parameter names read ``0.weight, 0.bias, 2.weight, ...``. ``hidden_modules``
    names the activation modules whose outputs are the hidden representations.
    """

    def __init__(self, d_in: int, hidden: list[int], d_out: int, activation: str = "relu", bias: bool = True):
        widths = [d_in, *hidden, d_out]
        modules: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            modules.append(nn.Linear(a, b, bias=bias))
            if i < len(widths) - 2:
                modules.append(ACTIVATIONS[activation]())
        super().__init__(*modules)
        self.widths = widths
        self.activation = activation

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    @property
    def hidden_modules(self) -> list[str]:
        return [name for name, m in self.named_children() if not isinstance(m, nn.Linear)]


@with_schema(
    {
        "type": "object",
        "properties": {
            "in": {"type": "integer", "minimum": 1, "description": "input width"},
            "hidden": {"type": "array", "items": {"type": "integer", "minimum": 1}, "default": [64],
                       "description": "hidden widths; [] gives a linear model"},
            "out": {"type": "integer", "minimum": 1, "description": "output width"},
            "activation": {"enum": sorted(ACTIVATIONS), "default": "relu"},
            "bias": {"type": "boolean", "default": True},
        },
        "required": ["in", "out"],
        "additionalProperties": False,
    },
    "multilayer perceptron (in, hidden, out, activation, bias)",
)
def make_mlp(hidden=(64,), activation="relu", bias=True, **widths) -> MLP:
    return MLP(widths["in"], list(hidden), widths["out"], activation, bias)


@with_schema(
    {
        "type": "object",
        "properties": {
            "widths": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2,
                       "description": "[in, hidden..., out]"},
        },
        "required": ["widths"],
        "additionalProperties": False,
    },
    "deep linear network W_L...W_1 x without biases (widths)",
)
def make_deep_linear(widths) -> MLP:
    return MLP(widths[0], list(widths[1:-1]), widths[-1], activation="identity", bias=False)


MODELS = {"mlp": make_mlp, "deep_linear": make_deep_linear}
