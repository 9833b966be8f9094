"""The GLANCE network (paper Methods, Algorithms 1-3, eq. 3-8) with its config and weights I/O."""

from glance.model.config import ABLATIONS, PRESETS, GlanceConfig, config_for
from glance.model.glance import GlanceNet, GlanceOutput, build_model

__all__ = ["ABLATIONS", "PRESETS", "GlanceConfig", "GlanceNet", "GlanceOutput", "build_model", "config_for"]
