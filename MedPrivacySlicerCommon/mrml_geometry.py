"""MRML geometry the modules' logic shares: VTK 4x4 matrices <-> numpy, a volume node's IJK-to-RAS matrix, and
voxel grids between MRML volume nodes (RAS) and SimpleITK images (LPS).

Needs ``vtk`` (MRML), not Qt, so the logic that uses it runs under slicer-core.
"""

from __future__ import annotations

import numpy as np
import vtk


def matrix_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_array(matrix)


#: SimpleITK works in LPS, MRML in RAS: the two frames differ by a sign flip of the first two axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def copy_volume_geometry(volume_node, image):
    """Give the SimpleITK ``image`` the volume node's voxel grid (spacing, LPS origin and direction); return it."""
    directions = [[0.0] * 3 for _ in range(3)]
    volume_node.GetIJKToRASDirections(directions)  # columns are the i, j, k axis directions in RAS
    # Voxel (0,0,0) of the image data is at IJK = extent start, which is not always zero.
    extent = volume_node.GetImageData().GetExtent()
    first_voxel_ras = ijk_to_ras(volume_node) @ np.array([extent[0], extent[2], extent[4], 1.0])
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    image.SetOrigin(tuple(LPS_TO_RAS @ first_voxel_ras[:3]))
    image.SetDirection(tuple((LPS_TO_RAS @ np.array(directions, dtype=float)).ravel()))
    return image


def geometry_3d(image):
    """(spacing, origin, direction) of a 2D or 3D SimpleITK image as 3D numpy arrays in LPS."""
    dimension = image.GetDimension()
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    spacing[:dimension] = image.GetSpacing()
    origin[:dimension] = image.GetOrigin()
    direction[:dimension, :dimension] = np.array(image.GetDirection()).reshape(dimension, dimension)
    return spacing, origin, direction
