"""Product-driven algorithms as coroutines, so that several can share one batched product.

Lanczos, stochastic Lanczos quadrature and Hutch++ touch their operator only through
products A v (or A V for a block). Written as generators that *yield* the vector
they need multiplied and *receive* the product, each algorithm is independent of how
the product is computed:

- :func:`drive` runs one of them against one operator (``apply(v) -> A v``);
- :func:`drive_many` runs m of them in lockstep against a stacked operator
  (``apply(V) -> (A_j v_j)_j`` for V of shape (m, ...)), e.g. m models that differ only
  in their parameters (batched cells), each product one ``vmap``-ed backward pass
  for all of them. Each routine follows exactly the steps it would take alone (its own
  start vectors, stopping rule and restarts); a routine that has finished is sent no
  more products and its row of V is zero.

Lanczos and SLQ go one step further (:func:`lanczos.lanczos_rows`, :func:`lanczos.quadrature_rows`):
one routine carries m recurrences as the rows of one block, so that their bookkeeping is
batched too; :func:`drive` runs it against a stacked operator.
"""

from __future__ import annotations

from typing import Callable, Generator

import torch

Routine = Generator[torch.Tensor, torch.Tensor, object]


def drive(routine: Routine, apply: Callable[[torch.Tensor], torch.Tensor]):
    """Run ``routine`` to its end, answering each request ``v`` with ``apply(v)``; its return value."""
    try:
        request = next(routine)
        while True:
            request = routine.send(apply(request))
    except StopIteration as stop:
        return stop.value


def drive_many(routines: list[Routine], apply: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Run m routines in lockstep; ``apply`` maps (m, *shape) to (m, *shape) row by row.

    Requests of different shapes (blocks of different widths) are answered in separate
    calls. Returns the routines' return values, in order.
    """
    m = len(routines)
    requests: list[torch.Tensor | None] = [None] * m
    results: list = [None] * m

    def advance(i: int, product: torch.Tensor | None) -> None:
        try:
            requests[i] = next(routines[i]) if product is None else routines[i].send(product)
        except StopIteration as stop:
            requests[i], results[i] = None, stop.value

    for i in range(m):
        advance(i, None)
    while any(r is not None for r in requests):
        by_shape: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if r is not None:
                by_shape.setdefault(tuple(r.shape), []).append(i)
        for shape, rows in by_shape.items():
            V = requests[rows[0]].new_zeros((m, *shape))
            for i in rows:
                V[i] = requests[i]
            products = apply(V)
            for i in rows:
                advance(i, products[i])
    return results
