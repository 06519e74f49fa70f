"""``MixupPrivacyLogic``: MRML nodes <-> SimpleITK images, and the calls into the ``medprivacy`` core.

SimpleITK is imported inside the methods that use it: it is a large extension module, only needed once a volume
is converted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from medprivacy.consent import normalized_server_url  # noqa: F401  (re-exported: the widget remembers consent by it)
from medprivacy.errors import InputError, MedPrivacyError
from medprivacy.labels import TISSUE_SEGMENTS
from MedPrivacySlicerCommon.mrml_geometry import LPS_TO_RAS, copy_volume_geometry, geometry_3d, ijk_to_ras, vtk_matrix

DEFAULT_SERVER_URL = "http://127.0.0.1:8765"
UNMIX_MODES = ("learned", "naive")
#: In the order of the widget's privacy combo box (privacy.LEVELS names; the first is the product's default).
PRIVACY_LEVELS = ("standard", "strong", "paper")  # the combo box order; the first is the default

# Fixed segment IDs let a second run on the same output node replace its own segments and nothing else.
_SEGMENT_IDS = {label: "MixupPrivacy_" + name.replace(" ", "_") for label, (name, _color) in TISSUE_SEGMENTS.items()}


@dataclass
class WorkerSegmentation:
    """What a worker process's private segmentation brings back: what ``apply_result`` needs, read from its files
    (the run's secrets, ``session``, stay in the worker)."""

    labelmap: Any
    uploaded: Any = None
    server_rebuild: Any = None
    stats: dict = field(default_factory=dict)


def _node_label(node) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "the selected volume"


class MixupPrivacyLogic:
    """MRML nodes <-> SimpleITK images and calls into the ``medprivacy`` core.

    Everything here takes its scene from the constructor (never ``slicer.mrmlScene``), so it runs the same in the
    application and on slicer-core. ``compute`` touches no MRML and no shared state and may run in a worker thread;
    ``compute_in_worker`` and ``generate_key_in_worker`` do the same work in a worker process (``medprivacy.worker``,
    which keeps Slicer responsive) and ``start_segmentation`` runs ``run``'s whole path that way without blocking.
    All other methods create or read MRML nodes and belong on the main thread.
    """

    def __init__(self, scene=None) -> None:
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise ValueError("MixupPrivacyLogic needs an MRML scene outside the Slicer application")
        self.scene = scene
        #: The last ``PrivateSegmentation`` put into the scene (its ``stats`` say what was sent), and the volume
        #: node of what the server received when ``show_uploaded`` was asked for, and of what a curious server could
        #: rebuild from it when ``show_rebuild`` was asked for.
        self.last_result = None
        self.last_uploaded_node = None
        self.last_rebuild_node = None

    # -- volumes -------------------------------------------------------------------------------------------

    def volume_node_to_sitk(self, volume_node):
        """Voxels and exact geometry of a 3D scalar volume node as a SimpleITK image (LPS, like files on disk).

        The node's parent transform is deliberately not applied: results come back on the same voxel grid and are
        placed under the same transform (see ``apply_result``).
        """
        import SimpleITK as sitk

        self._check_scalar_3d(volume_node)
        image_data = volume_node.GetImageData()
        dims = image_data.GetDimensions()
        # VTK stores x fastest; numpy's C order then reads (k, j, i), which is also SimpleITK's array order.
        voxels = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
        image = sitk.GetImageFromArray(np.array(voxels, copy=True))

        copy_volume_geometry(volume_node, image)
        return image

    def sitk_to_volume_node(self, image, name: str):
        """A new scalar volume node in the scene holding ``image`` (2D images become a single slice)."""
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
            raise InputError(f"cannot show {name!r}: only 2D or 3D single-channel images can be shown")
        voxels = sitk.GetArrayFromImage(image)
        spacing, origin_lps, direction_lps = geometry_3d(image)
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
        node.SetOrigin(*(LPS_TO_RAS @ origin_lps))
        direction_matrix = np.eye(4)
        direction_matrix[:3, :3] = LPS_TO_RAS @ direction_lps
        node.SetIJKToRASDirectionMatrix(vtk_matrix(direction_matrix))
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
        import SimpleITK as sitk

        labels = sitk.GetArrayFromImage(labelmap)
        unexpected = sorted(set(np.unique(labels).tolist()) - set(TISSUE_SEGMENTS) - {0})
        if unexpected:
            raise InputError(
                f"labelmap has unknown label values {unexpected}; expected 0 and {sorted(TISSUE_SEGMENTS)}"
            )

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
        oriented.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras(reference_volume_node)))
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
        geometry.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras(reference_volume_node)))
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

        return InferenceClient(url, token=token, ca_bundle=ca_bundle or None).check_connection()

    def generate_key(
        self, key_dir, progress: Callable[[str, float | None], None] | None = None, force: bool = False, **options
    ):
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
        tta: int | None = None,
        unmix: str = "learned",
        keep_uploaded: bool = False,
        progress: Callable[[str, float | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        seed: int | None = None,
        privacy: str | None = None,
        rebuild: bool = False,
    ):
        """Private segmentation of a SimpleITK image; thread-safe (builds its own client, touches no MRML). With
        ``rebuild``, the result also carries ``server_rebuild``: what the audit's placement attack recovers from
        this run's uploads (a SimpleITK image on the model grid)."""
        from medprivacy.mixup.bank import ReferenceBank
        from medprivacy.mixup.pipeline import segment_private
        from medprivacy.transport import InferenceClient

        if unmix not in UNMIX_MODES:
            raise InputError(f"unmixing mode must be one of {', '.join(UNMIX_MODES)}, not {unmix!r}")
        bank = ReferenceBank.load(key_dir or None)  # a blank folder field means the core's default key
        # A blank token field is the client's to read (it then tries MEDPRIVACY_TOKEN); a blank CA bundle field is
        # not, it would look for a file named "".
        client = InferenceClient(url, token=token, ca_bundle=ca_bundle or None)
        result = segment_private(
            input_sitk,
            client,
            bank,
            privacy=privacy,
            tta=int(tta) if tta is not None else None,
            unmix=unmix,
            seed=seed,
            keep_uploaded=keep_uploaded,
            progress=progress,
            cancel=cancel,
        )
        if rebuild:
            from medprivacy.mixup.audit.attack import server_rebuild

            result.server_rebuild = server_rebuild(result.session, bank, progress=progress, cancel=cancel)
        return result

    def apply_result(self, result, input_node, output_segmentation_node=None, show_uploaded: bool = False):
        """Put a ``PrivateSegmentation`` into the scene (main thread): tissue segments on the input's geometry, and
        optionally volumes with exactly what the server received and with what a curious server could rebuild."""
        segmentation_node = self.labelmap_to_segmentation(result.labelmap, input_node, output_segmentation_node)
        self.last_result = result
        self.last_uploaded_node = None
        self.last_rebuild_node = None
        if show_uploaded and getattr(result, "uploaded", None) is not None:
            self.last_uploaded_node = self.sitk_to_volume_node(
                result.uploaded, f"{input_node.GetName()} - sent to server"
            )
        if getattr(result, "server_rebuild", None) is not None:
            self.last_rebuild_node = self.sitk_to_volume_node(
                result.server_rebuild, f"{input_node.GetName()} - what a curious server could rebuild"
            )
        return segmentation_node

    def run(
        self,
        input_node,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int | None = None,
        unmix: str = "learned",
        output_segmentation_node=None,
        show_uploaded: bool = False,
        progress: Callable[[str, float | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        seed: int | None = None,
        privacy: str | None = None,
        show_rebuild: bool = False,
    ):
        """``compute`` + ``apply_result`` in the calling thread, for scripts and tests."""
        image = self.volume_node_to_sitk(input_node)
        result = self.compute(
            image,
            url,
            token=token,
            ca_bundle=ca_bundle,
            key_dir=key_dir,
            tta=tta,
            unmix=unmix,
            keep_uploaded=show_uploaded,
            progress=progress,
            cancel=cancel,
            seed=seed,
            privacy=privacy,
            rebuild=show_rebuild,
        )
        return self.apply_result(result, input_node, output_segmentation_node, show_uploaded=show_uploaded)

    # -- the same work in a worker process (medprivacy.worker): the GUI stays responsive -------------------------
    # Each task's request is built once, in its ``start_*`` method (main thread, returns the worker at once; the
    # panel calls these). The ``*_in_worker`` twins run the same method to its end for scripts and tests.

    def segmentation_request(
        self,
        input_path,
        folder,
        url: str,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int | None = None,
        unmix: str = "learned",
        keep_uploaded: bool = False,
        seed: int | None = None,
        privacy: str | None = None,
        rebuild: bool = False,
    ) -> dict:
        """The worker request of a private segmentation of the file ``input_path``, its outputs in ``folder``."""
        if unmix not in UNMIX_MODES:
            raise InputError(f"unmixing mode must be one of {', '.join(UNMIX_MODES)}, not {unmix!r}")
        folder = Path(folder)
        outputs = {"labelmap": str(folder / "labelmap.nrrd")}
        if keep_uploaded:
            outputs["uploaded"] = str(folder / "uploaded.nrrd")
        if rebuild:
            outputs["rebuild"] = str(folder / "rebuild.nrrd")
        options = {
            "key_dir": str(key_dir) if key_dir else None,
            "tta": None if tta is None else int(tta),
            "unmix": unmix,
            "seed": seed,
            "privacy": privacy,
        }
        return {
            "task": "mixup-segment",
            "inputs": {"image": str(input_path)},
            "outputs": outputs,
            "server": {"url": url, "ca_bundle": ca_bundle or None},
            "options": options,
        }

    @staticmethod
    def read_worker_segmentation(outputs: dict) -> WorkerSegmentation:
        import SimpleITK as sitk

        def read(name):
            return sitk.ReadImage(outputs[name]) if outputs.get(name) else None

        return WorkerSegmentation(read("labelmap"), read("uploaded"), read("rebuild"), dict(outputs.get("stats") or {}))

    def start_segmentation_of_image(
        self,
        input_sitk,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int | None = None,
        unmix: str = "learned",
        keep_uploaded: bool = False,
        seed: int | None = None,
        privacy: str | None = None,
        rebuild: bool = False,
        finish=None,
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        """Start the private segmentation of ``input_sitk`` in a worker: the image is written to a private
        temporary folder, and ``finish(outputs)`` (default: ``read_worker_segmentation``) gives ``on_done`` its
        result before the folder is removed. Returns the worker (``cancel()`` stops it)."""

        def prepare(folder: Path) -> dict:
            from medprivacy.mixup.io import write_image

            request = self.segmentation_request(
                folder / "input.nrrd",
                folder,
                url,
                ca_bundle,
                key_dir,
                tta,
                unmix,
                keep_uploaded,
                seed,
                privacy,
                rebuild,
            )  # checks before writing
            write_image(input_sitk, folder / "input.nrrd")
            return request

        from MedPrivacySlicerCommon.worker import start_task

        return start_task(
            prepare,
            finish or self.read_worker_segmentation,
            on_progress,
            on_done,
            on_error,
            token=token,
            prefix="medprivacy-mixup-",
        )

    def start_segmentation(
        self,
        input_node,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int | None = None,
        unmix: str = "learned",
        output_segmentation_node=None,
        show_uploaded: bool = False,
        seed: int | None = None,
        privacy: str | None = None,
        show_rebuild: bool = False,
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        """``run`` in a worker process, returning at once (main thread): when the worker answers, its result goes
        into the scene like ``run``'s, then ``on_done(segmentation_node)``; failures reach ``on_error(message,
        kind)``. Returns the worker: keep it until then (``cancel()`` stops it; outside the application call its
        ``poll()`` to receive the callbacks)."""
        image = self.volume_node_to_sitk(input_node)  # validates the input before anything starts
        input_id = input_node.GetID()
        output_id = output_segmentation_node.GetID() if output_segmentation_node is not None else None

        def into_scene(outputs):  # node IDs, not nodes, cross the wait: the scene may change meanwhile
            node = self.scene.GetNodeByID(input_id)
            if node is None:
                raise InputError("the input volume was removed from the scene before the result arrived")
            output = self.scene.GetNodeByID(output_id) if output_id else None
            return self.apply_result(self.read_worker_segmentation(outputs), node, output, show_uploaded)

        return self.start_segmentation_of_image(
            image,
            url,
            token,
            ca_bundle,
            key_dir,
            tta,
            unmix,
            show_uploaded,
            seed,
            privacy,
            show_rebuild,
            into_scene,
            on_progress,
            on_done,
            on_error,
        )

    def compute_in_worker(
        self,
        input_sitk,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        key_dir=None,
        tta: int | None = None,
        unmix: str = "learned",
        keep_uploaded: bool = False,
        progress: Callable[[str, float | None], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        seed: int | None = None,
        privacy: str | None = None,
        rebuild: bool = False,
    ) -> WorkerSegmentation:
        """``compute``'s arguments and a result ``apply_result`` takes, through ``start_segmentation_of_image``;
        blocks (scripts, tests). Cancel terminates the worker."""
        from MedPrivacySlicerCommon.worker import run_task

        return run_task(
            functools.partial(
                self.start_segmentation_of_image,
                input_sitk,
                url,
                token,
                ca_bundle,
                key_dir,
                tta,
                unmix,
                keep_uploaded,
                seed,
                privacy,
                rebuild,
            ),
            progress,
            cancel,
        )

    @staticmethod
    def key_request(key_dir, force: bool = False, **options) -> dict:
        """The worker request of ``generate_key`` (``options``: subjects, patches, patch_size)."""
        return {
            "task": "mixup-keygen",
            "options": {
                "key_dir": str(key_dir) if key_dir else None,
                "force": bool(force),
                **{k: v for k, v in options.items() if v is not None},
            },
        }

    def start_key_generation(
        self, key_dir, force: bool = False, on_progress=None, on_done=None, on_error=None, **options
    ):
        """Start ``generate_key`` in a worker; ``on_done(key folder)``. Returns the worker."""
        from MedPrivacySlicerCommon.worker import start_task

        return start_task(
            lambda _folder: self.key_request(key_dir, force, **options),
            lambda outputs: outputs["key_dir"],
            on_progress,
            on_done,
            on_error,
            prefix="medprivacy-mixup-",
        )

    def generate_key_in_worker(
        self,
        key_dir,
        progress: Callable[[str, float | None], None] | None = None,
        force: bool = False,
        cancel: Callable[[], bool] | None = None,
        **options,
    ):
        """``start_key_generation`` to its end (blocks; scripts, tests); returns the key."""
        from medprivacy.mixup.bank import ReferenceBank
        from MedPrivacySlicerCommon.worker import run_task

        folder = run_task(functools.partial(self.start_key_generation, key_dir, force, **options), progress, cancel)
        return ReferenceBank.load(folder)

    # -- checks --------------------------------------------------------------------------------------------

    @staticmethod
    def _check_scalar_3d(volume_node) -> None:
        if volume_node is None:
            raise InputError("no input volume selected: choose a 3D MRI volume")
        label = _node_label(volume_node)
        # Vector, tensor and diffusion volumes derive from the scalar class, hence the explicit exclusions.
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLTensorVolumeNode"):
            raise InputError(
                f"{label} is a {volume_node.GetClassName()}: choose a single-channel (scalar) 3D MRI volume"
            )
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
        import SimpleITK as sitk

        reference = sitk.Image([1, 1, 1], sitk.sitkUInt8)  # geometry carrier only
        reference_dims = reference_volume_node.GetImageData().GetDimensions()
        if image.GetDimension() != 3 or tuple(image.GetSize()) != tuple(reference_dims):
            raise InputError(
                f"labelmap size {tuple(image.GetSize())} differs from volume {_node_label(reference_volume_node)} "
                f"size {tuple(reference_dims)}"
            )
        geometry = copy_volume_geometry(reference_volume_node, reference)
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
