"""Batched Langevin chains on the localized tempered posterior, and the local learning coefficient.

The target is the localized, tempered posterior around a parameter w*
(Lau, Furman, Wang, Murfet & Wei 2023, "The local learning coefficient: a
singularity-aware complexity measure", arXiv:2308.12108):

    p(w) ∝ exp(−U(w)),    U(w) = nβ·L_n(w) + (γ/2)·‖w − w*‖²,

with L_n the mean training loss, nβ the inverse temperature times the number of
examples (default n/log n, Watanabe 2013, "A widely applicable Bayesian
information criterion", JMLR 14) and γ the localization strength. Its local
learning coefficient is estimated from the chains' draws as

    λ̂ = nβ·(E_w[L_n(w)] − L_n(w*)),

whose expectation is d/2 for a regular model with d parameters (the expected energy of a
Gaussian), and ½·Σ_i nβh_i/(nβh_i + γ) for a quadratic loss with Hessian
eigenvalues h_i.

Samplers (step ε, standard normal ξ, per chain):

``sgld`` (Welling & Teh 2011, ICML)
    w ← w − (ε/2)·∇Û(w) + √ε·ξ, with Û the potential on a minibatch (or the full
    data set: the unadjusted Langevin algorithm).
``sgld_rmsprop`` (Li, Chen, Carlson & Carin 2016, AAAI, "preconditioned SGLD")
    V ← αV + (1−α)·g², G = 1/(√(V/(1−α^t)) + δ), w ← w − (ε/2)·G·∇Û(w) + √(εG)·ξ, with g the
    gradient of the minibatch loss, α = 0.99 and δ = 0.1 (devinterp's choices; δ
    bounds G by 10 at a minimum where g ≈ 0). A preconditioner that keeps following
    the chain makes it sample the wrong distribution (Li et al. drop the Γ term that
    would fix it; we measured +10% on the LLC of linear regression), so, as in the
    warm-up of adaptive MCMC, G adapts only during the first ``adapt_steps`` steps
    (the burn-in) and is frozen afterwards: a constant G leaves p invariant.
``mala`` (Roberts & Tweedie 1996, Bernoulli 2(4))
    the full-batch Langevin proposal w' = w − (ε/2)·∇U(w) + √ε·ξ, accepted with
    probability min(1, exp(U(w) − U(w') + ‖ξ‖²/2 − ‖w − w' + (ε/2)∇U(w')‖²/(2ε))),
    so the chain targets p exactly at any step size.

With full-batch gradients the same Metropolis–Hastings acceptance probability is
computed for the unadjusted samplers too (with G frozen over the step): it
measures the discretization error of a step, and :func:`calibrate_step_size`
picks the largest step on a geometric grid whose chains stay finite and reach a
target mean acceptance.

All chains advance together: their parameters are one tensor of shape
``(chains, d)``, gradients come from ``torch.func.vmap`` over ``grad_and_value``
of ``functional_call``, each step is one fused update of that tensor, and every
chain has its own noise and its own minibatch order, drawn from generators
seeded by the caller. Several cells that share a model and a data set but not
their w* (e.g. several training seeds) are sampled together the same way: the
posterior holds one centre per cell, each chain is pulled toward its cell's
centre, and each cell's chains draw from that cell's own generators, so a cell
gets the same chains whether it is sampled alone or with others. A chain whose loss or distance becomes NaN/inf, or whose
excess energy nβ·(L_n(w) − L_n(w*)) exceeds 100·d (200 times the largest possible
learning coefficient d/2), is flagged as diverged, parked at w* and left out of
every estimate.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch.func import grad_and_value, vmap

from basinprobe.runtime.substrate.compiled import maybe_compile

SAMPLERS = ("sgld", "sgld_rmsprop", "mala")

RMSPROP_ALPHA = 0.99
RMSPROP_DELTA = 0.1

# Chains × rows evaluated at once; larger data sets are processed in chunks of rows.
CHAIN_ROWS_PER_CHUNK = 1 << 18

# Draw each step's noise on a helper thread during the step before (CPU only; see NoiseSource).
PREFETCH_NOISE = True
# Chain states (chains × d) of at least this many numbers make a pass over them cost more than the
# dispatch of a few small ops: above it, plain SGLD takes its gradient per parameter tensor (see
# LocalPosterior) and the noise thread may get a core of its own (see NoiseSource).
LARGE_STATE_NUMBERS = 1 << 17
# Chains that see at most this many rows a step leave the intra-op threads mostly idle.
LEND_CORE_MAX_ROWS = 32
# Measure a minibatch draw on a second helper thread while the update runs (see sample).
MEASURE_ALONGSIDE = True

# A chain is diverged once nβ·(L − L*) exceeds this many times d.
DIVERGENCE_ENERGY_PER_PARAM = 100.0


class LocalPosterior:
    """U(w) = nβ·L_n(w) + (γ/2)·‖w − w*‖² for a batch of parameter vectors.

    ``forward(flat, x)`` maps one flat parameter vector and a batch of inputs to
    outputs and must work under ``torch.func`` transforms (``CellContext.forward``
    does); ``loss_fn(outputs, targets)`` is a mean over the batch. Every method
    takes parameters of shape ``(chains, d)``. ``center`` is one w* of shape
    ``(d,)``, or one per cell, ``(cells, d)``, for cells that share the model and
    the data. ``compile=True`` wraps the per-step vmapped gradient in
    ``torch.compile`` (:func:`~basinprobe.runtime.substrate.compiled.maybe_compile`).

    ``param_shapes`` (the model's parameter names and shapes, in flat order) lets the
    gradient be taken per parameter tensor, with ``forward`` called on a dict of views into
    the flat state: the minibatch SGLD step then uses the per-tensor gradients as they come,
    instead of paying for their concatenation into a fresh ``(chains, d)`` tensor (0.6 ms of
    a 9 ms step for 64 chains of 10k parameters).
    """

    def __init__(self, forward: Callable, loss_fn: Callable, X: torch.Tensor, y: torch.Tensor,
                 center: torch.Tensor, nbeta: float, localization: float, compile: bool = False,
                 param_shapes: Mapping[str, torch.Size] | None = None):
        self.X, self.y = X, y
        center = center.detach()
        self.centers = center.reshape(-1, center.shape[-1])
        self.cells, self.d = self.centers.shape
        self.nbeta = float(nbeta)
        self.localization = float(localization)
        self.n = len(X)
        self.param_shapes = dict(param_shapes) if param_shapes is not None else None
        if self.param_shapes is not None:
            sizes = [math.prod(shape) for shape in self.param_shapes.values()]
            if sum(sizes) != self.d:
                raise ValueError(f"param_shapes hold {sum(sizes)} parameters, the centre {self.d}")
            self._piece_sizes = sizes

        def loss_of(flat, x, targets):
            return loss_fn(forward(flat, x), targets)

        def loss_of_pieces(pieces, x, targets):
            params = {name: piece.view(shape) for (name, shape), piece in zip(self.param_shapes.items(), pieces)}
            return loss_fn(forward(params, x), targets)

        # The vmapped gradient is the whole cost of a step; the update around it is a few fused
        # elementwise passes. Only the sampling loop uses the compiled version (one-off calls
        # such as the gradient at w* would pay for a compilation they do not amortize).
        # Keyed by per_tensor: (gradient on shared rows, gradient on each chain's own rows).
        self._eager = {False: (vmap(grad_and_value(loss_of), in_dims=(0, None, None)),
                               vmap(grad_and_value(loss_of), in_dims=(0, 0, 0)))}
        if self.param_shapes is not None:
            self._eager[True] = (vmap(grad_and_value(loss_of_pieces), in_dims=(0, None, None)),
                                 vmap(grad_and_value(loss_of_pieces), in_dims=(0, 0, 0)))
        self._compiled = {key: tuple(maybe_compile(fn, compile, "sgld step") for fn in fns)
                          for key, fns in self._eager.items()}
        self._shared_rows_value = vmap(loss_of, in_dims=(0, None, None))
        self.losses_at_centers = self.loss(self.centers)

    def pieces(self, w: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``w`` (shape ``(chains, d)``), one per parameter tensor in flat order, each
        ``(chains, numel)``; ``[w]`` itself without ``param_shapes``. :meth:`loss_and_grad`
        returns its per-tensor gradients in this layout."""
        if self.param_shapes is None:
            return [w]
        return list(torch.split(w, self._piece_sizes, dim=1))

    @property
    def center(self) -> torch.Tensor:
        """w* of a single-cell posterior, shape ``(d,)``."""
        if self.cells != 1:
            raise ValueError(f"this posterior has {self.cells} centres; use centers")
        return self.centers[0]

    @property
    def loss_at_center(self) -> float:
        """L_n(w*) of a single-cell posterior."""
        self.center  # noqa: B018 - raises for several cells
        return float(self.losses_at_centers[0])

    def _rows_per_chunk(self, chains: int) -> int:
        return max(1, CHAIN_ROWS_PER_CHUNK // max(chains, 1))

    def loss_and_grad(self, w: torch.Tensor, rows: torch.Tensor | None = None, compiled: bool = True,
                      per_tensor: bool = False):
        """Mean loss and its gradient per chain: on the full data set (``rows=None``)
        or on each chain's own minibatch ``rows`` (indices, shape ``(chains, batch)``).
        The gradient has shape ``(chains, d)``, or with ``per_tensor=True`` (and
        ``param_shapes``) is a list laid out as :meth:`pieces`. ``compiled=False`` uses
        the eager functions even when the posterior compiles."""
        per_tensor = per_tensor and self.param_shapes is not None
        shared_rows, own_rows = (self._compiled if compiled else self._eager)[per_tensor]
        inputs = tuple(self.pieces(w)) if per_tensor else w
        chunk = self._rows_per_chunk(len(w))
        total = self.n if rows is None else rows.shape[1]
        if total <= chunk:
            if rows is None:
                g, value = shared_rows(inputs, self.X, self.y)
            else:
                g, value = own_rows(inputs, self.X[rows], self.y[rows])
            return value, (list(g) if per_tensor else g)
        loss = torch.zeros(len(w), dtype=w.dtype, device=w.device)
        gradient = [torch.zeros(piece.shape, dtype=w.dtype, device=w.device) for piece in inputs] \
            if per_tensor else torch.zeros_like(w)
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            if rows is None:
                g, value = shared_rows(inputs, self.X[start:stop], self.y[start:stop])
            else:
                idx = rows[:, start:stop]
                g, value = own_rows(inputs, self.X[idx], self.y[idx])
            # loss_fn is a mean over its batch, so chunks combine with weights len/total.
            weight = (stop - start) / total
            loss.add_(value, alpha=weight)
            for total_piece, piece in (zip(gradient, g) if per_tensor else [(gradient, g)]):
                total_piece.add_(piece, alpha=weight)
        return loss, gradient

    @torch.no_grad()
    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """Full-data mean loss per chain, shape ``(chains,)``."""
        chunk = self._rows_per_chunk(len(w))
        loss = torch.zeros(len(w), dtype=w.dtype, device=w.device)
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            loss.add_(self._shared_rows_value(w, self.X[start:stop], self.y[start:stop]), alpha=(stop - start) / self.n)
        return loss

    def potential(self, loss: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """U per chain from its loss; ``anchor`` holds each chain's w*, shape ``(chains, d)``."""
        return self.nbeta * loss + 0.5 * self.localization * (w - anchor).square().sum(dim=1)

    def potential_grad(self, loss_grad: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return self.nbeta * loss_grad + self.localization * (w - anchor)

    def grad_at_centers(self) -> torch.Tensor:
        """∇L_n at every w*, shape ``(cells, d)``."""
        return self.loss_and_grad(self.centers, compiled=False)[1]


class NoiseSource:
    """Standard normal noise of shape ``(cells·chains, d)``, cell i's rows drawn from ``generators[i]``.

    On CPU the generators are sequential Mersenne twisters, and drawing the noise of 64
    chains of a 10k-parameter model takes a third of a step; so while a step runs, one
    helper thread draws the next step's noise into a second buffer (torch releases the
    GIL inside its kernels). The draws happen in the same order, so the noise is the same
    as drawn in line. On other devices the draws are asynchronous kernels already.

    The helper needs a core of its own, and OpenMP's idle intra-op threads spin rather than
    yield one. When each chain's step sees few rows (``rows_per_chain`` ≤ LEND_CORE_MAX_ROWS),
    its kernels are too small to gain much from every thread while the draw is as large as
    the step, so the step runs on one intra-op thread fewer until :meth:`close` (64 chains of
    10k parameters, minibatch 16, 2 cores: 12.5–14.5 → 8.8–9.5 ms/step). With larger
    minibatches, full batches or draws that evaluate the full training loss the kernels use
    every thread better than the draw would, and the thread count stays (measured: 10% to 60%
    slower with a thread lent).

    ``fold``, if given, is applied in place to each step's noise before it is handed out (on the
    helper thread when there is one): a sampler folds a term of its update that does not depend
    on the state into it, which takes a pass over the state off the step.
    """

    def __init__(self, like: torch.Tensor, rows: Sequence[slice], generators: Sequence[torch.Generator],
                 steps: int, rows_per_chain: int, fold: Callable[[torch.Tensor], object] | None = None):
        self.rows, self.generators, self.steps, self.fold = list(rows), list(generators), steps, fold
        prefetch = PREFETCH_NOISE and like.device.type == "cpu" and steps > 1
        self.buffers = [torch.empty_like(like) for _ in range(2 if prefetch else 1)]
        self.drawn = 0   # steps whose noise has been drawn or is being drawn
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self.threads_before = torch.get_num_threads()
        self.lent_core = (prefetch and self.threads_before > 1 and like.numel() >= LARGE_STATE_NUMBERS
                          and rows_per_chain <= LEND_CORE_MAX_ROWS)
        if self.lent_core:
            # The count is process-wide: other threads that run torch kernels meanwhile get one fewer too.
            torch.set_num_threads(self.threads_before - 1)
        self.pending = self._submit() if self.pool else None

    def _draw(self, buffer: torch.Tensor) -> torch.Tensor:
        for rows, g in zip(self.rows, self.generators):
            part = buffer[rows]
            # torch.randn(out=) releases the GIL while it draws; Tensor.normal_ does not
            torch.randn(part.shape, generator=g, out=part, dtype=part.dtype, device=part.device)
        if self.fold is not None:
            self.fold(buffer)
        return buffer

    def _submit(self):
        buffer = self.buffers[self.drawn % 2]
        self.drawn += 1
        return self.pool.submit(self._draw, buffer)

    def next(self) -> torch.Tensor:
        """The noise of the next step; valid until the call after next."""
        if self.pool is None:
            return self._draw(self.buffers[0])
        noise = self.pending.result()
        self.pending = self._submit() if self.drawn < self.steps else None
        return noise

    def close(self) -> None:
        if self.pool is not None:
            if self.pending is not None:
                self.pending.result()
            self.pool.shutdown()
        if self.lent_core:
            torch.set_num_threads(self.threads_before)
            self.lent_core = False


@dataclass
class ChainTrace:
    """What the chains recorded, on the CPU in float64; draw k is the state after (k+1)·thin steps.

    Entries of a diverged chain from the draw it diverged at onwards are NaN
    (missing): ``diverged_at`` gives that draw (−1 for a chain that did not).
    With several cells the chains of cell i are rows i·chains .. (i+1)·chains − 1;
    :meth:`cell` cuts them out.
    """

    loss: torch.Tensor              # (chains, draws) L_n(w), or its minibatch estimate (draw_loss="minibatch")
    distance: torch.Tensor          # (chains, draws) ‖w − w*‖
    grad_norm_sq: torch.Tensor      # (chains, draws) ‖∇U‖² (on the step's minibatch if not full batch)
    acceptance: torch.Tensor | None  # (chains, draws) mean MH acceptance probability (full batch only)
    diverged: torch.Tensor          # (chains,) bool
    diverged_at: torch.Tensor       # (chains,) int
    samples: torch.Tensor | None    # (chains, draws, d) when asked for
    loss_at_center: torch.Tensor    # (chains,) L_n(w*) of each chain's w*
    step_size: torch.Tensor         # (chains,)
    nbeta: float

    def cell(self, i: int, chains: int) -> "ChainTrace":
        """The chains of the ``i``-th cell (``chains`` per cell)."""
        rows = slice(i * chains, (i + 1) * chains)

        def part(x):
            return None if x is None else x[rows]

        return ChainTrace(
            loss=part(self.loss), distance=part(self.distance), grad_norm_sq=part(self.grad_norm_sq),
            acceptance=part(self.acceptance), diverged=part(self.diverged), diverged_at=part(self.diverged_at),
            samples=part(self.samples), loss_at_center=part(self.loss_at_center), step_size=part(self.step_size),
            nbeta=self.nbeta)


def _per_chain(value, cells: int, chains: int, dtype, device) -> torch.Tensor:
    """A number, one value per cell or one per chain -> shape ``(cells·chains,)``."""
    value = torch.as_tensor(value, dtype=dtype).to(device).reshape(-1)
    if value.numel() == cells * chains:
        return value.clone()
    if value.numel() == cells:
        return value.repeat_interleave(chains)
    if value.numel() == 1:
        return value.expand(cells * chains).clone()
    raise ValueError(f"step_size must be one number, one per cell ({cells}) or one per chain ({cells * chains}), "
                     f"not {value.numel()} values")


def sample(posterior: LocalPosterior, *, step_size: float | torch.Tensor, chains: int, draws: int, thin: int = 1,
           sampler: str = "sgld", batch_size: int | None = None, seed: int | Sequence[int] = 0,
           progress=None, keep_samples: bool = False, init: torch.Tensor | None = None,
           adapt_steps: int | None = None, draw_loss: str = "full") -> ChainTrace:
    """Run ``chains`` Langevin chains per cell from w* (or ``init``, shape ``(cells·chains, d)``)
    for ``draws·thin`` steps; all chains of all cells advance together.

    ``step_size`` is one number, one per cell (shape ``(cells,)``) or one per chain
    (``(cells·chains,)``). ``sgld_rmsprop`` adapts its preconditioner during the
    first ``adapt_steps`` steps (None: always). ``batch_size=None`` (or ≥ n) uses
    full-batch gradients; ``mala`` requires it. With minibatches, ``draw_loss="full"``
    records L_n at each draw (a forward pass over the training set per draw),
    ``"minibatch"`` the loss of the draw's last minibatch at the state it was taken
    at: free, and unbiased for L_n there because the minibatch is drawn
    independently of the state, but noisier. ``seed`` is one integer per cell (a
    single integer for one cell): the noise, minibatch order and acceptance draws of
    cell i's chains come from generators on the posterior's device seeded with
    ``seed[i]``, ``seed[i] + 1`` and ``seed[i] + 2``, so a cell's chains do not depend
    on which other cells are sampled with it.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if draw_loss not in ("full", "minibatch"):
        raise ValueError(f"draw_loss must be 'full' or 'minibatch', not {draw_loss!r}")
    full = batch_size is None or batch_size >= posterior.n
    if sampler == "mala" and not full:
        raise ValueError("mala needs full-batch gradients (batch_size=None): a minibatch Metropolis test is biased")
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    cells = posterior.cells
    if len(seeds) != cells:
        raise ValueError(f"{len(seeds)} seeds given for a posterior with {cells} cells")
    K = cells * chains
    per_cell = [slice(i * chains, (i + 1) * chains) for i in range(cells)]
    centers = posterior.centers
    device, dtype, d = centers.device, centers.dtype, posterior.d
    # (K, d): each chain's w*. One cell's chains share a stride-0 view of its centre, so the passes
    # that read it touch d numbers, not K·d.
    anchor = centers.expand(K, d) if cells == 1 else centers.repeat_interleave(chains, dim=0)
    L_star = posterior.losses_at_centers.repeat_interleave(chains)  # (K,)
    eps = _per_chain(step_size, cells, chains, dtype, device)[:, None]
    neg_half_eps, sqrt_eps = -0.5 * eps, eps.sqrt()
    nbeta = posterior.nbeta
    energy_bound = DIVERGENCE_ENERGY_PER_PARAM * max(d, 1)

    noise_gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    batch_gens = [torch.Generator(device=device).manual_seed(s + 1) for s in seeds]
    accept_gens = [torch.Generator(device=device).manual_seed(s + 2) for s in seeds]

    w = (anchor if init is None else init.to(device=device, dtype=dtype)).clone(memory_format=torch.contiguous_format)
    alive = torch.ones(K, dtype=torch.bool, device=device)
    diverged_at = torch.full((K,), -1, dtype=torch.long, device=device)
    nan = torch.tensor(float("nan"), dtype=dtype, device=device)
    loss_trace = torch.empty(draws, K, dtype=dtype, device=device)
    dist_trace = torch.empty_like(loss_trace)
    gsq_trace = torch.empty_like(loss_trace)
    acc_trace = torch.empty_like(loss_trace) if full else None
    samples = torch.empty(draws, K, d, dtype=dtype, device=device) if keep_samples else None
    acc_sum = torch.zeros(K, dtype=dtype, device=device)
    rmsprop = sampler == "sgld_rmsprop"
    square_avg = torch.zeros_like(w) if rmsprop else None
    precond = 1.0 / (square_avg.sqrt() + RMSPROP_DELTA) if rmsprop else None

    if full:
        loss, loss_grad = posterior.loss_and_grad(w)
    order, position = None, 0
    n_batches = 0 if full else posterior.n // batch_size
    # Steps write into held buffers: a fresh (chains, d) tensor per step costs its page faults,
    # as much as the pass itself (measured: 1.3 ms against 0.15 ms in place for 64 x 10k).
    offset_buffer = torch.empty_like(w)
    # Plain minibatch SGLD, w ← (1 − εγ/2)·w + (εγ/2)·w* − (εnβ/2)·∇L_B + √ε·ξ: the noise arrives as
    # (εγ/2)·w* + √ε·ξ, and two fused passes alternate between two state buffers.
    plain = sampler == "sgld" and not full
    states = (w, torch.empty_like(w)) if plain else None
    # It takes its gradient per parameter tensor when the state is large (no flat copy of it).
    per_tensor = plain and posterior.param_shapes is not None and K * d >= LARGE_STATE_NUMBERS
    pieces = posterior.pieces if per_tensor else (lambda t: [t])
    fold = None
    if plain:
        keep = 1 - 0.5 * eps * posterior.localization
        push = -0.5 * eps * nbeta
        pull = (0.5 * posterior.localization) * sqrt_eps

        def fold(xi):
            # the noise's share of the step: √ε·ξ + (εγ/2)·w* = √ε·(ξ + (√ε·γ/2)·w*)
            torch.addcmul(xi, pull, anchor, out=xi).mul_(sqrt_eps)

    def measure(state, gradient_state, loss_grad, grad_U):
        """‖state − w*‖, and ‖∇U‖² at the state the gradient was taken at."""
        offset = torch.sub(state, anchor, out=offset_buffer)
        distance = torch.linalg.vector_norm(offset, dim=1)
        if grad_U is not None:
            return distance, torch.linalg.vector_norm(grad_U, dim=1).square()
        # Plain SGLD skipped ∇U = nβ·∇L + γ·(w − w*) in its fused step; its loss_grad is a list (pieces()).
        if not posterior.localization:
            gradient = torch.cat(loss_grad, dim=1) if per_tensor else loss_grad[0]
            return distance, (nbeta * torch.linalg.vector_norm(gradient, dim=1)).square()
        if gradient_state is not state:
            offset = torch.sub(gradient_state, anchor, out=offset_buffer)
        for piece, piece_grad in zip(pieces(offset), loss_grad):
            piece.add_(piece_grad, alpha=nbeta / posterior.localization)
        return distance, (posterior.localization * torch.linalg.vector_norm(offset, dim=1)).square()

    # Draws that evaluate L_n pass every row through the chains: count them as full-batch steps
    # (a lent thread made them 1.4x slower).
    rows_per_chain = batch_size if not full and draw_loss == "minibatch" else posterior.n
    noise = NoiseSource(w, per_cell, noise_gens, draws * thin, rows_per_chain=rows_per_chain, fold=fold)
    # With a large state, a second helper measures a minibatch draw (its distance and ∇U, three
    # passes over the state) while the step's update runs: both only read w_before and the gradient.
    side = ThreadPoolExecutor(max_workers=1) \
        if (MEASURE_ALONGSIDE and plain and noise.pool is not None and K * d >= LARGE_STATE_NUMBERS
            and draw_loss == "minibatch") else None
    try:
        for t in range(draws * thin):
            xi = noise.next()
            record = (t + 1) % thin == 0
            if not full:
                if order is None or position == n_batches:
                    # A fresh permutation per chain and epoch: independent minibatch orders.
                    order = torch.cat([torch.rand(chains, posterior.n, generator=g, device=device).argsort(dim=1)
                                       for g in batch_gens])
                    position = 0
                rows = order[:, position * batch_size:(position + 1) * batch_size]
                position += 1
                loss, loss_grad = posterior.loss_and_grad(w, rows, per_tensor=per_tensor)
                if plain and not per_tensor:
                    loss_grad = [loss_grad]   # plain SGLD holds its gradient as a list laid out as pieces()
            w_before = w
            grad_U = None if plain else posterior.potential_grad(loss_grad, w, anchor)
            measuring = side.submit(measure, w, w, loss_grad, None) if side is not None and record else None
            if plain:
                spare = states[1] if w.data_ptr() == states[0].data_ptr() else states[0]
                proposal = torch.addcmul(xi, keep, w, out=spare)
                for piece, piece_grad in zip(pieces(proposal), loss_grad):
                    piece.addcmul_(push, piece_grad)
            elif rmsprop:
                if adapt_steps is None or t < adapt_steps:
                    square_avg.mul_(RMSPROP_ALPHA).addcmul_(loss_grad, loss_grad, value=1 - RMSPROP_ALPHA)
                    # Bias-corrected average (as in Adam): a zero start would inflate G early on.
                    unbiased = square_avg / (1 - RMSPROP_ALPHA ** (t + 1))
                    precond = 1.0 / (unbiased.sqrt() + RMSPROP_DELTA)
                proposal = torch.addcmul(w, neg_half_eps * precond, grad_U).addcmul_((eps * precond).sqrt(), xi)
            else:
                proposal = torch.addcmul(w, neg_half_eps, grad_U).addcmul_(sqrt_eps, xi)

            if full:
                new_loss, new_grad = posterior.loss_and_grad(proposal)
                new_grad_U = posterior.potential_grad(new_grad, proposal, anchor)
                reverse_mean = torch.addcmul(proposal, neg_half_eps, new_grad_U if precond is None else precond * new_grad_U)
                reverse_sq = (w - reverse_mean).square()
                reverse_sq = reverse_sq if precond is None else reverse_sq / precond
                log_alpha = (posterior.potential(loss, w, anchor) - posterior.potential(new_loss, proposal, anchor)
                             - reverse_sq.sum(dim=1) / (2 * eps[:, 0]) + 0.5 * xi.square().sum(dim=1))
                accept_prob = torch.nan_to_num(log_alpha.clamp(max=0.0).exp(), nan=0.0)
                acc_sum += accept_prob
                if sampler == "mala":
                    u = torch.cat([torch.rand(chains, generator=g, device=device, dtype=dtype) for g in accept_gens])
                    accept = u < accept_prob
                    w = torch.where(accept[:, None], proposal, w)
                    loss = torch.where(accept, new_loss, loss)
                    loss_grad = torch.where(accept[:, None], new_grad, loss_grad)
                    grad_U = torch.where(accept[:, None], new_grad_U, grad_U)
                else:
                    w, loss, loss_grad, grad_U = proposal, new_loss, new_grad, new_grad_U
            else:
                w = proposal

            if record:
                k = (t + 1) // thin - 1
                if full or draw_loss == "full":
                    state, value = w, (loss if full else posterior.loss(w))
                else:
                    state, value = w_before, loss
                distance, grad_norm_sq = measuring.result() if measuring is not None \
                    else measure(state, w_before, loss_grad, grad_U)
                bad = ~torch.isfinite(value) | ~torch.isfinite(distance) | (nbeta * (value - L_star) > energy_bound)
                diverged_at = torch.where(bad & alive, k, diverged_at)
                alive = alive & ~bad
                loss_trace[k] = torch.where(alive, value, nan)
                dist_trace[k] = torch.where(alive, distance, nan)
                gsq_trace[k] = torch.where(alive, grad_norm_sq, nan)
                if full:
                    acc_trace[k] = torch.where(alive, acc_sum / thin, nan)
                    acc_sum.zero_()
                if bad.any():
                    # Park diverged chains at w* so they stay finite (they are never read again).
                    w = torch.where(alive[:, None], w, anchor)
                    if full:
                        loss = torch.where(alive, loss, L_star)
                        loss_grad = torch.where(alive[:, None], loss_grad, 0.0)
                    if rmsprop:
                        square_avg = torch.where(alive[:, None], square_avg, 0.0)
                        precond = torch.where(alive[:, None], precond, 1.0 / RMSPROP_DELTA)
                if keep_samples:
                    samples[k] = torch.where(alive[:, None], state, nan)
            if progress is not None:
                progress.advance(1)
    finally:
        noise.close()
        if side is not None:
            side.shutdown()

    def out(x):
        return None if x is None else x.transpose(0, 1).to(device="cpu", dtype=torch.float64)

    diverged_at = diverged_at.cpu()
    return ChainTrace(
        loss=out(loss_trace), distance=out(dist_trace), grad_norm_sq=out(gsq_trace),
        acceptance=out(acc_trace), diverged=diverged_at >= 0, diverged_at=diverged_at,
        samples=out(samples), loss_at_center=L_star.to(device="cpu", dtype=torch.float64),
        step_size=eps[:, 0].cpu().double(), nbeta=nbeta,
    )


def llc_per_chain(trace: ChainTrace, burn_in: int) -> torch.Tensor:
    """λ̂ of each chain, nβ·(mean of L_n over draws after burn-in − L_n(w*)); NaN for diverged chains."""
    return trace.nbeta * (trace.loss[:, burn_in:].mean(dim=1) - trace.loss_at_center)


@dataclass
class Calibration:
    """A step-size search: the grid (largest first) and what short chains measured at each step."""

    step_size: float | None         # the chosen step, None if no grid step qualified
    grid: list[float]
    acceptance: list[float]         # mean MH acceptance probability of the surviving chains (0 if none)
    llc: list[float]                # λ̂ of the short surviving chains (NaN if none survived)
    diverged_fraction: list[float]
    top_curvature: float            # |largest Hessian eigenvalue| of L_n at w*, the grid's anchor
    target_acceptance: float


def calibration_grid(posterior: LocalPosterior, top_eigenvalue: float, size: int = 16) -> list[float]:
    """ε_k = 2^(1−k) / (nβ·h_max + γ), k = 0..size−1: from half the step at which the
    Gaussian approximation's stiffest direction turns unstable (4/p_max), halving."""
    stiffest = posterior.nbeta * top_eigenvalue + posterior.localization
    if not math.isfinite(stiffest) or stiffest <= 0:
        stiffest = 1.0
    return [2.0 ** (1 - k) / stiffest for k in range(size)]


def calibrate_step_size(posterior: LocalPosterior, *, top_eigenvalue: float, sampler: str, chains: int,
                        seed: int, target_acceptance: float, steps: int = 64, grid_size: int = 16,
                        progress=None) -> Calibration:
    """The largest step at which full-batch chains stay finite and the mean
    Metropolis–Hastings acceptance probability of their steps (second half of
    ``steps``) reaches ``target_acceptance``: the largest such step of a geometric
    grid, moved toward the next larger grid step by interpolating log(1 − acceptance)
    linearly in log ε when that step kept its chains finite.

    The acceptance probability measures how far one Langevin step is from exact,
    so the estimate stops depending on the step once it is high. All grid steps
    run as one batch of ``chains × grid_size`` chains, each with its own step.
    Short chains cannot judge mixing; the caller checks that on the full run.
    ``top_eigenvalue`` is the largest Hessian eigenvalue of L_n at w* (from the curvature
    engine's ``hessian.eigen``), which anchors the grid.
    """
    return calibrate_step_sizes(posterior, top_eigenvalues=[top_eigenvalue], sampler=sampler, chains=chains,
                                seeds=[seed],
                                target_acceptance=target_acceptance, steps=steps, grid_size=grid_size,
                                progress=progress)[0]


def calibrate_step_sizes(posterior: LocalPosterior, *, top_eigenvalues: Sequence[float], sampler: str,
                         chains: int, seeds: Sequence[int], target_acceptance: float, steps: int = 64, grid_size: int = 16,
                         progress=None) -> list[Calibration]:
    """:func:`calibrate_step_size` for every cell of ``posterior`` (``seeds``: one per
    cell), all cells' grid chains advanced together; each cell gets its own grid."""
    cells = posterior.cells
    h_max = [abs(float(h)) for h in top_eigenvalues]
    grids = [calibration_grid(posterior, h, grid_size) for h in h_max]
    steps_per_chain = torch.tensor(grids, dtype=torch.float64).reshape(-1).repeat_interleave(chains)
    half = steps // 2
    trace = sample(posterior, step_size=steps_per_chain, chains=chains * grid_size, draws=steps,
                   sampler=sampler, batch_size=None, seed=list(seeds), progress=progress, adapt_steps=half)
    llc = llc_per_chain(trace, half).reshape(cells, grid_size, chains)
    accepted = trace.acceptance[:, half:].mean(dim=1).reshape(cells, grid_size, chains)
    diverged = trace.diverged.reshape(cells, grid_size, chains)
    return [_choose_step(grids[i], accepted[i], llc[i], diverged[i], h_max[i], target_acceptance)
            for i in range(cells)]


def _choose_step(grid: list[float], accepted: torch.Tensor, llc: torch.Tensor, diverged: torch.Tensor,
                 h_max: float, target_acceptance: float) -> Calibration:
    grid_size = len(grid)
    acceptance, llcs, fractions = [], [], []
    for acc, lam, div in zip(accepted, llc, diverged):
        alive = ~div
        acceptance.append(float(acc[alive].mean()) if alive.any() else 0.0)
        llcs.append(float(lam[alive].mean()) if alive.any() else float("nan"))
        fractions.append(float(div.double().mean()))
    good = [k for k in range(grid_size) if fractions[k] == 0 and acceptance[k] >= target_acceptance]
    chosen = None
    if good:
        k = good[0]
        chosen = grid[k]
        if k > 0 and fractions[k - 1] == 0 and acceptance[k] < 1:
            # Between grid points 1 − acceptance grows like a power of ε (ε^1.5 for MALA on a
            # Gaussian): interpolate log(1 − a) in log ε to the target instead of settling for
            # the grid point, which can be up to a factor 2 smaller than needed.
            lo, hi = math.log(1 - acceptance[k]), math.log(1 - acceptance[k - 1])
            if hi > lo:
                t = (math.log(1 - target_acceptance) - lo) / (hi - lo)
                chosen = grid[k] * (grid[k - 1] / grid[k]) ** min(max(t, 0.0), 1.0)
    return Calibration(chosen, grid, acceptance, llcs, fractions, h_max, target_acceptance)
