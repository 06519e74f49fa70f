"""MixupPrivacy: segment brain tissues on a remote server that only ever receives mixed, unreadable patches.

Layout (DESIGN.md, "Slicer facts that matter here"):
- ``MixupPrivacyLogic`` and ``MixupPrivacyTestMixin`` only need ``slicer`` (MRML) and ``vtk``, so they import and run
  under PyPI's ``slicer-core`` where there is no Qt and no ``slicer.ScriptedLoadableModule``.
- The module, widget and in-app test classes need the application and are defined only when Qt is importable.
- Heavy parts of the core package (torch, MONAI, the HTTP client) are imported inside functions, so that Slicer can
  list and open the module before the dependencies are installed.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

# In a source checkout added to Slicer's module paths, the core package sits next to this module's folder; the
# packaged extension installs it into site-packages instead, where this lookup is never needed.
try:
    import medprivacy  # noqa: F401
except ImportError:
    _source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(_source_root, "medprivacy", "__init__.py")):
        sys.path.insert(0, _source_root)

from medprivacy.errors import CancelledError, InputError, MedPrivacyError
from medprivacy.labels import TISSUE_SEGMENTS

try:
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    _HAVE_APP = True
except ImportError:  # slicer-core: no Qt, Logic and test bodies only
    _HAVE_APP = False

DEFAULT_SERVER_URL = "http://127.0.0.1:8765"
UNMIX_MODES = ("learned", "naive")

# SimpleITK works in LPS, MRML in RAS: the two frames differ by a sign flip of the first two axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Fixed segment IDs let a second run on the same output node replace its own segments and nothing else.
_SEGMENT_IDS = {label: "MixupPrivacy_" + name.replace(" ", "_") for label, (name, _color) in TISSUE_SEGMENTS.items()}

#: Core dependencies Slicer does not ship (keep in sync with pyproject.toml). torch comes from the PyTorch
#: extension instead, and SimpleITK/requests/numpy must not be replaced because Slicer's own builds are used.
PIP_REQUIREMENTS = "monai>=1.3 safetensors>=0.4 cryptography>=41 tqdm>=4.60"
_PIP_IMPORT_NAMES = ("monai", "safetensors", "cryptography", "tqdm")


def _sitk():
    # Imported on use: SimpleITK is a large extension module and only needed once a volume is converted.
    import SimpleITK

    return SimpleITK


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _numpy_matrix(matrix)


def _copy_volume_geometry(volume_node, image):
    """Give the SimpleITK ``image`` the volume node's voxel grid (spacing, LPS origin and direction); return it."""
    directions = [[0.0] * 3 for _ in range(3)]
    volume_node.GetIJKToRASDirections(directions)  # columns are the i, j, k axis directions in RAS
    # Voxel (0,0,0) of the image data is at IJK = extent start, which is not always zero.
    extent = volume_node.GetImageData().GetExtent()
    first_voxel_ras = _ijk_to_ras(volume_node) @ np.array([extent[0], extent[2], extent[4], 1.0])
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    image.SetOrigin(tuple(_LPS_TO_RAS @ first_voxel_ras[:3]))
    image.SetDirection(tuple((_LPS_TO_RAS @ np.array(directions, dtype=float)).ravel()))
    return image


def _node_label(node) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "the selected volume"


#
# Logic
#


class MixupPrivacyLogic:
    """MRML nodes <-> SimpleITK images and calls into the ``medprivacy`` core.

    Everything here takes its scene from the constructor (never ``slicer.mrmlScene``), so it runs the same in the
    application and on slicer-core. ``compute`` touches no MRML and no shared state and may run in a worker thread;
    all other methods create or read MRML nodes and belong on the main thread.
    """

    def __init__(self, scene=None) -> None:
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise ValueError("MixupPrivacyLogic needs an MRML scene outside the Slicer application")
        self.scene = scene
        #: The last ``PrivateSegmentation`` put into the scene (its ``stats`` say what was sent), and the volume
        #: node of what the server received when ``show_uploaded`` was asked for.
        self.last_result = None
        self.last_uploaded_node = None

    # -- volumes -------------------------------------------------------------------------------------------

    def volume_node_to_sitk(self, volume_node):
        """Voxels and exact geometry of a 3D scalar volume node as a SimpleITK image (LPS, like files on disk).

        The node's parent transform is deliberately not applied: results come back on the same voxel grid and are
        placed under the same transform (see ``apply_result``).
        """
        sitk = _sitk()
        self._check_scalar_3d(volume_node)
        image_data = volume_node.GetImageData()
        dims = image_data.GetDimensions()
        # VTK stores x fastest; numpy's C order then reads (k, j, i), which is also SimpleITK's array order.
        voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
        image = sitk.GetImageFromArray(np.array(voxels, copy=True))

        _copy_volume_geometry(volume_node, image)
        return image

    def sitk_to_volume_node(self, image, name: str):
        """A new scalar volume node in the scene holding ``image`` (2D images become a single slice)."""
        sitk = _sitk()
        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
            raise InputError(f"cannot show {name!r}: only 2D or 3D single-channel images can be shown")
        voxels = sitk.GetArrayFromImage(image)
        spacing, origin_lps, direction_lps = self._geometry_3d(image)
        if voxels.ndim == 2:
            voxels = voxels[np.newaxis]
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
        image_data.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).ravel(), deep=True)
        )
        node.SetAndObserveImageData(image_data)
        node.SetSpacing(*spacing)
        node.SetOrigin(*(_LPS_TO_RAS @ origin_lps))
        direction_matrix = np.eye(4)
        direction_matrix[:3, :3] = _LPS_TO_RAS @ direction_lps
        node.SetIJKToRASDirectionMatrix(_vtk_matrix(direction_matrix))
        node.CreateDefaultDisplayNodes()
        return node

    # -- segmentations -------------------------------------------------------------------------------------

    def labelmap_to_segmentation(self, labelmap, reference_volume_node, segmentation_node=None):
        """Tissue labelmap (0 background, then ``medprivacy.labels``) -> segmentation node with exactly the tissue
        segments, named and coloured from ``TISSUE_SEGMENTS``, on the reference volume's geometry.

        Segments already in ``segmentation_node`` that this module did not create are kept.
        """
        self._check_scalar_3d(reference_volume_node)
        self._check_same_grid(labelmap, reference_volume_node)
        sitk = _sitk()
        labels = sitk.GetArrayFromImage(labelmap)
        unexpected = sorted(set(np.unique(labels).tolist()) - set(TISSUE_SEGMENTS) - {0})
        if unexpected:
            raise InputError(f"labelmap has unknown label values {unexpected}; expected 0 and {sorted(TISSUE_SEGMENTS)}")

        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{reference_volume_node.GetName()} tissues"
            )
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        segmentation = segmentation_node.GetSegmentation()

        # The oriented-image import maps label value v to the (v-1)-th ID, so IDs must cover 1..max label in order.
        max_label = max(TISSUE_SEGMENTS)
        segment_ids = vtk.vtkStringArray()
        for label in range(1, max_label + 1):
            segment_id = _SEGMENT_IDS.get(label, f"MixupPrivacy_unused_{label}")
            if segmentation.GetSegment(segment_id) is not None:
                segmentation.RemoveSegment(segment_id)
            segment_ids.InsertNextValue(segment_id)
        # Segments are created first so that tissues absent from this scan still appear, empty, with their colour.
        for label, (name, color) in sorted(TISSUE_SEGMENTS.items()):
            segmentation.AddEmptySegment(_SEGMENT_IDS[label], name, list(color))

        oriented = slicer.vtkOrientedImageData()
        oriented.SetExtent(reference_volume_node.GetImageData().GetExtent())
        oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = labels.astype(np.uint8).ravel()
        oriented.SetImageToWorldMatrix(_vtk_matrix(_ijk_to_ras(reference_volume_node)))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            oriented, segmentation_node, segment_ids
        ):
            raise MedPrivacyError("could not import the tissue labelmap into the segmentation node")
        for label in range(1, max_label + 1):
            if label not in TISSUE_SEGMENTS:
                segmentation.RemoveSegment(segment_ids.GetValue(label - 1))

        segmentation_node.CreateDefaultDisplayNodes()
        display_node = segmentation_node.GetDisplayNode()
        display_node.SetVisibility(True)
        display_node.SetVisibility2DFill(True)
        display_node.SetVisibility2DOutline(True)
        return segmentation_node

    def segmentation_to_labelmap_array(self, segmentation_node, reference_volume_node) -> np.ndarray:
        """(k, j, i) uint8 array of the tissue segments on the reference volume's voxel grid, with the original
        label values (not ``ExportAllSegmentsToLabelmapNode``'s renumbering 1..n in segment order)."""
        segment_ids = vtk.vtkStringArray()
        label_values = vtk.vtkIntArray()
        segmentation = segmentation_node.GetSegmentation()
        for label, (name, _color) in sorted(TISSUE_SEGMENTS.items()):
            segment_id = segmentation.GetSegmentIdBySegmentName(name)
            if segment_id:
                segment_ids.InsertNextValue(segment_id)
                label_values.InsertNextValue(label)
        extent = reference_volume_node.GetImageData().GetExtent()
        dims = reference_volume_node.GetImageData().GetDimensions()
        geometry = slicer.vtkOrientedImageData()
        geometry.SetExtent(extent)
        geometry.SetImageToWorldMatrix(_vtk_matrix(_ijk_to_ras(reference_volume_node)))
        merged = slicer.vtkOrientedImageData()
        if not segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, segment_ids, label_values
        ):
            raise MedPrivacyError("could not export the segmentation as a labelmap")
        if merged.GetExtent() != extent:
            raise MedPrivacyError("exported labelmap does not match the reference volume's grid")
        voxels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(dims[::-1])
        return voxels.astype(np.uint8)

    # -- remote work (no MRML) ---------------------------------------------------------------------------------

    def test_connection(self, url: str, token: str | None = None, ca_bundle: str | None = None) -> str:
        """One-line description of the server at ``url``; raises ServerError/AuthError with a one-line cause."""
        from medprivacy.transport import InferenceClient

        return InferenceClient(url, token=token or None, ca_bundle=ca_bundle or None).check_connection()

    def generate_key(self, key_dir, progress: Callable[[str, float | None], None] | None = None, force: bool = False,
                     **options):
        """Create this installation's private reference bank (the mixing key) in ``key_dir``; ``force`` replaces an
        existing key, ``options`` go to ``generate_bank`` (e.g. a smaller bank for tests)."""
        from medprivacy.mixup.bank import generate_bank

        return generate_bank(key_dir, force=force, progress=progress, **options)

    def compute(
        self,
        input_sitk,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int = 8,
        unmix: str = "learned",
        keep_uploaded: bool = False,
        progress: Callable[[str, float | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        seed: int | None = None,
    ):
        """Private segmentation of a SimpleITK image; thread-safe (builds its own client, touches no MRML)."""
        from medprivacy.mixup.bank import ReferenceBank, default_key_dir
        from medprivacy.mixup.pipeline import segment_private
        from medprivacy.transport import InferenceClient

        if unmix not in UNMIX_MODES:
            raise InputError(f"unmixing mode must be one of {', '.join(UNMIX_MODES)}, not {unmix!r}")
        bank = ReferenceBank.load(key_dir or default_key_dir())
        client = InferenceClient(url, token=token or None, ca_bundle=ca_bundle or None)
        return segment_private(
            input_sitk,
            client,
            bank,
            tta=int(tta),
            unmix=unmix,
            seed=seed,
            keep_uploaded=keep_uploaded,
            progress=progress,
            cancel=cancel,
        )

    def apply_result(self, result, input_node, output_segmentation_node=None, show_uploaded: bool = False):
        """Put a ``PrivateSegmentation`` into the scene (main thread): tissue segments on the input's geometry, and
        optionally a volume with exactly what the server received."""
        segmentation_node = self.labelmap_to_segmentation(result.labelmap, input_node, output_segmentation_node)
        self.last_result = result
        self.last_uploaded_node = None
        if show_uploaded and getattr(result, "uploaded", None) is not None:
            self.last_uploaded_node = self.sitk_to_volume_node(
                result.uploaded, f"{input_node.GetName()} - sent to server"
            )
        return segmentation_node

    def run(
        self,
        input_node,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int = 8,
        unmix: str = "learned",
        output_segmentation_node=None,
        show_uploaded: bool = False,
        progress: Callable[[str, float | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        seed: int | None = None,
    ):
        """``compute`` + ``apply_result`` in the calling thread, for scripts and tests."""
        image = self.volume_node_to_sitk(input_node)
        result = self.compute(
            image, url, token=token, ca_bundle=ca_bundle, key_dir=key_dir, tta=tta, unmix=unmix,
            keep_uploaded=show_uploaded, progress=progress, cancel=cancel, seed=seed,
        )
        return self.apply_result(result, input_node, output_segmentation_node, show_uploaded=show_uploaded)

    # -- checks --------------------------------------------------------------------------------------------

    @staticmethod
    def _check_scalar_3d(volume_node) -> None:
        if volume_node is None:
            raise InputError("no input volume selected: choose a 3D MRI volume")
        label = _node_label(volume_node)
        # Vector, tensor and diffusion volumes derive from the scalar class, hence the explicit exclusions.
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLTensorVolumeNode"):
            raise InputError(f"{label} is a {volume_node.GetClassName()}: choose a single-channel (scalar) 3D MRI volume")
        if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{label} is a labelmap: choose the MRI scan itself")
        image_data = volume_node.GetImageData()
        if image_data is None or image_data.GetPointData().GetScalars() is None:
            raise InputError(f"{label} has no voxels: load the image again")
        if image_data.GetNumberOfScalarComponents() != 1:
            raise InputError(
                f"{label} has {image_data.GetNumberOfScalarComponents()} components per voxel: "
                "choose a single-channel (scalar) 3D MRI volume"
            )
        dims = image_data.GetDimensions()
        if min(dims) < 2:
            raise InputError(f"{label} is 2D ({dims[0]}x{dims[1]}x{dims[2]} voxels): choose a 3D MRI volume")

    def _check_same_grid(self, image, reference_volume_node) -> None:
        sitk = _sitk()
        reference = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # geometry carrier only
        reference_dims = reference_volume_node.GetImageData().GetDimensions()
        if image.GetDimension() != 3 or tuple(image.GetSize()) != tuple(reference_dims):
            raise InputError(
                f"labelmap size {tuple(image.GetSize())} differs from volume {_node_label(reference_volume_node)} "
                f"size {tuple(reference_dims)}"
            )
        geometry = _copy_volume_geometry(reference_volume_node, reference)
        # Tolerances relative to the voxel size: file round trips (NIfTI float32 headers) lose ~1e-6 mm.
        tolerance = 1e-4 * min(geometry.GetSpacing())
        same = (
            np.allclose(image.GetSpacing(), geometry.GetSpacing(), rtol=0, atol=tolerance)
            and np.allclose(image.GetOrigin(), geometry.GetOrigin(), rtol=0, atol=tolerance)
            and np.allclose(image.GetDirection(), geometry.GetDirection(), rtol=0, atol=1e-4)
        )
        if not same:
            raise InputError(
                f"labelmap is not on the voxel grid of {_node_label(reference_volume_node)} "
                "(spacing, origin or orientation differ)"
            )

    @staticmethod
    def _geometry_3d(image):
        """(spacing, origin, direction) of a 2D or 3D SimpleITK image as 3D numpy arrays in LPS."""
        dimension = image.GetDimension()
        spacing = np.ones(3)
        origin = np.zeros(3)
        direction = np.eye(3)
        spacing[:dimension] = image.GetSpacing()
        origin[:dimension] = image.GetOrigin()
        direction[:dimension, :dimension] = np.array(image.GetDirection()).reshape(dimension, dimension)
        return spacing, origin, direction


#
# Test bodies, shared by the in-application test and pytest on slicer-core
#


class MixupPrivacyTestMixin:
    """Test bodies that take the scene to work in; the host class must be a ``unittest.TestCase``.

    No method name here contains "test": ``ScriptedLoadableModuleTest`` runs every such method, and these need a
    scene argument. Volumes are synthetic but carry an oblique direction, anisotropic spacing and a non-zero origin,
    which is what breaks naive conversions.
    """

    #: Rotation about an oblique axis, so every direction cosine is non-trivial.
    OBLIQUE_DIRECTION_RAS = (
        (0.8660254037844387, -0.25, 0.4330127018922193),
        (0.25, 0.9665063509461097, 0.05801270189221941),
        (-0.4330127018922193, 0.05801270189221941, 0.8995190528383291),
    )
    SPACING = (0.9, 1.1, 2.5)
    ORIGIN_RAS = (-90.5, 112.25, -71.75)

    def make_oblique_volume(self, scene, shape=(7, 9, 11), dtype=np.int16, name="oblique"):
        """Scalar volume node of (k, j, i) ``shape`` with distinct voxel values and oblique geometry."""
        logic = MixupPrivacyLogic(scene)
        sitk = _sitk()
        voxels = (np.arange(int(np.prod(shape))) % 1000 - 300).astype(dtype).reshape(shape)
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing(self.SPACING)
        image.SetOrigin(tuple(_LPS_TO_RAS @ np.array(self.ORIGIN_RAS)))
        image.SetDirection(tuple((_LPS_TO_RAS @ np.array(self.OBLIQUE_DIRECTION_RAS)).ravel()))
        return logic.sitk_to_volume_node(image, name), voxels

    def check_volume_round_trip(self, scene):
        sitk = _sitk()
        logic = MixupPrivacyLogic(scene)
        node, voxels = self.make_oblique_volume(scene)

        # The node holds what was asked for, in RAS...
        self.assertEqual(node.GetImageData().GetDimensions(), voxels.shape[::-1])
        np.testing.assert_allclose(node.GetSpacing(), self.SPACING, rtol=0, atol=1e-12)
        np.testing.assert_allclose(node.GetOrigin(), self.ORIGIN_RAS, rtol=0, atol=1e-12)
        directions = [[0.0] * 3 for _ in range(3)]
        node.GetIJKToRASDirections(directions)
        np.testing.assert_allclose(directions, self.OBLIQUE_DIRECTION_RAS, rtol=0, atol=1e-12)

        # ...and comes back as the same image, geometry included.
        image = logic.volume_node_to_sitk(node)
        self.assertEqual(image.GetSize(), voxels.shape[::-1])
        self.assertEqual(image.GetPixelID(), sitk.sitkInt16)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), voxels)
        np.testing.assert_allclose(image.GetSpacing(), self.SPACING, rtol=0, atol=1e-12)
        np.testing.assert_allclose(image.GetOrigin(), _LPS_TO_RAS @ np.array(self.ORIGIN_RAS), rtol=0, atol=1e-12)

        # Independent check through MRML's own IJK->RAS matrix: every corner voxel lands on the same point.
        ijk_to_ras = _ijk_to_ras(node)
        for index in [(0, 0, 0), (10, 0, 0), (0, 8, 0), (0, 0, 6), (10, 8, 6)]:
            ras = (ijk_to_ras @ np.array(index + (1,)))[:3]
            lps = np.array(image.TransformIndexToPhysicalPoint(index))
            np.testing.assert_allclose(_LPS_TO_RAS @ lps, ras, rtol=0, atol=1e-9)

        # A second trip through a new node is lossless too.
        again = logic.volume_node_to_sitk(logic.sitk_to_volume_node(image, "again"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(again), voxels)
        self.assertEqual(again.GetSpacing(), image.GetSpacing())
        self.assertEqual(again.GetOrigin(), image.GetOrigin())
        self.assertEqual(again.GetDirection(), image.GetDirection())

    def check_labelmap_to_segmentation(self, scene):
        sitk = _sitk()
        logic = MixupPrivacyLogic(scene)
        node, voxels = self.make_oblique_volume(scene)
        image = logic.volume_node_to_sitk(node)

        labels = np.zeros(voxels.shape, dtype=np.uint8)
        labels[1:6, 2:7, 2:9] = 3  # white matter inside,
        labels[1:6, 2:7, 2] = 2  # gray matter along one face,
        labels[3, 4, 9] = 1  # one CSF voxel, and label 2 also in a separate island:
        labels[6, 8, 10] = 2
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(image)

        segmentation_node = logic.labelmap_to_segmentation(labelmap, node)
        segmentation = segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(TISSUE_SEGMENTS))
        for label, (name, color) in TISSUE_SEGMENTS.items():
            segment_id = segmentation.GetSegmentIdBySegmentName(name)
            self.assertTrue(segment_id, f"segment {name!r} missing")
            np.testing.assert_allclose(segmentation.GetSegment(segment_id).GetColor(), color, rtol=0, atol=1e-6)
        display_node = segmentation_node.GetDisplayNode()
        self.assertIsNotNone(display_node)
        self.assertTrue(display_node.GetVisibility())
        self.assertIs(segmentation_node.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()), node)

        # Back to an array on the volume grid: same values, same voxels.
        np.testing.assert_array_equal(logic.segmentation_to_labelmap_array(segmentation_node, node), labels)

        # Running again on the same node replaces the module's segments instead of adding more.
        labels[labels == 1] = 0  # CSF absent this time: its segment stays, empty
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(image)
        self.assertIs(logic.labelmap_to_segmentation(labelmap, node, segmentation_node), segmentation_node)
        self.assertEqual(segmentation.GetNumberOfSegments(), len(TISSUE_SEGMENTS))
        np.testing.assert_array_equal(logic.segmentation_to_labelmap_array(segmentation_node, node), labels)

        # A labelmap on another grid is refused instead of being silently misplaced.
        shifted = sitk.GetImageFromArray(labels)
        shifted.CopyInformation(image)
        shifted.SetOrigin(tuple(np.array(image.GetOrigin()) + 1.0))
        with self.assertRaises(InputError):
            logic.labelmap_to_segmentation(shifted, node)

    def check_rejects_unusable_volumes(self, scene):
        logic = MixupPrivacyLogic(scene)
        single_slice, _voxels = self.make_oblique_volume(scene, shape=(1, 9, 11), name="single slice")
        vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(5, 5, 5)
        image_data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
        vector.SetAndObserveImageData(image_data)
        empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        labelmap.SetAndObserveImageData(vtk.vtkImageData())
        for node, reason in [(single_slice, "2D"), (vector, "scalar"), (empty, "no voxels"), (labelmap, "labelmap"),
                             (None, "no input volume")]:
            with self.assertRaises(InputError) as raised:
                logic.volume_node_to_sitk(node)
            message = str(raised.exception)
            self.assertIn(reason, message)
            self.assertNotIn("\n", message)

    def check_private_segmentation_end_to_end(self, scene, url, key_dir, audit_dir=None, token=None, ca_bundle=None,
                                              unmix="naive", image=None):
        """Key generation, then ``run`` against a real server, from a volume node to tissue segments.

        ``image`` defaults to the real MNI152 T1 (it lies on the model grid, so no registration slows the test).
        With ``audit_dir`` (the server's ``--audit-dir``) also checks that the server received exactly the mixed
        patches and never the target's.
        """
        from medprivacy.mixup.intensity import quantize_uint8
        from medprivacy.mixup.model_space import analysis_mask
        from medprivacy.mixup.pipeline import prepare_scan
        from medprivacy.transport import InferenceClient

        sitk = _sitk()
        logic = MixupPrivacyLogic(scene)
        server_model = InferenceClient(url, token=token, ca_bundle=ca_bundle).info()["models"]["mixup-seg"]
        patch_size = tuple(server_model["patch_size"])
        # A small key: one synthetic reference brain, few patches; same code path as the default key.
        bank = logic.generate_key(key_dir, subjects=1, patches=64, patch_size=patch_size)
        self.assertEqual(tuple(bank.patch_size), patch_size)
        if image is None:
            from medprivacy.data.template import load_template

            image = load_template().image
        node = logic.sitk_to_volume_node(image, "brain T1")
        audited_before = set(Path(audit_dir).glob("*.npy")) if audit_dir is not None else set()

        stages = []
        segmentation_node = logic.run(node, url, token=token, ca_bundle=ca_bundle, key_dir=key_dir, tta=2, unmix=unmix,
                                      show_uploaded=True, seed=0, progress=lambda stage, fraction=None: stages.append(stage))
        result = logic.last_result
        self.assertTrue(stages, "no progress was reported")

        # Exactly the three tissue segments, on the input's geometry, holding exactly the pipeline's labels.
        segmentation = segmentation_node.GetSegmentation()
        self.assertEqual(sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())),
                         sorted(name for name, _color in TISSUE_SEGMENTS.values()))
        self.assertIs(segmentation_node.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()), node)
        labels = logic.segmentation_to_labelmap_array(segmentation_node, node)
        self.assertEqual(labels.shape, sitk.GetArrayViewFromImage(image).shape)
        np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(result.labelmap))
        self.assertTrue(set(np.unique(labels).tolist()) <= {0} | set(TISSUE_SEGMENTS))
        self.assertEqual(result.stats["patches_sent"], 2 * result.stats["patches"])

        # "Show what is sent" shows mixed data, far from the scan itself.
        self.assertIsNotNone(logic.last_uploaded_node)
        target = prepare_scan(image, patch_size)
        uploaded = logic.volume_node_to_sitk(logic.last_uploaded_node)
        mask = analysis_mask()
        difference = np.abs(sitk.GetArrayViewFromImage(uploaded)[mask] - target.volume[mask]).mean()
        self.assertGreater(difference, 0.05, "the uploaded volume is nearly the scan itself")

        if audit_dir is None:
            return
        received = sorted(set(Path(audit_dir).glob("*.npy")) - audited_before)
        self.assertTrue(received, "the server's audit folder got nothing")
        self.assertTrue(all(path.name.endswith("-mixup.npy") for path in received), [path.name for path in received])
        rows = np.concatenate([np.load(path).reshape(-1, int(np.prod(patch_size))) for path in received])
        self.assertEqual(len(rows), result.stats["patches_sent"])
        # The wire sends uint8 codes; compare in that form so an unmixed patch would match bit for bit.
        target_codes = np.round(quantize_uint8(target.patches) * 255).astype(np.uint8).reshape(len(target.patches), -1)
        target_rows = {row.tobytes() for row in target_codes}
        self.assertFalse(any(row.astype(np.uint8).tobytes() in target_rows for row in rows),
                         "the server received an unmixed patch of the scan")


#
# Background work
#


class BackgroundJob:
    """Runs one core call in a worker thread; it reaches the GUI only through ``messages``.

    ``work(progress, cancel)`` runs in the thread and must not touch Qt or MRML. The GUI drains ``messages``
    from a timer on the main thread: ``("progress", text, fraction or None)`` any number of times, then exactly one
    ``("done", result, None)`` or ``("error", exception, formatted_traceback)``.
    """

    def __init__(self, title: str, work: Callable[[Callable[[str, float | None], None], Callable[[], bool]], Any]):
        self.title = title
        self.messages: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._work = work
        self._thread = threading.Thread(target=self._run, name=f"MixupPrivacy: {title}", daemon=True)

    def start(self) -> "BackgroundJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _progress(self, text: str, fraction: float | None = None) -> None:
        # The core reports a stage without a fraction when it cannot tell how far along it is.
        self.messages.put(("progress", str(text), None if fraction is None else float(fraction)))

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self.cancel_event.is_set)
        except BaseException as exc:  # every outcome must reach the GUI, or it waits forever
            self.messages.put(("error", exc, traceback.format_exc()))
        else:
            self.messages.put(("done", result, None))


def normalized_server_url(url: str) -> str:
    """The form under which consent to upload to a server is remembered (case of scheme/host, trailing slash)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


#
# Application classes (need Qt)
#

if _HAVE_APP:
    try:
        from slicer.i18n import tr as _
        from slicer.i18n import translate
    except ImportError:  # Slicer before translations existed
        def _(text):
            return text

        def translate(_context, text):
            return text

    _SETTINGS = "MixupPrivacy/"

    class MixupPrivacy(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("Mixup Privacy")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy contributors"]
            self.parent.helpText = _(
                "Segments CSF, gray matter and white matter of a brain MRI on a remote GPU server without showing "
                "it the scan: every patch is mixed with a reference patch from this computer's private key before "
                "upload, and the server's answer is unmixed here. Generate the key once, test the connection, "
                "then Apply. \"Show what is sent\" adds a volume with exactly the patches the server received."
            )
            self.parent.acknowledgementText = _(
                "Method: Kim, Dolz and Desrosiers, \"Mixup-Privacy: a simple yet effective approach for "
                "privacy-preserving segmentation\" (IPMI 2023)."
            )

    class MixupPrivacyWidget(ScriptedLoadableModuleWidget):
        """GUI -> Logic only. Network and model work run in a ``BackgroundJob``; results are applied here."""

        def __init__(self, parent=None) -> None:
            ScriptedLoadableModuleWidget.__init__(self, parent)
            #: Set before ``setup`` to run the widget on another logic (tests, scripting).
            self.logic = None
            self._job: BackgroundJob | None = None
            self._jobDone: Callable[[Any], None] | None = None
            self._pollTimer = None

        # -- lifecycle -------------------------------------------------------------------------------------

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            uiWidget = slicer.util.loadUI(self.resourcePath("UI/MixupPrivacy.ui"))
            self.layout.addWidget(uiWidget)
            self.ui = slicer.util.childWidgetVariables(uiWidget)
            uiWidget.setMRMLScene(slicer.mrmlScene)
            if self.logic is None:
                self.logic = MixupPrivacyLogic(slicer.mrmlScene)

            self._pollTimer = qt.QTimer()
            self._pollTimer.setInterval(100)
            self._pollTimer.connect("timeout()", self._pollJob)

            self._restoreSettings()
            self.ui.applyButton.connect("clicked(bool)", self.onApply)
            self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
            self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
            self.ui.generateKeyButton.connect("clicked(bool)", self.onGenerateKey)
            self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
            self.ui.serverUrlLineEdit.connect("editingFinished()", self._saveSettings)
            self.ui.caBundlePathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
            self.ui.keyDirectoryPathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
            self.ui.ttaSpinBox.connect("valueChanged(int)", self._saveSettings)
            self.ui.unmixComboBox.connect("currentIndexChanged(int)", self._saveSettings)
            self._setStatus(_("Ready."))
            self._updateButtons()

        def cleanup(self) -> None:
            # The worker owns no Qt object; cancelling lets it stop at its next check, its result is dropped.
            if self._job is not None:
                self._job.cancel()
            self._job = None
            if self._pollTimer is not None:
                self._pollTimer.stop()
            ScriptedLoadableModuleWidget.cleanup(self)

        # -- settings (never the token) --------------------------------------------------------------------

        def _restoreSettings(self) -> None:
            settingsValue = slicer.util.settingsValue
            self.ui.serverUrlLineEdit.text = settingsValue(_SETTINGS + "ServerUrl", DEFAULT_SERVER_URL)
            self.ui.caBundlePathLineEdit.currentPath = settingsValue(_SETTINGS + "CaBundle", "")
            self.ui.keyDirectoryPathLineEdit.currentPath = settingsValue(_SETTINGS + "KeyDirectory", "") or self._defaultKeyDir()
            self.ui.ttaSpinBox.value = settingsValue(_SETTINGS + "TtaCount", 8, converter=int)
            mode = settingsValue(_SETTINGS + "UnmixMode", UNMIX_MODES[0])
            self.ui.unmixComboBox.currentIndex = UNMIX_MODES.index(mode) if mode in UNMIX_MODES else 0

        def _saveSettings(self, *_args) -> None:
            settings = qt.QSettings()
            settings.setValue(_SETTINGS + "ServerUrl", self.ui.serverUrlLineEdit.text.strip())
            settings.setValue(_SETTINGS + "CaBundle", self.ui.caBundlePathLineEdit.currentPath)
            settings.setValue(_SETTINGS + "KeyDirectory", self.ui.keyDirectoryPathLineEdit.currentPath)
            settings.setValue(_SETTINGS + "TtaCount", self.ui.ttaSpinBox.value)
            settings.setValue(_SETTINGS + "UnmixMode", self._unmixMode())

        @staticmethod
        def _defaultKeyDir() -> str:
            try:
                from medprivacy.mixup.bank import default_key_dir
            except ImportError:  # dependencies not installed yet: the user picks a folder or installs first
                return ""
            return str(default_key_dir())

        def _unmixMode(self) -> str:
            return UNMIX_MODES[max(0, min(self.ui.unmixComboBox.currentIndex, len(UNMIX_MODES) - 1))]

        def _connection(self) -> tuple[str, str | None, str | None]:
            url = self.ui.serverUrlLineEdit.text.strip()
            if not url:
                raise InputError("enter the server URL, e.g. " + DEFAULT_SERVER_URL)
            return url, self.ui.tokenLineEdit.text.strip() or None, self.ui.caBundlePathLineEdit.currentPath or None

        # -- actions ---------------------------------------------------------------------------------------

        def onApply(self) -> None:
            def start():
                inputNode = self.ui.inputSelector.currentNode()
                image = self.logic.volume_node_to_sitk(inputNode)  # validates the input before any prompt
                url, token, caBundle = self._connection()
                if not self._ensureDependencies() or not self._confirmUpload(url):
                    return
                outputNode = self.ui.outputSelector.currentNode()
                # Node IDs, not nodes, cross the wait: the scene may change before the answer arrives.
                inputNodeID = inputNode.GetID()
                outputNodeID = outputNode.GetID() if outputNode is not None else None
                showUploaded = self.ui.showUploadedCheckBox.checked
                kwargs = dict(url=url, token=token, ca_bundle=caBundle,
                              key_dir=self.ui.keyDirectoryPathLineEdit.currentPath or None,
                              tta=self.ui.ttaSpinBox.value, unmix=self._unmixMode(), keep_uploaded=showUploaded)
                self._saveSettings()
                logic = self.logic
                self._startJob(
                    _("Private segmentation"),
                    lambda progress, cancel: logic.compute(image, progress=progress, cancel=cancel, **kwargs),
                    lambda result: self._applyResult(result, inputNodeID, outputNodeID, showUploaded),
                )

            self._guarded(_("Could not start the private segmentation."), start)

        def onCancel(self) -> None:
            if self._job is not None:
                self._job.cancel()
                self.ui.cancelButton.enabled = False
                self._setStatus(_("Cancelling..."))

        def onTestConnection(self) -> None:
            def start():
                url, token, caBundle = self._connection()
                if not self._ensureDependencies():
                    return
                self._saveSettings()
                logic = self.logic
                self._startJob(
                    _("Connection test"),
                    lambda progress, cancel: logic.test_connection(url, token=token, ca_bundle=caBundle),
                    lambda description: self._setStatus(_("Connected: {description}").format(description=description)),
                )

            self._guarded(_("Could not test the connection."), start)

        def onGenerateKey(self) -> None:
            def start():
                keyDir = self.ui.keyDirectoryPathLineEdit.currentPath or self._defaultKeyDir()
                if not keyDir:
                    raise InputError("choose a folder for the private key")
                if not self._ensureDependencies():
                    return
                from medprivacy.mixup.bank import BANK_FILE

                replace = os.path.isfile(os.path.join(keyDir, BANK_FILE))
                if replace and not slicer.util.confirmYesNoDisplay(
                    _("{folder} already holds a private key. Replace it with a new one? Segmentations made with the "
                      "old key stay valid.").format(folder=keyDir)
                ):
                    return
                self.ui.keyDirectoryPathLineEdit.currentPath = keyDir
                self._saveSettings()
                logic = self.logic
                self._startJob(
                    _("Key generation"),
                    lambda progress, cancel: logic.generate_key(keyDir, progress=progress, force=replace),
                    lambda _bank: self._setStatus(_("Private key stored in {folder}.").format(folder=keyDir)),
                )

            self._guarded(_("Could not generate the key."), start)

        def _applyResult(self, result, inputNodeID: str, outputNodeID: str | None, showUploaded: bool) -> None:
            inputNode = slicer.mrmlScene.GetNodeByID(inputNodeID)
            if inputNode is None:
                raise InputError("the input volume was removed from the scene before the result arrived")
            outputNode = slicer.mrmlScene.GetNodeByID(outputNodeID) if outputNodeID else None
            segmentationNode = self.logic.apply_result(result, inputNode, outputNode, show_uploaded=showUploaded)
            self.ui.outputSelector.setCurrentNode(segmentationNode)
            uploadedNode = self.logic.last_uploaded_node
            background = uploadedNode if uploadedNode is not None else inputNode
            slicer.util.setSliceViewerLayers(background=background, fit=uploadedNode is not None)
            if uploadedNode is not None:
                self._setStatus(_("Done. Showing what the server received ({name}).").format(name=uploadedNode.GetName()))
            else:
                self._setStatus(_("Done: tissue segments in {name}.").format(name=segmentationNode.GetName()))

        # -- dependencies and consent ----------------------------------------------------------------------

        def _ensureDependencies(self) -> bool:
            import importlib.util

            torchMissing = importlib.util.find_spec("torch") is None
            missing = [name for name in _PIP_IMPORT_NAMES if importlib.util.find_spec(name) is None]
            if not torchMissing and not missing:
                return True
            names = (["torch (PyTorch extension)"] if torchMissing else []) + missing
            if not slicer.util.confirmYesNoDisplay(
                _("Mixup Privacy needs Python packages that are not installed yet: {names}.\n\n"
                  "Download and install them now? This can take several minutes.").format(names=", ".join(names))
            ):
                return False
            if torchMissing:
                try:
                    import PyTorchUtils
                except ImportError:
                    raise MedPrivacyError(
                        "the PyTorch extension is missing: install 'PyTorch' from the Extensions Manager and restart Slicer"
                    ) from None
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise MedPrivacyError("PyTorch could not be installed; see the Python console for the pip output")
            if missing:
                # torch is in place by now, so MONAI's dependency on it is already satisfied.
                slicer.util.pip_install(PIP_REQUIREMENTS)
            return True

        def _consentedServers(self) -> list[str]:
            # Stored as JSON text: QSettings turns a one-element list into a plain string in INI files.
            try:
                servers = json.loads(slicer.util.settingsValue(_SETTINGS + "ConsentedServers", "[]") or "[]")
            except (TypeError, ValueError):
                return []
            return [str(server) for server in servers] if isinstance(servers, list) else []

        def _confirmUpload(self, url: str) -> bool:
            server = normalized_server_url(url)
            consented = self._consentedServers()
            if server in consented:
                return True
            if not slicer.util.confirmYesNoDisplay(
                _("The scan will be cut into patches, each mixed with a random reference patch from your private "
                  "key, and only these mixed patches are sent to:\n\n{server}\n\nThe key and the unmixed scan never "
                  "leave this computer. Send mixed patches to this server now and in the future?").format(server=server),
                windowTitle=_("Send data to a server?"),
            ):
                return False
            qt.QSettings().setValue(_SETTINGS + "ConsentedServers", json.dumps(consented + [server]))
            return True

        # -- job plumbing ----------------------------------------------------------------------------------

        def _guarded(self, message: str, action: Callable[[], None]) -> None:
            """User mistakes (MedPrivacyError) get one line; anything else is a bug and keeps its traceback."""
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                try:
                    action()
                except MedPrivacyError as exc:
                    self._showUserError(exc)

        def _startJob(self, title: str, work, onDone: Callable[[Any], None]) -> None:
            if self._job is not None:
                raise InputError(f"{self._job.title} is still running; wait for it or press Cancel")
            self._job = BackgroundJob(title, work).start()
            self._jobDone = onDone
            self.ui.progressBar.value = 0
            self._setStatus(_("{title}...").format(title=title))
            self._updateButtons()
            self._pollTimer.start()

        def _pollJob(self) -> None:
            job = self._job
            if job is None:
                self._pollTimer.stop()
                return
            while True:
                try:
                    kind, payload, detail = job.messages.get_nowait()
                except queue.Empty:
                    return
                if kind == "progress":
                    if detail is not None:
                        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, detail))))
                    self._setStatus(payload)
                    continue
                self._pollTimer.stop()
                self._job, onDone = None, self._jobDone
                self._jobDone = None
                self._updateButtons()
                if kind == "done":
                    self.ui.progressBar.value = 100
                    self._guarded(_("{title} finished, but its result could not be shown.").format(title=job.title),
                                  lambda: onDone(payload))
                elif isinstance(payload, CancelledError):
                    self.ui.progressBar.value = 0
                    self._setStatus(_("{title} cancelled.").format(title=job.title))
                elif isinstance(payload, MedPrivacyError):
                    self._showUserError(payload)
                else:
                    logging.error("%s failed:\n%s", job.title, detail)
                    self._setStatus(_("{title} failed: {error}").format(title=job.title, error=payload))
                    slicer.util.errorDisplay(_("{title} failed: {error}").format(title=job.title, error=payload),
                                             detailedText=detail)
                return

        def _showUserError(self, error: Exception) -> None:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            self._setStatus(message)
            slicer.util.errorDisplay(message)

        def _setStatus(self, text: str) -> None:
            self.ui.statusLabel.text = text

        def _updateButtons(self, *_args) -> None:
            busy = self._job is not None
            self.ui.applyButton.enabled = not busy and self.ui.inputSelector.currentNode() is not None
            self.ui.applyButton.toolTip = (
                _("Segment the input volume through the private path")
                if self.ui.inputSelector.currentNode() is not None else _("Select an input volume")
            )
            self.ui.cancelButton.enabled = busy
            self.ui.testConnectionButton.enabled = not busy
            self.ui.generateKeyButton.enabled = not busy

    class MixupPrivacyTest(ScriptedLoadableModuleTest, MixupPrivacyTestMixin):
        """Runs the shared test bodies on the application's scene."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            for test in (self.test_volume_round_trip, self.test_labelmap_to_segmentation,
                         self.test_rejects_unusable_volumes, self.test_private_segmentation_end_to_end):
                self.setUp()
                test()
            self.delayDisplay("MixupPrivacy tests passed")

        def test_volume_round_trip(self):
            self.check_volume_round_trip(slicer.mrmlScene)

        def test_labelmap_to_segmentation(self):
            self.check_labelmap_to_segmentation(slicer.mrmlScene)

        def test_rejects_unusable_volumes(self):
            self.check_rejects_unusable_volumes(slicer.mrmlScene)

        def test_private_segmentation_end_to_end(self):
            # Needs a running 'medprivacy serve' (and nilearn for the MNI152 image): opt in through the environment.
            url = os.environ.get("MIXUPPRIVACY_TEST_SERVER_URL")
            if not url:
                self.delayDisplay("End-to-end test skipped: set MIXUPPRIVACY_TEST_SERVER_URL to a running server "
                                  "(and MIXUPPRIVACY_TEST_AUDIT_DIR to its --audit-dir to check what it received)")
                return
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                self.check_private_segmentation_end_to_end(
                    slicer.mrmlScene, url, os.path.join(folder, "key"),
                    audit_dir=os.environ.get("MIXUPPRIVACY_TEST_AUDIT_DIR") or None,
                    token=os.environ.get("MEDPRIVACY_TOKEN") or None,
                    unmix=os.environ.get("MIXUPPRIVACY_TEST_UNMIX", "naive"),
                )
