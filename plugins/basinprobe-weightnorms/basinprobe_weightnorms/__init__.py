"""An example basinprobe plugin: per-layer weight norms and distance from initialization.

Everything a plugin needs comes from ``basinprobe.registry``: the ``hookimpl``
marker and the ``Probe`` base class. The ``ctx`` passed to ``run`` is described
in ``basinprobe.registry.context``.
"""

import torch
import xarray as xr

from basinprobe.registry import Probe, hookimpl


class WeightNorms(Probe):
    """‖W_l‖_F for every parameter tensor W_l, and ‖W_l − W_l(0)‖_F from the initialization."""

    name = "weight_norms"
    description = "per-layer Frobenius norms and distance from initialization"
    schema = {
        "type": "object",
        "properties": {
            "relative": {"type": "boolean", "default": False,
                         "description": "also store the distance divided by the norm at initialization"},
        },
        "additionalProperties": False,
    }

    def run(self, ctx, params):
        now = ctx.params
        init = ctx.unflatten(ctx.init_params)
        layers = list(ctx.param_names)
        norms = [float(torch.linalg.vector_norm(now[k])) for k in layers]
        distances = [float(torch.linalg.vector_norm(now[k] - init[k])) for k in layers]
        data = {
            "norm": ("layer", norms, {"description": "Frobenius norm of the parameter tensor"}),
            "distance_from_init": ("layer", distances,
                                   {"description": "Frobenius norm of the change since initialization"}),
        }
        if params["relative"]:
            init_norms = [float(torch.linalg.vector_norm(init[k])) for k in layers]
            data["relative_distance"] = ("layer", [d / n if n > 0 else float("nan") for d, n in zip(distances, init_norms)],
                                         {"description": "distance_from_init / norm at initialization",
                                          "nan_means": "the tensor was zero at initialization"})
        return xr.Dataset(data, coords={"layer": layers})


@hookimpl
def basinprobe_probes():
    return [WeightNorms]
