"""Write a Volume or a label map on a Volume's grid as NRRD / NIfTI / MHA, atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from glance.errors import GlanceError
from glance.io.atomic import atomic_path
from glance.volume import Volume

# Single-file formats only: .nhdr/.mhd write a second data file that could not be
# replaced in the same atomic step.
WRITE_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


def to_sitk(array: np.ndarray, grid: Volume) -> sitk.Image:
    """``array`` (k, j, i) as a SimpleITK image with ``grid``'s LPS geometry."""
    if tuple(array.shape) != tuple(grid.array.shape):
        raise ValueError(f"array shape {array.shape} does not match the grid {grid.array.shape}")
    if array.dtype == np.bool_:
        array = array.view(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction.reshape(-1).tolist())  # row-major; columns are the axes
    return image


def write_image(image: Volume | tuple[np.ndarray, Volume], path: str | Path, compress: bool = True) -> Path:
    """Write a Volume, or ``(array, grid_volume)`` such as a label map, to ``path`` atomically."""
    array, grid = (image.array, image) if isinstance(image, Volume) else image
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"{path}: unsupported output format (use {', '.join(WRITE_SUFFIXES)})")
    itk_image = to_sitk(array, grid)
    with atomic_path(path) as temp:
        try:
            sitk.WriteImage(itk_image, str(temp), useCompression=compress)
        except RuntimeError as err:
            raise GlanceError(f"{path}: cannot write the image ({str(err).strip().splitlines()[-1]})") from err
    return path
