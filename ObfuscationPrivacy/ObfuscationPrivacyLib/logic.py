"""``ObfuscationPrivacyLogic``: MRML volume and sequence nodes <-> frames, and one core call per action.

Frames: a scalar volume node is a run whose frames are its slices along the IJK K axis (a single-slice volume, e.g.
a loaded PNG or 2D DICOM, is one frame); a sequence node holds one 2D (single-slice) volume per frame, in its
index order. The obfuscated output is a new node of the same kind, frames in the same order, covering the same
field of view at the key's frame size: the pixel spacing grows by the resize factor and the first pixel's centre
moves inside the same corner, directions and parent transform are kept. It holds exactly what would leave the
computer.

Processes: the panel runs key generation, obfuscation, classification and training in a worker process
(``medprivacy.worker``) through the ``start_*`` methods, which keeps Slicer responsive; ``generate_key``,
``obfuscate_frames``, ``classify_frames`` and ``train_from_folder`` are the same work in this process, for scripts
and the tests that check both give the same answer. Everything else belongs on the main thread. Heavy modules
(torch, MONAI, requests) are imported inside functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from medprivacy.consent import normalized_server_url  # noqa: F401  (re-exported: the widget remembers consent by it)
from medprivacy.errors import CancelledError, InputError
from MedPrivacySlicerCommon.mrml_geometry import ijk_to_ras, vtk_matrix

DEFAULT_SERVER_URL = "http://127.0.0.1:8765"
DEFAULT_TRAIN_STEPS = 1500

Progress = Callable[[str, "float | None"], None]
Cancel = Callable[[], bool]


def _node_label(node) -> str:
    return repr(node.GetName()) if node is not None and node.GetName() else "the selected input"


@dataclass
class NodeFrames:
    """The frames of a volume or sequence node: ``pixels`` (T, H, W) in the node's scalar type, and the geometry of
    the first frame (IJK to RAS of a volume whose K axis runs through the frames)."""

    pixels: np.ndarray
    ijk_to_ras: np.ndarray
    transform_id: str | None
    name: str
    sequence: bool
    index_values: list | None = None
    index_name: str = ""
    index_unit: str = ""


def volume_voxels(volume_node) -> np.ndarray:
    """A scalar volume node's voxels as a (K, J, I) numpy view (VTK stores I fastest)."""
    image_data = volume_node.GetImageData()
    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(image_data.GetDimensions()[::-1])


class ObfuscationPrivacyLogic:
    """ObfuscationPrivacy on MRML nodes; the scene comes from the constructor (never ``slicer.mrmlScene``), so it runs
    the same in the application and on slicer-core. ``models_dir`` points at the shipped weights (the VAE keygen
    copies), default ``Resources/Models``."""

    def __init__(self, scene=None, models_dir=None) -> None:
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
            if scene is None:
                raise ValueError("ObfuscationPrivacyLogic needs an MRML scene outside the Slicer application")
        self.scene = scene
        self.models_dir = models_dir
        #: Extra ``ObfuscationClient`` settings (timeouts, retries).
        self.client_options: dict[str, Any] = {}

    # -- key (worker-safe) --------------------------------------------------------------------------------------

    def generate_key(
        self,
        key_dir,
        force: bool = False,
        vae_from=None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ):
        """Create the site key folder (``medprivacy obfuscate keygen``); returns its one-line description."""
        from medprivacy.obfuscation.keygen import create_site_key

        if not key_dir:
            raise InputError("choose a folder for the obfuscation key")
        key = create_site_key(
            key_dir, force=force, vae_from=vae_from, models_dir=self.models_dir, progress=progress, cancel=cancel
        )
        return key.describe()

    @staticmethod
    def describe_key(key_dir) -> str:
        from medprivacy.obfuscation.key import SiteKey

        if not key_dir:
            raise InputError("choose the obfuscation key folder, or generate a key")
        return SiteKey.load(key_dir).describe()

    # -- nodes <-> frames (main thread) -------------------------------------------------------------------------

    def node_to_frames(self, node) -> NodeFrames:
        """The frames of a scalar volume node (frames along K) or a sequence node of single-slice scalar volumes."""
        if node is None:
            raise InputError("no input selected: choose a volume (a frame or a run) or a sequence of 2D frames")
        if node.IsA("vtkMRMLSequenceNode"):
            return self._sequence_frames(node)
        self._check_volume(node)
        return NodeFrames(
            np.array(volume_voxels(node), copy=True),
            ijk_to_ras(node),
            node.GetTransformNodeID(),
            node.GetName() or "frames",
            sequence=False,
        )

    def _sequence_frames(self, node) -> NodeFrames:
        count = node.GetNumberOfDataNodes()
        if count == 0:
            raise InputError(f"sequence {_node_label(node)} is empty: record or load its frames first")
        frames, geometry, values = [], None, []
        for index in range(count):
            item = node.GetNthDataNode(index)
            if item is None or not item.IsA("vtkMRMLScalarVolumeNode"):
                raise InputError(
                    f"sequence {_node_label(node)} holds {item.GetClassName() if item else 'nothing'} items; "
                    "choose a sequence of 2D image volumes"
                )
            self._check_volume(item)
            voxels = volume_voxels(item)
            if voxels.shape[0] != 1:
                raise InputError(
                    f"item {index} of sequence {_node_label(node)} is a 3D volume with {voxels.shape[0]} slices; "
                    "a sequence for ObfuscationPrivacy holds 2D frames"
                )
            if frames and voxels.shape[1:] != frames[0].shape:
                raise InputError(
                    f"the frames of sequence {_node_label(node)} differ in size "
                    f"({frames[0].shape} and {voxels.shape[1:]})"
                )
            frames.append(np.array(voxels[0], copy=True))
            geometry = ijk_to_ras(item) if geometry is None else geometry
            values.append(node.GetNthIndexValue(index))
        return NodeFrames(
            np.stack(frames),
            geometry,
            None,
            node.GetName() or "sequence",
            sequence=True,
            index_values=values,
            index_name=node.GetIndexName(),
            index_unit=node.GetIndexUnit(),
        )

    @staticmethod
    def _check_volume(node) -> None:
        label = _node_label(node)
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{label} is a labelmap: choose the image itself")
        if (
            not node.IsA("vtkMRMLScalarVolumeNode")
            or node.IsA("vtkMRMLVectorVolumeNode")
            or node.IsA("vtkMRMLTensorVolumeNode")
            or node.IsA("vtkMRMLDiffusionWeightedVolumeNode")
        ):
            raise InputError(
                f"{label} is a {node.GetClassName()}: ObfuscationPrivacy works on gray frames (a scalar volume)"
            )
        image_data = node.GetImageData()
        if image_data is None or image_data.GetPointData().GetScalars() is None or min(image_data.GetDimensions()) < 1:
            raise InputError(f"{label} is empty (no pixels): load the image again")
        if image_data.GetNumberOfScalarComponents() != 1:
            raise InputError(
                f"{label} has {image_data.GetNumberOfScalarComponents()} components per pixel: choose a gray image"
            )

    def frames_to_node(self, codes: np.ndarray, source: NodeFrames, name: str | None = None):
        """A new node with the obfuscated frames (T, h, w) uint8 over the source's field of view: a volume for a
        volume input, a sequence of 2D volumes (same index values) for a sequence input."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.dtype != np.uint8 or codes.shape[0] != source.pixels.shape[0]:
            raise InputError(
                f"expected {source.pixels.shape[0]} obfuscated uint8 frames, got {codes.dtype} {codes.shape}"
            )
        matrix = self.obfuscated_ijk_to_ras(source.ijk_to_ras, source.pixels.shape[1:], codes.shape[1:])
        name = name or f"{source.name} obfuscated"
        if not source.sequence:
            node = self._volume(codes, matrix, name)
            node.SetAndObserveTransformNodeID(source.transform_id)
            return node
        sequence = self.scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        sequence.SetIndexName(source.index_name)
        sequence.SetIndexUnit(source.index_unit)
        for value, frame in zip(source.index_values, codes):
            item = self._volume(frame[None], matrix, f"{name} {value}", add=False)
            sequence.SetDataNodeAtValue(item, value)
        return sequence

    def _volume(self, voxels: np.ndarray, matrix: np.ndarray, name: str, add: bool = True):
        node = (
            self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) if add else slicer.vtkMRMLScalarVolumeNode()
        )
        if not add:
            node.SetName(name)
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
        image_data.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).reshape(-1, 1), deep=True)
        )
        node.SetAndObserveImageData(image_data)
        node.SetIJKToRASMatrix(vtk_matrix(matrix))
        if add:
            node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def obfuscated_ijk_to_ras(matrix: np.ndarray, shape_in, shape_out) -> np.ndarray:
        """IJK to RAS of frames resized from (H, W) to (h, w) over the same field of view (K unchanged)."""
        (height, width), (rows, cols) = shape_in, shape_out
        out = np.array(matrix, dtype=np.float64, copy=True)
        factors = np.array([width / cols, height / rows])
        out[:3, :2] = matrix[:3, :2] * factors
        # Voxel (0, 0) of the output is centred half an output pixel inside the input's outer corner.
        out[:3, 3] = matrix[:3, 3] + matrix[:3, :2] @ ((factors - 1.0) / 2.0)
        return out

    # -- server and transform (worker-safe) ---------------------------------------------------------------------

    def client(self, url: str, token: str | None = None, ca_bundle: str | None = None):
        from medprivacy.transport.obfuscation_client import ObfuscationClient

        return ObfuscationClient(url, token=token, ca_bundle=ca_bundle, **self.client_options)

    def test_connection(self, url: str, token: str | None = None, ca_bundle: str | None = None) -> str:
        client = self.client(url, token, ca_bundle)
        try:
            line = client.check_connection()
            if "obfuscation" not in (client._server_info or {}):
                raise InputError(f"{client.url} is a MedPrivacy server without the obfuscation endpoints; update it")
            return f"{line}; {len(client.models())} obfuscation model(s)"
        finally:
            client.close()

    def list_models(self, url: str, token: str | None = None, ca_bundle: str | None = None, key_dir=None) -> list:
        """The server's obfuscation models; with ``key_dir`` only those trained with that key."""
        client = self.client(url, token, ca_bundle)
        try:
            models = client.models()
        finally:
            client.close()
        if key_dir:
            from medprivacy.obfuscation.key import SiteKey

            key_id = SiteKey.load(key_dir).key_id
            models = [m for m in models if m.get("key_id") == key_id]
        return models

    @staticmethod
    def obfuscate_frames(pixels: np.ndarray, key_dir, progress: Progress | None = None) -> tuple[np.ndarray, str]:
        """(codes (T, h, w) uint8, key id) of frames (T, H, W) under the key in ``key_dir``."""
        from medprivacy.obfuscation.key import SiteKey
        from medprivacy.obfuscation.transform import Obfuscator

        key = SiteKey.load(key_dir) if key_dir else None
        if key is None:
            raise InputError("choose the obfuscation key folder, or generate a key")
        report = None
        if progress is not None:

            def report(done, total):
                progress(f"obfuscating frame {done}/{total}", done / max(1, total))

        return Obfuscator(key).obfuscate(pixels, report), key.key_id

    def classify_frames(
        self,
        pixels: np.ndarray,
        key_dir,
        url: str,
        model: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> dict:
        """Obfuscate frames here and classify them on the server: {"classes", "probabilities" (T, C), "predicted"}."""
        if not model:
            raise InputError("choose a model trained with this key (refresh the list from the server)")
        codes, key_id = self.obfuscate_frames(pixels, key_dir, progress)
        if cancel is not None and cancel():
            raise CancelledError("classification cancelled")
        if progress is not None:
            progress("classifying on the server", 0.9)
        client = self.client(url, token, ca_bundle)
        try:
            return client.classify(codes, model, key_id)
        finally:
            client.close()

    def train_from_folder(
        self,
        dataset,
        key_dir,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        steps: int = DEFAULT_TRAIN_STEPS,
        name: str = "",
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> dict:
        """Obfuscate a labelled dataset (folder per class, or CSV) and train on the server; cancel cancels the job
        there too. Returns the finished job (its ``model`` is the new model id)."""
        from medprivacy.obfuscation.dataset import dataset_files, train_on_server
        from medprivacy.obfuscation.key import SiteKey

        if not dataset:
            raise InputError("choose the dataset folder (one subfolder per class)")
        dataset_files(dataset)  # a bad dataset is named before the key or the server
        if not key_dir:
            raise InputError("choose the obfuscation key folder, or generate a key")
        key = SiteKey.load(key_dir)
        client = self.client(url, token, ca_bundle)
        try:
            return train_on_server(dataset, key, client, steps, name, progress, cancel)
        finally:
            client.close()

    # -- the same work in a worker process (medprivacy.worker): the GUI stays responsive -------------------------
    # Each task's request is built once, in its ``start_*`` method (main thread; returns the worker at once, whose
    # ``cancel()`` terminates it; the panel calls these). ``on_done`` gets the result of the in-process method above.
    # The ``*_in_worker`` twins run the same ``start_*`` to its end for scripts and tests.

    def _start(
        self, task: str, options: dict, finish, callbacks: dict, frames=None, url=None, token=None, ca_bundle=None
    ):
        from MedPrivacySlicerCommon.worker import start_task

        def prepare(folder: Path) -> dict:
            request = {
                "task": task,
                "inputs": {},
                "outputs": {},
                "options": options,
                "server": {"url": url, "ca_bundle": ca_bundle or None},
            }
            if frames is not None:
                np.save(folder / "frames.npy", np.ascontiguousarray(frames), allow_pickle=False)
                request["inputs"]["frames"] = str(folder / "frames.npy")
                request["outputs"]["codes"] = str(folder / "codes.npy")
            return request

        return start_task(prepare, finish, token=token, prefix="medprivacy-obfuscation-", **callbacks)

    def start_key_generation(
        self, key_dir, force: bool = False, vae_from=None, on_progress=None, on_done=None, on_error=None
    ):
        options = {
            "key_dir": str(key_dir) if key_dir else None,
            "force": bool(force),
            "vae_from": vae_from,
            "models_dir": str(self.models_dir) if self.models_dir else None,
        }
        return self._start(
            "obfuscation-keygen",
            options,
            lambda outputs: outputs["description"],
            dict(on_progress=on_progress, on_done=on_done, on_error=on_error),
        )

    def start_obfuscation(self, pixels: np.ndarray, key_dir, on_progress=None, on_done=None, on_error=None):
        def read(outputs):
            return np.load(outputs["codes"], allow_pickle=False), outputs["key_id"]

        return self._start(
            "obfuscation-apply",
            {"key_dir": str(key_dir) if key_dir else None},
            read,
            dict(on_progress=on_progress, on_done=on_done, on_error=on_error),
            frames=pixels,
        )

    def start_classification(
        self,
        pixels: np.ndarray,
        key_dir,
        url: str,
        model: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        def read(answer):
            answer["probabilities"] = np.asarray(answer["probabilities"], dtype=np.float64)
            answer["predicted"] = np.asarray(answer["predicted"])
            return answer

        options = {"key_dir": str(key_dir) if key_dir else None, "model": model}
        return self._start(
            "obfuscation-classify",
            options,
            read,
            dict(on_progress=on_progress, on_done=on_done, on_error=on_error),
            frames=pixels,
            url=url,
            token=token,
            ca_bundle=ca_bundle,
        )

    def start_training(
        self,
        dataset,
        key_dir,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        steps: int = DEFAULT_TRAIN_STEPS,
        name: str = "",
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        options = {
            "dataset": str(dataset) if dataset else None,
            "key_dir": str(key_dir) if key_dir else None,
            "steps": int(steps or DEFAULT_TRAIN_STEPS),
            "name": name or "",
        }
        return self._start(
            "obfuscation-train",
            options,
            lambda outputs: outputs["job"],
            dict(on_progress=on_progress, on_done=on_done, on_error=on_error),
            url=url,
            token=token,
            ca_bundle=ca_bundle,
        )

    @staticmethod
    def _run(start, progress: Progress | None, cancel: Cancel | None):
        from MedPrivacySlicerCommon.worker import run_task

        return run_task(start, progress, cancel)

    def generate_key_in_worker(
        self,
        key_dir,
        force: bool = False,
        vae_from=None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> str:
        return self._run(functools.partial(self.start_key_generation, key_dir, force, vae_from), progress, cancel)

    def obfuscate_frames_in_worker(
        self, pixels: np.ndarray, key_dir, progress: Progress | None = None, cancel: Cancel | None = None
    ) -> tuple[np.ndarray, str]:
        return self._run(functools.partial(self.start_obfuscation, pixels, key_dir), progress, cancel)

    def classify_frames_in_worker(
        self,
        pixels: np.ndarray,
        key_dir,
        url: str,
        model: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> dict:
        return self._run(
            functools.partial(self.start_classification, pixels, key_dir, url, model, token, ca_bundle),
            progress,
            cancel,
        )

    def train_from_folder_in_worker(
        self,
        dataset,
        key_dir,
        url: str,
        token: str | None = None,
        ca_bundle: str | None = None,
        steps: int = DEFAULT_TRAIN_STEPS,
        name: str = "",
        progress: Progress | None = None,
        cancel: Cancel | None = None,
    ) -> dict:
        return self._run(
            functools.partial(self.start_training, dataset, key_dir, url, token, ca_bundle, steps, name),
            progress,
            cancel,
        )

    # -- results (main thread) ----------------------------------------------------------------------------------

    def results_table(self, answer: dict, name: str = "Obfuscated classification", frame_labels=None):
        """A table node: one row per frame with the predicted class and each class's probability."""
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        classes = [str(c) for c in answer["classes"]]
        probabilities = np.asarray(answer["probabilities"], dtype=np.float64)
        columns = [("frame", vtk.vtkStringArray()), ("class", vtk.vtkStringArray())] + [
            (c, vtk.vtkDoubleArray()) for c in classes
        ]
        for title, array in columns:
            array.SetName(title)
        for index, (predicted, row) in enumerate(zip(answer["predicted"], probabilities)):
            columns[0][1].InsertNextValue(str(frame_labels[index]) if frame_labels is not None else str(index))
            columns[1][1].InsertNextValue(classes[int(predicted)])
            for (_, array), value in zip(columns[2:], row):
                array.InsertNextValue(float(value))
        for _, array in columns:
            table.AddColumn(array)
        return table
