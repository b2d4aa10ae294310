"""Errors a plugin may raise to speak to the user."""


class ProbeError(Exception):
    """A probe could not measure this cell; the message tells the user what to change.

    The runtime records the cell as failed with this message; other cells go on.
    """


class PluginError(Exception):
    """Installed plugins conflict or could not be loaded."""
