"""Permutation symmetry of hidden units, and weight matching.

Permuting the units of a hidden layer — the rows of the weight and bias that produce
it and the columns of the weight that reads it — leaves the network's function
unchanged. Two networks θ_a, θ_b may therefore sit in one basin only up to such a
permutation π. Weight matching picks π to maximize the inner product of the weights,

    π* = argmax_π ⟨θ_a, π(θ_b)⟩ = argmin_π ‖θ_a − π(θ_b)‖²

(norms do not depend on π), by coordinate descent over the hidden layers: holding
every other layer's permutation fixed, the objective is linear in the permutation P_ℓ
of layer ℓ,

    ⟨θ_a, π(θ_b)⟩ = Σ_{(w, axis) ∈ axes(ℓ)} ⟨W_a, P_ℓ W_b'⟩ + const = tr(P_ℓᵀ C_ℓ) + const,

    C_ℓ[i, j] = Σ_{(w, axis)} ⟨W_a[.., i on axis, ..], W_b'[.., j on axis, ..]⟩,

with W_b' the parameter with the other layers' permutations applied; the best P_ℓ is a
linear assignment, solved exactly (``scipy.optimize.linear_sum_assignment``). Layers
are visited in a random order each round until a round changes nothing (or a bound on
rounds is reached). The descent starts from a forward pass over the layers (in the
order the permutations are listed, input to output) in which each layer is matched on
the parameters whose other axes are already matched (its incoming weights and bias):
started from identities instead, the descent can stall in a local optimum even when θ_b
is an exact permutation of θ_a; from this start an exact permutation is found in one
pass. The start is kept only if it beats the identity, so the result is never farther
from θ_a than θ_b itself.

Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation
Symmetries" (ICLR), Algorithm 1; Entezari et al. 2022 (ICLR).

**Hidden axes.** A permutation is described as in Git Re-Basin's permutation spec:
a dict ``{permutation name: [(parameter name, axis), ...]}`` listing every axis of
every parameter that the hidden units of one layer index. :func:`hidden_axes`
derives it for an ``nn.Sequential`` of ``nn.Linear`` layers separated by elementwise
activations (``mlp``, ``deep_linear``); any other model declares it as an attribute,
e.g. for ``x -> fc2(relu(fc1(x)))``::

    self.hidden_axes = {"fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]}

Only declare axes whose permutation truly leaves the function unchanged (after an
elementwise nonlinearity, not after a layer norm over the units, for instance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from basinprobe.registry import ProbeError

HiddenAxes = dict[str, list[tuple[str, int]]]

# Parameter-free modules that act on each unit alone, so they commute with a permutation of units.
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.Identity, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus,
               nn.Mish, nn.Hardtanh, nn.Dropout)

HOW_TO_DECLARE = ("declare them on the model: model.hidden_axes = {name: [(parameter, axis), ...]} lists, for each "
                  "hidden layer, every parameter axis its units index (see basinprobe.runtime.substrate.permutation)")


def hidden_axes(model: nn.Module) -> HiddenAxes:
    """The permutation spec of ``model``: declared (``model.hidden_axes``) or derived for a Sequential MLP."""
    declared = getattr(model, "hidden_axes", None)
    if callable(declared):
        declared = declared()
    if declared is not None:
        return _checked(model, {str(k): [(str(p), int(a)) for p, a in v] for k, v in dict(declared).items()})
    if isinstance(model, nn.Sequential):
        return _checked(model, _sequential_axes(model))
    raise ProbeError(f"the hidden axes of a {type(model).__name__} cannot be determined (weight matching knows "
                     f"nn.Sequential MLPs); {HOW_TO_DECLARE}, or use align: [none]")


def _sequential_axes(model: nn.Sequential) -> HiddenAxes:
    linears = []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            linears.append((name, module))
        elif not isinstance(module, ELEMENTWISE) or any(True for _ in module.parameters()):
            raise ProbeError(f"module {name!r} ({type(module).__name__}) of the Sequential is neither nn.Linear nor "
                             f"a parameter-free elementwise activation, so its hidden axes cannot be derived; "
                             f"{HOW_TO_DECLARE}, or use align: [none]")
    axes: HiddenAxes = {}
    for (name, layer), (next_name, _) in zip(linears[:-1], linears[1:]):
        axes[name] = [(f"{name}.weight", 0)]
        if layer.bias is not None:
            axes[name].append((f"{name}.bias", 0))
        axes[name].append((f"{next_name}.weight", 1))
    return axes


def _checked(model: nn.Module, axes: HiddenAxes) -> HiddenAxes:
    shapes = {name: p.shape for name, p in model.named_parameters()}
    seen: dict[tuple[str, int], str] = {}
    for perm, entries in axes.items():
        if not entries:
            raise ProbeError(f"hidden_axes[{perm!r}] lists no parameter axes")
        sizes = set()
        for param, axis in entries:
            if param not in shapes:
                raise ProbeError(f"hidden_axes[{perm!r}] names parameter {param!r}, which the model does not have "
                                 f"(parameters: {', '.join(shapes)})")
            if not 0 <= axis < len(shapes[param]):
                raise ProbeError(f"hidden_axes[{perm!r}]: {param!r} has {len(shapes[param])} axes, not axis {axis}")
            if (param, axis) in seen:
                raise ProbeError(f"axis {axis} of {param!r} is claimed by both {seen[(param, axis)]!r} and {perm!r}")
            seen[(param, axis)] = perm
            sizes.add(shapes[param][axis])
        if len(sizes) != 1:
            raise ProbeError(f"hidden_axes[{perm!r}] lists axes of different sizes {sorted(sizes)}; the axes of one "
                             f"permutation must all index the same units")
    return axes


def width_of(params: dict[str, torch.Tensor], axes: HiddenAxes, perm: str) -> int:
    param, axis = axes[perm][0]
    return params[param].shape[axis]


def permute(params: dict[str, torch.Tensor], axes: HiddenAxes, perms: dict[str, torch.Tensor],
            skip: str | None = None) -> dict[str, torch.Tensor]:
    """``π(θ)``: every listed axis re-indexed, ``W'[.., i, ..] = W[.., perm[i], ..]`` (``skip``: one left out)."""
    out = dict(params)
    for perm, entries in axes.items():
        if perm == skip:
            continue
        for param, axis in entries:
            out[param] = torch.index_select(out[param], axis, perms[perm].to(out[param].device))
    return out


def inverse(perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.argsort(p) for name, p in perms.items()}


@dataclass
class Matching:
    perms: dict[str, torch.Tensor]    # per hidden layer: θ_b's unit perm[i] goes to position i
    params: dict[str, torch.Tensor]   # π(θ_b), aligned to θ_a
    rounds: int                       # coordinate-descent rounds run
    converged: bool                   # the last round changed no permutation


def weight_matching(params_a: dict[str, torch.Tensor], params_b: dict[str, torch.Tensor], axes: HiddenAxes, *,
                    max_rounds: int = 100, generator: torch.Generator | None = None) -> Matching:
    """Permute θ_b's hidden units to maximize ⟨θ_a, π(θ_b)⟩ (coordinate descent over layers, see module doc)."""
    # The assignment runs on CPU in float64: C is small (width x width) and scipy needs numpy.
    a = {k: v.detach().to("cpu", torch.float64) for k, v in params_a.items()}
    b = {k: v.detach().to("cpu", torch.float64) for k, v in params_b.items()}
    perms = {name: torch.arange(width_of(a, axes, name)) for name in axes}
    names = list(axes)
    start = _forward_start(a, b, axes)
    if _score(a, permute(b, axes, start)) > _score(a, b):   # never start worse than the trained θ_b
        perms = start
    rounds, converged = 0, not names
    while names and rounds < max_rounds:
        rounds += 1
        order = torch.randperm(len(names), generator=generator).tolist() if generator is not None else range(len(names))
        changed = False
        for index in order:
            name = names[index]
            n = width_of(a, axes, name)
            cost = _cost(a, permute(b, axes, perms, skip=name), axes[name], n)
            new = _assignment(cost)
            old_score = float(cost[torch.arange(n), perms[name]].sum())
            new_score = float(cost[torch.arange(n), new].sum())
            # Only a strict gain (beyond rounding) counts, so ties cannot make the descent cycle.
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[name] = new
                changed = True
        if not changed:
            converged = True
            break
    aligned = permute({k: v.detach() for k, v in params_b.items()}, axes, perms)
    return Matching(perms, aligned, rounds, converged)


def _forward_start(a: dict, b: dict, axes: HiddenAxes) -> dict[str, torch.Tensor]:
    """Layers matched in order on the parameters whose other axes are matched already (module doc)."""
    names = list(axes)
    owner = {(param, axis): name for name, entries in axes.items() for param, axis in entries}
    perms = {name: torch.arange(width_of(a, axes, name)) for name in names}
    for k, name in enumerate(names):
        done = {None, *names[:k]}
        known = [(param, axis) for param, axis in axes[name]
                 if all(owner.get((param, other)) in done for other in range(a[param].dim()) if other != axis)]
        others = permute(b, axes, perms, skip=name)
        perms[name] = _assignment(_cost(a, others, known or axes[name], width_of(a, axes, name)))
    return perms


def _score(a: dict, b: dict) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def _cost(a: dict, b: dict, entries: list[tuple[str, int]], n: int) -> torch.Tensor:
    """C[i, j] = Σ_(w, axis) ⟨unit i of W_a, unit j of W_b⟩ along the listed axes."""
    cost = torch.zeros(n, n, dtype=torch.float64)
    for param, axis in entries:
        cost += torch.movedim(a[param], axis, 0).reshape(n, -1) @ torch.movedim(b[param], axis, 0).reshape(n, -1).T
    return cost


def _assignment(cost: torch.Tensor) -> torch.Tensor:
    """The permutation maximizing Σ_i C[i, perm[i]]."""
    from scipy.optimize import linear_sum_assignment   # here: scipy.optimize takes ~0.6 s to import

    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
