"""Synthetic chest CT with exact nodule ground truth, and nodule insertion into real CT.

``make_phantom`` builds a CT (body, ribs, spine, sternum, mediastinum and
heart, textured lungs, tapering vessel tree, airways), places solid,
part-solid and ground-glass nodules (round, lobulated, spiculated; isolated,
juxta-vascular, juxta-pleural), applies scanner blur, noise and FOV padding,
and returns a :class:`Phantom` (CT, instance labels, nodule list). A seed
fixes every byte. ``insert_nodules`` pastes synthetic or real (LIDC crop)
nodules into a real scan with the same ground truth.
"""

from glance.phantom.generate import PhantomConfig, make_example_phantom, make_phantom
from glance.phantom.groundtruth import Phantom, PhantomNodule
from glance.phantom.placement import NoduleMix
from glance.phantom.scanner import ScannerConfig

__all__ = ["NoduleMix", "Phantom", "PhantomConfig", "PhantomNodule", "ScannerConfig",
           "make_example_phantom", "make_phantom"]
