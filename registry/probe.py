"""The base class of every probe, built-in or third party."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

OPEN_OBJECT: dict = {"type": "object", "properties": {}, "additionalProperties": False}


class Probe:
    """A measurement run on one cell (one sweep point at one checkpoint).

    Subclasses set:

    ``name``
        the name used in specs (``probe: NAME``).
    ``schema``
        JSON Schema (draft-07 keywords) of the entry's ``with:`` block.
        ``default`` values of top-level properties are filled in before
        :meth:`run` and stored in the group's ``params`` attribute.
    ``requires``
        names of shared artifacts (``"hessian.eigen"``, ...) the probe asks
        the context for; they appear in ``basinprobe plan`` (with the
        producer's default arguments: override :meth:`artifact_requests` when
        ``run`` passes others) and are computed once per cell however many
        probes request them with equal arguments.
    ``scope``
        ``"cell"`` (default): :meth:`run` is called per cell with a cell context.
        ``"group"``: the probe compares cells (e.g. two models trained from
        different seeds); :meth:`spans` names the cell dims it spans, and
        :meth:`run` is called once per combination of the other cell dims
        with a group context (``basinprobe.registry.context.GroupContext``)
        whose ``members`` are the cells of the group.
    ``description``
        one line for ``basinprobe probes``.

    and implement :meth:`run`, returning an ``xarray.Dataset`` whose variables
    carry the probe's own dims only; the runtime adds the cell dims (sweep axes
    and ``checkpoint``). Dims must not be named ``method``, ``tolerance``,
    ``drop`` or ``indexers`` (keywords of ``Dataset.sel``).
    """

    name: ClassVar[str] = ""
    schema: ClassVar[dict] = OPEN_OBJECT
    requires: ClassVar[tuple[str, ...]] = ()
    scope: ClassVar[str] = "cell"
    batched: ClassVar[bool] = False  # run_batched computes several cells at once (vmap over models)
    description: ClassVar[str] = ""

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fill the schema's top-level defaults into a validated ``with:`` block."""
        resolved = {
            key: copy.deepcopy(prop["default"])
            for key, prop in self.schema.get("properties", {}).items()
            if "default" in prop
        }
        resolved.update(params)
        return resolved

    def spans(self, params: dict[str, Any], cell_dims: list[str]) -> list[str]:
        """For ``scope = "group"``: the cell dims one run spans (raise ``ProbeError`` if it cannot)."""
        return []

    def check(self, params: dict[str, Any], n_params: int, n_train: int) -> None:
        """Refuse a ``with:`` block its schema cannot judge: relations between parameters, or to
        the model's ``n_params`` and the training set's ``n_train`` examples. Raise
        ``ProbeError`` naming the fix; it is reported at the entry's ``with:`` line. Called by
        ``validate``, ``plan`` and ``run`` before anything runs, once per distinct model and
        data set of the sweep, and for an entry with its own sweep once per point of it."""

    def artifact_requests(self, params: dict[str, Any]) -> list[tuple[str, dict]]:
        """The shared artifacts a run with ``params`` will request, for the plan."""
        return [(name, {}) for name in self.requires]

    def cost(self, params: dict[str, Any], n_params: int, n_train: int) -> float:
        """A rough cost in forward-pass-equivalents over one sample, for the plan: of one cell,
        or for ``scope = "group"`` of one run over a group."""
        return float(n_train)

    def run_batched(self, ctxs: list, params: dict[str, Any]) -> list:
        """Measure several cells that share an architecture, data and checkpoint step.

        Called instead of :meth:`run` when the spec asks for ``execution: {batch_cells: true}``
        and the probe sets ``batched = True``. Must return one Dataset per context, equal
        (to floating-point tolerance) to what :meth:`run` returns for it. The default loops.
        """
        return [self.run(ctx, params) for ctx in ctxs]

    def run(self, ctx, params: dict[str, Any]):
        """Measure one cell; return an ``xarray.Dataset``."""
        raise NotImplementedError(f"probe {self.name!r} does not implement run()")
