"""Hidden activations of a network on a set of inputs, and what they say about information loss.

The hidden layers of a model are

- for the built-in MLP (any module with a ``hidden_modules`` attribute), the
  modules it names: the activation after every hidden ``nn.Linear``;
- for any other module, every submodule whose type is an activation function
  (:data:`ACTIVATION_TYPES`: ``nn.ReLU``, ``nn.Tanh``, ``nn.GELU``, ...).
  Activations applied as functions (``F.relu``) inside a ``forward`` are not
  modules and are not seen.

Their outputs are captured with forward hooks while the model runs through
``torch.func.functional_call`` at the given parameters, chunk by chunk, and
flattened per input into an ``(k, units)`` matrix per layer. A module called
more than once in a forward pass yields one layer per call (``name``,
``name#1``, ...). The hooks also record which ``nn.Linear`` produced each
hidden layer's input (the same tensor object), so incoming weights can be
compared.

Information-loss diagnostics on an activation matrix ``A ∈ R^{k × units}``
(Hebbar 2022, "Information loss → basin flatness"): inputs whose activation
vectors coincide at a layer have identical behavioral gradients for every
parameter after it; a unit that is zero on every input (a dead ReLU) removes
its incoming and outgoing weights from the Jacobian; two units with parallel
incoming weights compute proportional activations (for positively homogeneous
activations) and add one redundant direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
)


def hidden_layer_names(model: nn.Module) -> list[str]:
    """The module names whose outputs are the hidden layers (see the module docstring)."""
    if hasattr(model, "hidden_modules"):
        return list(model.hidden_modules)
    return [name for name, module in model.named_modules() if isinstance(module, ACTIVATION_TYPES)]


@dataclass
class HiddenActivations:
    """Activation matrices ``(k, units)`` per hidden layer, in call order.

    ``fed_by[layer]`` names the ``nn.Linear`` whose output is the layer's input,
    or ``None`` when something else (a norm, a reshape, a function) sits between.
    """

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    fed_by: dict[str, str | None] = field(default_factory=dict)


@torch.no_grad()
def capture_hidden(model: nn.Module, params_and_buffers: dict, X: torch.Tensor,
                   names: list[str] | None = None, batch_size: int = 1024) -> HiddenActivations:
    """Run ``model`` at ``params_and_buffers`` on ``X`` and keep the outputs of the hidden layers."""
    names = hidden_layer_names(model) if names is None else names
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise KeyError(f"model has no modules named {missing}")
    chunks: dict[str, list[torch.Tensor]] = {}
    fed_by: dict[str, str | None] = {}
    linear_outputs: list[tuple[torch.Tensor, str]] = []   # kept alive so identity checks are sound
    calls: dict[str, int] = {}

    def on_linear(name):
        def hook(module, inputs, output):
            linear_outputs.append((output, name))
        return hook

    def on_hidden(name):
        def hook(module, inputs, output):
            i = calls.get(name, 0)
            calls[name] = i + 1
            layer = name if i == 0 else f"{name}#{i}"
            chunks.setdefault(layer, []).append(output.reshape(output.shape[0], -1))
            if layer not in fed_by:
                source = inputs[0] if inputs else None
                fed_by[layer] = next((lin for out, lin in linear_outputs if out is source), None)
        return hook

    handles = [modules[name].register_forward_hook(on_hidden(name)) for name in names]
    handles += [m.register_forward_hook(on_linear(name)) for name, m in modules.items()
                if isinstance(m, nn.Linear)]
    try:
        for start in range(0, len(X), batch_size):
            calls.clear()
            linear_outputs.clear()
            functional_call(model, params_and_buffers, (X[start:start + batch_size],))
    finally:
        for handle in handles:
            handle.remove()
    return HiddenActivations({layer: torch.cat(parts) for layer, parts in chunks.items()}, fed_by)


# --- diagnostics --------------------------------------------------------------------------
def distinct_rows(A: torch.Tensor, tol: float, block: int = 1024) -> int:
    """Number of distinct rows of ``A`` up to ``tol``.

    Rows closer than ``tol·max_i ‖a_i‖`` (Euclidean) are joined; the count is the
    number of connected components of that relation (so chains of near neighbours
    merge, which is what "the same to a tolerance" means when it is not transitive).
    """
    k = A.shape[0]
    if k == 0:
        return 0
    scale = float(A.norm(dim=1).max())
    radius = tol * scale
    pairs_i, pairs_j = [], []
    for start in range(0, k, block):
        # the exact distance, not ‖a‖² + ‖b‖² − 2ab (whose cancellation is ~sqrt(eps)·‖a‖)
        d = torch.cdist(A[start:start + block], A, compute_mode="donot_use_mm_for_euclid_dist")
        i, j = torch.nonzero(d <= radius, as_tuple=True)
        pairs_i.append((i + start).cpu().numpy())
        pairs_j.append(j.cpu().numpy())
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.concatenate(pairs_i), np.concatenate(pairs_j)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(k, k))
    return int(connected_components(graph, directed=False)[0])


def dead_units(A: torch.Tensor, tol: float) -> torch.Tensor:
    """Boolean mask of the units (columns) with ``|a_iu| ≤ tol·max|A|`` on every input."""
    if A.numel() == 0:
        return torch.zeros(A.shape[1], dtype=torch.bool, device=A.device)
    scale = float(A.abs().max())
    return A.abs().amax(dim=0) <= tol * scale


def parallel_pairs(vectors: torch.Tensor, tol: float) -> int:
    """Pairs ``i < j`` of nonzero rows with cosine similarity ``≥ 1 − tol`` (same direction)."""
    norms = vectors.norm(dim=1)
    nonzero = norms > 0
    unit = vectors[nonzero] / norms[nonzero, None]
    if len(unit) < 2:
        return 0
    cosine = unit @ unit.T
    return int(torch.triu(cosine >= 1 - tol, diagonal=1).sum())


def incoming_weights(linear_params: Callable[[str], torch.Tensor | None], linear: str) -> torch.Tensor:
    """Rows ``[w_u | b_u]`` of the ``nn.Linear`` named ``linear`` (bias column when it has one)."""
    weight = linear_params(f"{linear}.weight")
    bias = linear_params(f"{linear}.bias")
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
