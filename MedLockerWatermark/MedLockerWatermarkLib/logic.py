"""``MedLockerWatermarkLogic``: MRML volume nodes <-> MedLocker's 2D pixel arrays, and the calls into the core.

What a "2D image" is here: one slice along the volume's IJK K axis. A PNG or a 2D DICOM loaded into Slicer is a
volume with a single slice; for a 3D volume the caller names the slice (the widget passes the one shown in the Red
view). Rows of the 2D image are the J index and columns the I index, so MedLocker's (x, y) = (i, j).

Output geometry (a design choice): the protected image is a NEW single-slice volume holding exactly the chosen
slice, placed where that slice lies in space (same spacing, directions and parent transform; origin at the slice).
The alternative, a copy of the whole 3D volume with one slice replaced, would hand out the neighbouring slices
unprotected, and the key fingerprints one 2D image anyway. ``unlock`` likewise gives a new single-slice volume.

Processes and threads: a dataset folder is protected in a worker process (``start_folder_protection``, the
worker's ``watermark-folder`` task, which imports only MedLocker's part of the core); ``protect_folder`` is the same
work in this process, for scripts and the tests. ``compute_protection`` (one image, one server search) touches no
MRML and no state of this object except through its arguments, so the widget runs it in a ``BackgroundJob``.
Everything else belongs on the main thread.
Heavy modules (requests, scipy, cryptography, SimpleITK) are imported inside functions, so that Slicer lists the
module before its dependencies are installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from medprivacy.consent import normalized_server_url  # noqa: F401  (re-exported: the widget remembers consent by it)
from medprivacy.errors import CancelledError, InputError, MedPrivacyError
from medprivacy.watermark.batch import describe_predictions  # noqa: F401  (re-exported for the widget)
from medprivacy.watermark.boxes import DEFAULT_MODE, MODES  # noqa: F401  (re-exported for the widget)
from MedPrivacySlicerCommon.mrml_geometry import ijk_to_ras, vtk_matrix

DEFAULT_SERVER_URL = "http://127.0.0.1:8765"
#: Where lesion boxes come from in the Protect tab: the server's segmenter, a segmentation node, or nowhere.
LESION_SOURCES = ("server", "segmentation", "none")
LESION_SEGMENT_NAME = "Lesion"
LESION_COLOR = (0.9, 0.2, 0.15)
#: Lesion probability counted as lesion when the server's segmenter draws the mask (the server's own default).
LESION_THRESHOLD = 0.5

Progress = Callable[[str, "float | None"], None]
Cancel = Callable[[], bool]


@dataclass
class SliceImage:
    """One 2D image taken from a volume node, in the form MedLocker works on."""

    pixels: np.ndarray  # (H, W) or (H, W, 3), uint8 or uint16 (signed node types shifted, see medlocker.io)
    source_dtype: np.dtype  # the node's scalar type, to write pixels back exactly
    slice_index: int  # along the node's K axis, counted from the first voxel of its image data
    name: str  # node name, the default name of the image in the key
    #: Intensity window (low, high) in ``pixels`` values that the logo spans and the classifiers see as 0..1;
    #: None: the pixel type's full range. See ``MedLockerWatermarkLogic.display_window``.
    window: tuple[int, int] | None = None


@dataclass
class ProtectionAnswer:
    """What the worker brings back for one image: the server's search answer and the mask it was given."""

    image: SliceImage
    logo: np.ndarray
    answer: dict[str, Any]
    lesion_mask: np.ndarray | None  # (H, W) bool, None when no lesion mask constrained the placement
    lesion_source: str


@dataclass
class ProtectionResult:
    """The nodes one protection put into the scene and what the server reported."""

    name: str  # the image's name in the key
    output_node: Any
    segmentation_node: Any  # "Lesion" overlay on the output, or None
    roi_nodes: list = field(default_factory=list)  # one markups ROI per lesion box
    answer: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return self.answer["params"]

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.answer.get("history", [])

    def prediction_lines(self) -> list[str]:
        return describe_predictions(self.answer)


@dataclass
class DatasetResult:
    protected: int
    output_dir: Path
    key_path: Path
    reports: list[str] = field(default_factory=list)


def _node_label(node) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "the selected image"


def voxel_array(volume_node) -> np.ndarray:
    """The node's voxels as a (K, J, I) or (K, J, I, C) numpy view (VTK stores I fastest)."""
    image_data = volume_node.GetImageData()
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    shape = dims[::-1] if components == 1 else dims[::-1] + (components,)
    return flat.reshape(shape)


class MedLockerWatermarkLogic:
    """MedLocker on MRML volume nodes; the scene comes from the constructor (never ``slicer.mrmlScene``), so it runs
    the same in the application and on slicer-core.

    ``key`` is the session's MedLocker key: every image protected here is recorded in it, and ``unlock``/``verify``
    use it. ``load_key`` replaces it (protecting more images then appends to the loaded key, like the CLI's
    ``--append``), ``export_key`` saves it encrypted; ``unsaved`` counts images not yet in an exported file.
    """

    def __init__(self, scene=None) -> None:
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise ValueError("MedLockerWatermarkLogic needs an MRML scene outside the Slicer application")
        self.scene = scene
        from medprivacy.watermark.keyfile import WatermarkKey

        self.key = WatermarkKey()
        self.key_path: Path | None = None
        self.unsaved = 0
        #: Extra ``WatermarkClient`` settings (timeouts, retries). The default read timeout allows a long search.
        self.client_options: dict[str, Any] = {"read_timeout": 1800.0}

    # -- volumes <-> 2D images ----------------------------------------------------------------------------------

    def slice_count(self, volume_node) -> int:
        self._check_image_node(volume_node)
        return int(volume_node.GetImageData().GetDimensions()[2])

    def node_to_image(self, volume_node, slice_index: int | None = None) -> SliceImage:
        """Slice ``slice_index`` (K axis) of a scalar or RGB volume node as MedLocker pixels; a single-slice volume
        needs no index. One-line InputError for anything MedLocker cannot watermark."""
        from medprivacy.watermark.io import to_watermark_pixels

        self._check_image_node(volume_node)
        label = _node_label(volume_node)
        slices = volume_node.GetImageData().GetDimensions()[2]
        if slice_index is None:
            if slices != 1:
                raise InputError(f"{label} is a 3D volume with {slices} slices; choose the slice to protect")
            slice_index = 0
        if not (isinstance(slice_index, (int, np.integer)) and 0 <= int(slice_index) < slices):
            raise InputError(f"slice {slice_index} is outside {label}, which has slices 0 to {slices - 1}")
        voxels = voxel_array(volume_node)[int(slice_index)]
        pixels, source_dtype = to_watermark_pixels(np.array(voxels, copy=True), label)
        name = volume_node.GetName() or "image"
        if slices > 1:  # the key and the output name say which slice of the volume this image is
            name = f"{name} slice {int(slice_index)}"
        return SliceImage(
            np.ascontiguousarray(pixels),
            np.dtype(source_dtype),
            int(slice_index),
            name,
            self.display_window(volume_node, pixels),
        )

    @staticmethod
    def display_window(volume_node, pixels: np.ndarray | None = None) -> tuple[int, int] | None:
        """The intensity window of a 16-bit gray image in MedLocker's unsigned values, or None (full range).

        A CT or MR volume uses a small part of the 16-bit range: with the full range the logo would be painted at
        65535 and the classifiers would see an almost black image. What the user sees is the window to use: the
        volume's display window/level, else (no display node yet) the slice's own minimum..maximum, like the
        files without a window in ``medlocker.io``. 8-bit and RGB images use their full range.
        """
        if pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 2:
            return None
        shift = 32768 if volume_node.GetImageData().GetScalarType() == vtk.VTK_SHORT else 0
        display = volume_node.GetDisplayNode()
        if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode") and display.GetWindow() > 0:
            low = int(np.floor(display.GetWindowLevelMin())) + shift
            high = int(np.ceil(display.GetWindowLevelMax())) + shift
        else:
            low, high = int(pixels.min()), int(pixels.max())
        low, high = max(0, low), min(65535, high)
        return (low, high) if low < high else None

    def slice_index_at(self, volume_node, ras) -> int:
        """The K index of the volume's slice through the RAS point ``ras`` (e.g. the Red view's centre), clamped to
        the volume; counted like ``node_to_image``'s ``slice_index``. The parent transform is not applied."""
        self._check_image_node(volume_node)
        extent = volume_node.GetImageData().GetExtent()
        ijk = np.linalg.inv(ijk_to_ras(volume_node)) @ np.array([float(v) for v in ras[:3]] + [1.0])
        return int(min(max(int(np.floor(ijk[2] + 0.5)) - extent[4], 0), extent[5] - extent[4]))

    def image_to_node(self, pixels: np.ndarray, source_dtype, reference_node, slice_index: int, name: str):
        """A new single-slice volume node holding ``pixels`` (MedLocker form) in the reference node's scalar type,
        at the place of ``slice_index`` of ``reference_node`` (same spacing, directions and parent transform)."""
        from medprivacy.watermark.io import to_file_pixels

        stored = to_file_pixels(np.asarray(pixels), np.dtype(source_dtype))
        rgb = stored.ndim == 3
        node = self.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", name)
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(stored.shape[1], stored.shape[0], 1)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(stored).reshape(-1, 3 if rgb else 1), deep=True)
        image_data.GetPointData().SetScalars(scalars)
        node.SetAndObserveImageData(image_data)
        # Voxel (0, 0, 0) of the new image is voxel (i0, j0, k0 + slice) of the reference, whose extent may not
        # start at zero; the new node keeps the reference's axes and spacing with its origin moved there.
        extent = reference_node.GetImageData().GetExtent()
        matrix = ijk_to_ras(reference_node)
        matrix[:3, 3] = (matrix @ np.array([extent[0], extent[2], extent[4] + slice_index, 1.0]))[:3]
        node.SetIJKToRASMatrix(vtk_matrix(matrix))
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        node.CreateDefaultDisplayNodes()
        return node

    # -- lesion masks and boxes ------------------------------------------------------------------------------------

    def segmentation_to_mask(
        self, segmentation_node, volume_node, slice_index: int | None = None, segment_ids: list[str] | None = None
    ) -> np.ndarray:
        """(H, W) bool lesion mask of the 2D image ``node_to_image(volume_node, slice_index)``: voxels of that slice
        inside any of ``segment_ids`` (default: every segment) of ``segmentation_node``."""
        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise InputError("choose a segmentation node holding the lesions, or take the lesion mask from the server")
        image = self.node_to_image(volume_node, slice_index)  # validates the volume and the slice
        segmentation = segmentation_node.GetSegmentation()
        ids = vtk.vtkStringArray()
        for segment_id in (
            segment_ids
            if segment_ids is not None
            else [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        ):
            if segmentation.GetSegment(segment_id) is None:
                raise InputError(f"segmentation {_node_label(segmentation_node)} has no segment {segment_id!r}")
            ids.InsertNextValue(segment_id)
        dims = volume_node.GetImageData().GetDimensions()
        if ids.GetNumberOfValues() == 0:
            return np.zeros((dims[1], dims[0]), dtype=bool)
        extent = volume_node.GetImageData().GetExtent()
        geometry = slicer.vtkOrientedImageData()
        geometry.SetExtent(extent)
        geometry.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras(volume_node)))
        merged = slicer.vtkOrientedImageData()
        if not segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, ids
        ):
            raise MedPrivacyError(f"could not turn segmentation {_node_label(segmentation_node)} into a lesion mask")
        if tuple(merged.GetExtent()) != tuple(extent):
            raise MedPrivacyError("the lesion mask does not match the image's grid")
        labels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(dims[::-1])
        return labels[image.slice_index] != 0

    def mask_to_segmentation(self, mask: np.ndarray, reference_node, name: str | None = None):
        """A segmentation node with one "Lesion" segment holding ``mask`` (H, W) on a single-slice reference node."""
        dims = reference_node.GetImageData().GetDimensions()
        mask = np.asarray(mask)
        if mask.shape != (dims[1], dims[0]) or dims[2] != 1:
            raise InputError(f"the lesion mask is {mask.shape} but the image is {dims[1]}x{dims[0]}")
        segmentation_node = self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_node.GetName()} lesion"
        )
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
        segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        segment_id = segmentation_node.GetSegmentation().AddEmptySegment(
            "Lesion", LESION_SEGMENT_NAME, list(LESION_COLOR)
        )
        oriented = slicer.vtkOrientedImageData()
        oriented.SetExtent(reference_node.GetImageData().GetExtent())
        oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = (mask != 0).astype(np.uint8).ravel()
        oriented.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras(reference_node)))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            oriented, segmentation_node, ids
        ):
            raise MedPrivacyError("could not import the lesion mask into a segmentation node")
        segmentation_node.CreateDefaultDisplayNodes()
        display_node = segmentation_node.GetDisplayNode()
        display_node.SetVisibility2DFill(True)
        display_node.SetVisibility2DOutline(True)
        return segmentation_node

    def boxes_to_rois(self, boxes, reference_node, slice_index: int = 0, name: str = "Lesion box") -> list:
        """One ``vtkMRMLMarkupsROINode`` per box (x, y, w, h) in pixels of slice ``slice_index``: the ROI covers
        exactly those pixels in plane and one slice in depth, oriented like the volume's axes."""
        matrix = ijk_to_ras(reference_node)
        extent = reference_node.GetImageData().GetExtent()
        spacing = np.array(reference_node.GetSpacing(), dtype=float)
        axes = matrix[:3, :3] / spacing  # unit I, J, K directions in RAS (columns)
        if np.linalg.det(axes) < 0:
            # ROI axes must be right-handed; the box is symmetric along K, so flipping that axis changes nothing.
            axes[:, 2] = -axes[:, 2]
        rois = []
        for number, (x, y, w, h) in enumerate(boxes, start=1):
            center_ijk = np.array(
                [extent[0] + x + (w - 1) / 2.0, extent[2] + y + (h - 1) / 2.0, extent[4] + slice_index, 1.0]
            )
            object_to_node = np.eye(4)
            object_to_node[:3, :3] = axes
            object_to_node[:3, 3] = (matrix @ center_ijk)[:3]
            roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{reference_node.GetName()} {name} {number}")
            roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(object_to_node))
            roi.SetSize(w * spacing[0], h * spacing[1], spacing[2])
            roi.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
            roi.CreateDefaultDisplayNodes()
            rois.append(roi)
        return rois

    # -- server ---------------------------------------------------------------------------------------------------

    def client(self, url: str, token: str | None = None, ca_bundle: str | None = None):
        """A new ``WatermarkClient`` (one per worker thread). A blank CA bundle field means none, not a file ""."""
        from medprivacy.transport.watermark_client import WatermarkClient

        url = (url or "").strip()
        if not url:
            raise InputError(f"enter the server URL, e.g. {DEFAULT_SERVER_URL}")
        return WatermarkClient(url, token=token or None, ca_bundle=ca_bundle or None, **self.client_options)

    def test_connection(self, url: str, token: str | None = None, ca_bundle: str | None = None) -> str:
        """One line about the server, including how many watermark classifiers and lesion segmenters it serves."""
        client = self.client(url, token, ca_bundle)
        try:
            line = client.check_connection()
            classifiers, segmenters = client.classifiers(), client.segmenters()
        finally:
            client.close()
        return f"{line}; {len(classifiers)} watermark classifier(s), {len(segmenters)} lesion segmenter(s)"

    def list_models(self, url: str, token: str | None = None, ca_bundle: str | None = None) -> tuple[dict, dict]:
        """(classifiers, segmenters) the server offers, name -> description; for the source-model table."""
        client = self.client(url, token, ca_bundle)
        try:
            return client.classifiers(), client.segmenters()
        finally:
            client.close()

    # -- protect one image ----------------------------------------------------------------------------------------

    @staticmethod
    def load_logo(path: str | os.PathLike | None = None) -> np.ndarray:
        """The logo picture at ``path`` as RGBA, or MedLocker's badge (grey padlock on a dark plate) when no path is
        given."""
        from medprivacy.watermark import blending

        if path is None or not str(path).strip():
            return blending.default_logo()
        return blending.load_logo(path)

    def prepare_protection(
        self,
        volume_node,
        slice_index: int | None = None,
        logo=None,
        settings=None,
        lesion_source: str = "server",
        segmentation_node=None,
        segment_ids=None,
    ):
        """Everything of a protection that needs MRML or can be checked before the network (main thread):
        (image, logo, settings, lesion mask or None). Raises a one-line InputError for unusable input."""
        from medprivacy.watermark import blending
        from medprivacy.watermark.batch import SearchSettings
        from medprivacy.watermark.boxes import normalize_mode

        settings = settings or SearchSettings()
        settings.mode = normalize_mode(settings.mode)
        if lesion_source not in LESION_SOURCES:
            raise InputError(f"lesion source must be one of {', '.join(LESION_SOURCES)}, not {lesion_source!r}")
        image = self.node_to_image(volume_node, slice_index)
        logo = self.load_logo(None) if logo is None else blending.as_rgba(logo)
        blending.check_image(image.pixels, _node_label(volume_node))
        blending.fitted_size(image.pixels.shape, logo.shape, settings.sl)  # the logo must fit before anything is sent
        settings.request("none")  # checks sl and the weights
        mask = None
        if settings.mode != "wap" and lesion_source == "segmentation":
            mask = self.segmentation_to_mask(segmentation_node, volume_node, image.slice_index, segment_ids)
        if settings.mode == "keep-in" and lesion_source == "none":
            raise InputError(
                "keep-in placement puts the logo on the lesions: take the lesion mask from the server or a segmentation"
            )
        return image, logo, settings, mask

    def compute_protection(
        self,
        image: SliceImage,
        logo: np.ndarray,
        settings,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        lesion_source: str = "server",
        mask: np.ndarray | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> ProtectionAnswer:
        """The server's watermark search for one image (worker thread: no MRML).

        With ``lesion_source`` "server" the server's segmenter draws the lesion mask first (threshold 0.5) and that
        very mask is sent with the search, so the overlay shown is the one that constrained the logo.
        """
        from medprivacy.watermark.batch import check_classifiers
        from medprivacy.watermark.blending import unit_view

        def check_cancel():
            if cancel is not None and cancel():
                raise CancelledError("protection cancelled")

        client = self.client(url, token, ca_bundle)
        try:
            if progress:
                progress("asking the server for its models", 0.05)
            info = check_classifiers(client, settings.models)
            check_cancel()
            lesions, used_mask = "none", None
            if settings.mode != "wap" and lesion_source == "server":
                if not any(d.get("task") == "segment-lesion" for d in info.get("models", {}).values()):
                    raise InputError(
                        f"{client.url} holds no lesion segmenter; take the lesions from a segmentation node, "
                        "or use wap placement"
                    )
                if progress:
                    progress("finding lesions on the server", 0.1)
                used_mask = client.lesions(unit_view(image.pixels, image.window)) >= LESION_THRESHOLD
                lesions = "mask"
            elif settings.mode != "wap" and lesion_source == "segmentation":
                if mask is None:
                    raise InputError("no lesion mask was taken from the segmentation; choose the segmentation node")
                used_mask, lesions = np.asarray(mask) != 0, "mask"
            check_cancel()
            if progress:
                progress("searching the watermark on the server", 0.2)
            answer = client.optimize(
                image.pixels, logo, mask=used_mask, window=image.window, **settings.request(lesions)
            )
            check_cancel()
        finally:
            client.close()
        return ProtectionAnswer(image, logo, answer, used_mask, lesion_source if used_mask is not None else "none")

    def apply_protection(self, computed: ProtectionAnswer, reference_node, name: str | None = None) -> ProtectionResult:
        """Record the image in the session key, blend the logo locally into the exact pixels and put the output
        volume, the "Lesion" overlay and the lesion-box ROIs into the scene (main thread)."""
        image, answer = computed.image, computed.answer
        found = answer["params"]
        name = self._unique_key_name(name or image.name)
        protected = self.key.protect(
            name, image.pixels, computed.logo, found["alpha"], found["x"], found["y"], found["sl"], image.window
        )
        if list(self.key[name].logo_size) != list(answer["logo_size"]):
            raise MedPrivacyError(
                f"the server sized the logo {answer['logo_size']} but this client {list(self.key[name].logo_size)}; "
                "update client and server to the same MedPrivacy version"
            )
        self.unsaved += 1
        output_node = self.image_to_node(
            protected, image.source_dtype, reference_node, image.slice_index, f"{image.name} protected"
        )
        segmentation_node = None
        if computed.lesion_mask is not None:
            segmentation_node = self.mask_to_segmentation(computed.lesion_mask, output_node)
        rois = self.boxes_to_rois(answer.get("lesion_boxes", []), output_node)
        return ProtectionResult(
            name=name, output_node=output_node, segmentation_node=segmentation_node, roi_nodes=rois, answer=answer
        )

    def protect(
        self,
        volume_node,
        url: str,
        slice_index: int | None = None,
        logo=None,
        settings=None,
        lesion_source: str = "server",
        segmentation_node=None,
        segment_ids=None,
        token: str | None = None,
        ca_bundle: str | None = None,
        name: str | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> ProtectionResult:
        """``prepare_protection`` + ``compute_protection`` + ``apply_protection`` in the calling thread (scripts,
        tests)."""
        image, logo, settings, mask = self.prepare_protection(
            volume_node, slice_index, logo, settings, lesion_source, segmentation_node, segment_ids
        )
        computed = self.compute_protection(
            image, logo, settings, url, token, ca_bundle, lesion_source, mask, progress, cancel
        )
        return self.apply_protection(computed, volume_node, name)

    def _unique_key_name(self, name: str) -> str:
        # Node names repeat ("Image", "Image_1" after a reload); the key needs one name per image.
        name = name.strip() or "image"
        candidate, number = name, 2
        while candidate in self.key:
            candidate, number = f"{name} ({number})", number + 1
        return candidate

    # -- the key --------------------------------------------------------------------------------------------------

    def export_key(
        self,
        path: str | os.PathLike,
        passphrase: str | None = None,
        key_file: str | os.PathLike | None = None,
        **options,
    ) -> Path:
        """Save the session key encrypted with a passphrase or a 32-byte key file (``options``: e.g. scrypt cost)."""
        from medprivacy.watermark.keyfile import save_key

        path = save_key(self.key, path, passphrase=passphrase or None, key_file=key_file or None, **options)
        self.key_path, self.unsaved = Path(path), 0
        return Path(path)

    def load_key(
        self, path: str | os.PathLike, passphrase: str | None = None, key_file: str | os.PathLike | None = None
    ):
        """Open a key file and make it the session key; InputError (one line) on a wrong passphrase or key file."""
        from medprivacy.watermark.keyfile import load_key

        self.key = load_key(path, passphrase=passphrase or None, key_file=key_file or None)
        self.key_path, self.unsaved = Path(path), 0
        return self.key

    def new_key(self) -> None:
        from medprivacy.watermark.keyfile import WatermarkKey

        self.key, self.key_path, self.unsaved = WatermarkKey(), None, 0

    @staticmethod
    def generate_key_file(path: str | os.PathLike) -> Path:
        from medprivacy.watermark.keyfile import generate_key_file

        return generate_key_file(path)

    def verify(self, volume_node, slice_index: int | None = None):
        """The session key's entry for this exact image, or None."""
        from medprivacy.watermark.keyfile import verify

        return verify(self.node_to_image(volume_node, slice_index).pixels, self.key)

    def unlock(self, volume_node, slice_index: int | None = None, name: str | None = None):
        """A new single-slice volume with the original image, bit for bit, restored with the session key."""
        from medprivacy.watermark.keyfile import unlock

        image = self.node_to_image(volume_node, slice_index)
        if self.key.find(image.pixels) is None:
            raise InputError(
                f"{_node_label(volume_node)} is not protected by the current key, or it was changed after protection; "
                "load the key it was protected with"
            )
        restored = unlock(image.pixels, self.key)
        return self.image_to_node(
            restored, image.source_dtype, volume_node, image.slice_index, name or f"{volume_node.GetName()} unlocked"
        )

    # -- a dataset folder -----------------------------------------------------------------------------------------

    def protect_folder(
        self,
        input_dir,
        output_dir,
        key_path,
        url: str,
        *,
        passphrase: str | None = None,
        key_file=None,
        token: str | None = None,
        ca_bundle: str | None = None,
        logo=None,
        settings=None,
        lesions: str = "auto",
        append: bool = False,
        overwrite: bool = False,
        scrypt_log2_n: int | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> DatasetResult:
        """Protect every image file of ``input_dir`` into ``output_dir`` and one key at ``key_path`` (worker thread).

        The same code path as ``medprivacy watermark protect`` (``medlocker.batch``): all inputs are checked before
        the server works, each output keeps its input's format, and on cancel or error the key still holds the
        images finished so far. ``append`` adds to an existing key (opened with the same credentials).
        """
        from medprivacy.watermark import batch

        credentials = {"passphrase": passphrase} if passphrase else {"key_file": key_file} if key_file else None
        if credentials is not None and scrypt_log2_n is not None and "passphrase" in credentials:
            credentials["scrypt_log2_n"] = scrypt_log2_n
        logo = self.load_logo(None) if logo is None else logo
        client = self.client(url, token, ca_bundle)
        try:
            done, reports = batch.protect_folder(
                input_dir,
                output_dir,
                key_path,
                client,
                credentials,
                logo,
                settings,
                lesions,
                append=append,
                overwrite=overwrite,
                progress=progress,
                cancel=cancel,
            )
        finally:
            client.close()
        return DatasetResult(protected=done, output_dir=Path(output_dir), key_path=Path(key_path), reports=reports)

    def start_folder_protection(
        self,
        input_dir,
        output_dir,
        key_path,
        url: str,
        *,
        passphrase: str | None = None,
        key_file=None,
        token: str | None = None,
        ca_bundle: str | None = None,
        logo=None,
        settings=None,
        lesions: str = "auto",
        append: bool = False,
        overwrite: bool = False,
        scrypt_log2_n: int | None = None,
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        """``protect_folder`` in a worker process, returning the worker at once (main thread; ``cancel()`` stops it
        and the key still restores the images finished so far). ``on_done(DatasetResult)``; failures reach
        ``on_error(message, kind)``. The passphrase and token travel in the worker's environment only."""
        import dataclasses

        from medprivacy.watermark.worker_tasks import PASSPHRASE_ENV
        from MedPrivacySlicerCommon.worker import start_task

        if not (url or "").strip():
            raise InputError(f"enter the server URL, e.g. {DEFAULT_SERVER_URL}")

        def prepare(folder: Path) -> dict:
            options = {
                "key_file": str(key_file) if key_file and not passphrase else None,
                "lesions": lesions,
                "append": bool(append),
                "overwrite": bool(overwrite),
                "scrypt_log2_n": scrypt_log2_n,
                "settings": dataclasses.asdict(settings) if settings is not None else None,
            }
            if logo is not None:  # pixels the panel already holds (a chosen picture or the badge)
                np.save(folder / "logo.npy", np.ascontiguousarray(logo), allow_pickle=False)
                options["logo"] = str(folder / "logo.npy")
            return {
                "task": "watermark-folder",
                "inputs": {"folder": str(input_dir)},
                "outputs": {"folder": str(output_dir), "key": str(key_path)},
                "options": options,
                "server": {
                    "url": url.strip(),
                    "ca_bundle": ca_bundle or None,
                    "timeout": self.client_options.get("read_timeout"),
                },
            }

        def result(outputs: dict) -> DatasetResult:
            return DatasetResult(
                protected=int(outputs["protected"]),
                output_dir=Path(outputs["folder"]),
                key_path=Path(outputs["key"]),
                reports=list(outputs.get("reports") or []),
            )

        return start_task(
            prepare,
            result,
            on_progress,
            on_done,
            on_error,
            token=token,
            env={PASSPHRASE_ENV: passphrase} if passphrase else None,
            prefix="medprivacy-watermark-",
        )

    def protect_folder_in_worker(
        self,
        input_dir,
        output_dir,
        key_path,
        url: str,
        *,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
        **options,
    ) -> DatasetResult:
        """``start_folder_protection`` to its end (blocks; scripts, tests): ``protect_folder``'s arguments and
        result. Cancel terminates the worker."""
        import functools

        from MedPrivacySlicerCommon.worker import run_task

        return run_task(
            functools.partial(self.start_folder_protection, input_dir, output_dir, key_path, url, **options),
            progress,
            cancel,
        )

    # -- checks ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_image_node(volume_node) -> None:
        if volume_node is None:
            raise InputError("no input image selected: choose a 2D image or a volume")
        label = _node_label(volume_node)
        # RGB images load as vector volumes, which derive from the tensor class in recent Slicer: allow them by name.
        rgb = volume_node.IsA("vtkMRMLVectorVolumeNode")
        if not rgb and (
            not volume_node.IsA("vtkMRMLScalarVolumeNode")
            or volume_node.IsA("vtkMRMLTensorVolumeNode")
            or volume_node.IsA("vtkMRMLDiffusionWeightedVolumeNode")
        ):
            raise InputError(f"{label} is a {volume_node.GetClassName()}: choose a grayscale or RGB image volume")
        if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{label} is a labelmap: choose the image itself")
        image_data = volume_node.GetImageData()
        if image_data is None or image_data.GetPointData().GetScalars() is None or min(image_data.GetDimensions()) < 1:
            raise InputError(f"{label} is empty (no pixels): load the image again")
        components = image_data.GetNumberOfScalarComponents()
        if components not in (1, 3):
            what = "RGBA" if components == 4 else f"{components}-component"
            raise InputError(f"{label} has {what} pixels; MedLocker protects grayscale or RGB images")
