"""The runtime's own models, datasets and losses, registered through the public hooks."""

from basinprobe.registry import hookimpl
from basinprobe.runtime.datasets import DATASETS
from basinprobe.runtime.losses import LOSSES
from basinprobe.runtime.models import MODELS


@hookimpl
def basinprobe_models():
    return MODELS


@hookimpl
def basinprobe_datasets():
    return DATASETS


@hookimpl
def basinprobe_losses():
    return LOSSES
