"""GLANCE engine: lung-nodule segmentation and detection on chest CT.

The engine never imports Slicer or Qt at module level; heavy packages (torch,
highdicom, slicer-core) are imported by the modules that need them, so
``import glance`` stays cheap inside Slicer's module loader.
"""

__version__ = "0.1.0"
