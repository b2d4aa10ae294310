"""Pruning a chain of linear layers at equal per-layer parameter budgets.

Three ways to spend the same budget of weight-matrix entries in each layer l
(W_l of shape m_l x n_l; biases are not counted):

``neuron``     keep the round(keep·width) hidden units of each hidden layer with the largest
               score ‖[W_l[j, :], b_l[j]]‖·‖W_{l+1}[:, j]‖ (incoming times outgoing norm, which
               a positive rescaling of a ReLU unit leaves unchanged) and remove the others:
               their rows of W_l, entries of b_l and columns of W_{l+1} become 0. This fixes the
               budget: layer l keeps k_l = (kept inputs)·(kept outputs) entries.
``magnitude``  keep the k_l entries of W_l of largest |w| (per weight, per layer; Han, Pool,
               Tran & Dally 2015, "Learning both weights and connections", NeurIPS).
``subspace``   replace W_l by its best rank-r_l approximation U_r S_r V_rᵀ (Eckart–Young),
               r_l = ⌊k_l / (m_l + n_l)⌋, the largest rank whose factors U_r S_r and V_r hold at
               most k_l numbers: pruning in the rotated basis of the layer's singular vectors.
               A layer whose budget covers the whole matrix (k_l = m_l·n_l) is kept as it is:
               factors would cost more than the matrix.

A layer that is exactly of rank ρ ≤ r_l is kept exactly by ``subspace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("magnitude", "neuron", "subspace")


@dataclass(frozen=True)
class LinearLayer:
    weight: str
    bias: str | None
    out_features: int
    in_features: int


def linear_chain(model: torch.nn.Module) -> list[LinearLayer]:
    """The linear layers of an ``nn.Sequential`` of ``nn.Linear`` and parameter-free
    elementwise modules (an MLP), in order; ``ValueError`` for anything else."""
    if not isinstance(model, torch.nn.Sequential):
        raise ValueError(f"pruning needs an nn.Sequential of Linear layers and activations, not {type(model).__name__}")
    layers = []
    for name, module in model.named_children():
        if isinstance(module, torch.nn.Linear):
            layers.append(LinearLayer(f"{name}.weight", f"{name}.bias" if module.bias is not None else None,
                                      module.out_features, module.in_features))
        elif any(True for _ in module.parameters()):
            raise ValueError(f"pruning handles Linear layers and parameter-free activations; module {name!r} "
                             f"({type(module).__name__}) has parameters")
    if not layers:
        raise ValueError("the model has no Linear layers to prune")
    for a, b in zip(layers[:-1], layers[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"layers {a.weight} and {b.weight} do not chain ({a.out_features} -> {b.in_features})")
    return layers


def kept_units(layers: list[LinearLayer], keep: float) -> list[int]:
    """Hidden units kept per hidden layer (the outputs of every layer but the last)."""
    return [max(1, math.floor(keep * layer.out_features + 0.5)) for layer in layers[:-1]]


def neuron_budgets(layers: list[LinearLayer], keep: float) -> list[int]:
    """k_l: the weight entries each layer keeps when ``keep`` of the hidden units stay."""
    units = [layers[0].in_features, *kept_units(layers, keep), layers[-1].out_features]
    return [units[i] * units[i + 1] for i in range(len(layers))]


def prune_neurons(params: dict[str, torch.Tensor], layers: list[LinearLayer], keep: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in params.items()}
    for i, (layer, units) in enumerate(zip(layers[:-1], kept_units(layers, keep))):
        nxt = layers[i + 1]
        incoming = params[layer.weight]
        if layer.bias is not None:
            incoming = torch.cat([incoming, params[layer.bias][:, None]], dim=1)
        score = incoming.norm(dim=1) * params[nxt.weight].norm(dim=0)
        removed = torch.argsort(score, descending=True, stable=True)[units:]
        out[layer.weight][removed] = 0
        if layer.bias is not None:
            out[layer.bias][removed] = 0
        out[nxt.weight][:, removed] = 0
    return out


def prune_magnitude(params: dict[str, torch.Tensor], layers: list[LinearLayer],
                    budgets: list[int]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in params.items()}
    for layer, budget in zip(layers, budgets):
        w = out[layer.weight].reshape(-1)
        removed = torch.argsort(w.abs(), descending=True, stable=True)[budget:]
        w[removed] = 0
    return out


def svd_ranks(layers: list[LinearLayer], budgets: list[int]) -> list[int]:
    full = [min(layer.out_features, layer.in_features) for layer in layers]
    return [f if budget >= layer.out_features * layer.in_features
            else min(budget // (layer.out_features + layer.in_features), f)
            for layer, budget, f in zip(layers, budgets, full)]


def svd_cost(layer: LinearLayer, rank: int) -> int:
    """Numbers stored for a rank-r layer: the factors, or the matrix when that is smaller."""
    return min(rank * (layer.out_features + layer.in_features), layer.out_features * layer.in_features)


def prune_svd(params: dict[str, torch.Tensor], layers: list[LinearLayer],
              budgets: list[int]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in params.items()}
    for layer, rank in zip(layers, svd_ranks(layers, budgets)):
        W = params[layer.weight]
        U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
        out[layer.weight] = ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(W.dtype)
    return out


def prune(params: dict[str, torch.Tensor], layers: list[LinearLayer], method: str,
          keep: float) -> tuple[dict[str, torch.Tensor], int]:
    """Pruned parameters and the weight-matrix entries they spend (SVD: the factors' size)."""
    budgets = neuron_budgets(layers, keep)
    if method == "neuron":
        return prune_neurons(params, layers, keep), sum(budgets)
    if method == "magnitude":
        return prune_magnitude(params, layers, budgets), sum(budgets)
    if method == "subspace":
        ranks = svd_ranks(layers, budgets)
        spent = sum(svd_cost(layer, r) for r, layer in zip(ranks, layers))
        return prune_svd(params, layers, budgets), spent
    raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(METHODS)}")
