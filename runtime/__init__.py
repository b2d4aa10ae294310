"""basinprobe.runtime: spec -> plan -> execution -> store; the CLI; the numerical substrate."""


def open_results(path):
    """The store at ``path`` as an ``xarray.DataTree``."""
    from basinprobe.runtime.results import open_results as _open

    return _open(path)


__all__ = ["open_results"]
