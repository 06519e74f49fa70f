"""VTK 4x4 matrices <-> numpy and a volume node's IJK-to-RAS matrix: MRML geometry both modules' logic needs.

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
