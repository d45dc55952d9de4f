"""A small CT-like volume and a box labelmap, built in memory for the module's self-test.

Plain MRML and VTK calls only, so the same volume can be built in the Slicer application
and with the `slicer-core` package.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

__all__ = ["SYNTHETIC_SPACING_MM", "synthetic_ct_array", "add_synthetic_ct", "box_labelmap"]

# (column, row, slice) spacing of the synthetic volume, in mm.
SYNTHETIC_SPACING_MM = (2.5, 2.5, 4.0)


def synthetic_ct_array(slices: int = 40, rows: int = 128, columns: int = 128) -> np.ndarray:
    """Return an int16 (slice, row, column) array of Hounsfield units that looks like an abdomen.

    With an identity IJK-to-RAS direction, columns run towards the patient's right and rows
    towards the front. The volume contains air (-1000 HU) outside an elliptic body of soft
    tissue (40 HU). Inside the body are a liver-like region on the patient's right (60 HU)
    with a darker lesion (20 HU) and a bony spine at the back (400 HU).
    """
    z, y, x = np.mgrid[0:slices, 0:rows, 0:columns].astype(np.float32)
    centre_x, centre_y = (columns - 1) / 2.0, (rows - 1) / 2.0
    voxels = np.full((slices, rows, columns), -1000.0, dtype=np.float32)
    body = ((x - centre_x) / (0.44 * columns)) ** 2 + ((y - centre_y) / (0.33 * rows)) ** 2 <= 1
    voxels[body] = 40.0
    liver_x, liver_y, liver_z = centre_x + 0.19 * columns, centre_y + 0.08 * rows, slices * 0.55
    liver = (((x - liver_x) / (0.19 * columns)) ** 2 + ((y - liver_y) / (0.17 * rows)) ** 2
             + ((z - liver_z) / (0.4 * slices)) ** 2) <= 1
    voxels[liver & body] = 60.0
    lesion = (((x - liver_x) / 6) ** 2 + ((y - liver_y) / 6) ** 2
              + ((z - liver_z) / 3) ** 2) <= 1
    voxels[lesion] = 20.0
    spine = ((x - centre_x) / 8) ** 2 + ((y - (centre_y - 0.22 * rows)) / 8) ** 2 <= 1
    voxels[spine] = 400.0
    return voxels.astype(np.int16)


def add_synthetic_ct(scene, name: str = "Synthetic CT"):
    """Add a scalar volume node holding `synthetic_ct_array()` to `scene` and return it."""
    voxels = synthetic_ct_array()
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(voxels.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*SYNTHETIC_SPACING_MM)
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def box_labelmap(volume_node, box_kji: tuple[slice, slice, slice]):
    """Return a 0/1 `vtkOrientedImageData` on the volume's grid with `box_kji` set to 1."""
    dimensions = volume_node.GetImageData().GetDimensions()
    mask = np.zeros((dimensions[2], dimensions[1], dimensions[0]), dtype=np.uint8)
    mask[box_kji] = 1
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(volume_node.GetImageData().GetExtent())
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    labelmap.SetImageToWorldMatrix(ijk_to_ras)
    labelmap.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(mask.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    return labelmap
