"""The GLANCE network (paper Methods, Algorithms 1-3, eq. 3-8) with its config and weights I/O."""

from glance.model.config import ABLATIONS, PRESETS, GlanceConfig, config_for

_NETWORK = ("GlanceNet", "GlanceOutput", "build_model")
__all__ = ["ABLATIONS", "PRESETS", "GlanceConfig", "config_for", *_NETWORK]


def __getattr__(name: str):
    # The network (and torch) loads only when asked for: reading model cards, listing models
    # and the Slicer module's start-up must not pay for torch.
    if name in _NETWORK:
        from glance.model import glance

        return getattr(glance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
