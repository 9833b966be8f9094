"""User-facing errors.

Anything a user can cause (bad input, missing model, wrong flag) is raised as
:class:`GlanceError`; the CLI prints its message as one line and exits non-zero.
Any other exception is a bug in GLANCE.
"""


class GlanceError(Exception):
    """An error caused by the input or the environment, reported as one line."""

    exit_code = 2


class InputError(GlanceError):
    """The input image or folder cannot be used (unreadable, not a CT, bad geometry)."""


class ModelError(GlanceError):
    """A model file or card is missing, inconsistent or unsafe to load."""


class Cancelled(GlanceError):
    """The user cancelled a running job (Ctrl-C in the terminal, Cancel in Slicer)."""

    exit_code = 130
