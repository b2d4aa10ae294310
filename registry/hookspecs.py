"""The whole plugin contract of basinprobe: four hooks.

A plugin is any module (or object) with functions marked ``@hookimpl`` whose
names are the hooks below. A distribution publishes it through an entry point
in group ``basinprobe``::

    [project.entry-points.basinprobe]
    weightnorms = "basinprobe_weightnorms"

Each hook is called once per plugin when the plugin manager loads. Names must
be unique across all installed plugins: two plugins claiming one name is an
error that names both distributions.
"""

import pluggy

PROJECT = "basinprobe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def basinprobe_probes():
    """Return a list of :class:`basinprobe.registry.Probe` subclasses."""


@hookspec
def basinprobe_models():
    """Return ``{kind: factory}``; ``factory(**with_) -> torch.nn.Module``.

    Decorate the factory with :func:`basinprobe.registry.with_schema` to give
    its ``with:`` block a JSON Schema (validated before anything runs).
    """


@hookspec
def basinprobe_datasets():
    """Return ``{kind: factory}``; ``factory(seed=int, **with_) -> Dataset``."""


@hookspec
def basinprobe_losses():
    """Return ``{name: loss_fn}``; ``loss_fn(outputs, targets) -> scalar`` (mean over the batch)."""
