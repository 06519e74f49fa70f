"""Test bodies shared by the in-application self-test (``MedLockerWatermarkTest``) and pytest on slicer-core.

Bodies that need a server take its URL: under pytest a real ``medprivacy serve`` with tiny untrained models (they
test mechanics, not watermark strength), in the application a server named by MEDLOCKER_TEST_SERVER_URL. A tiny
search (population 4, one generation, one local iteration) keeps each protection under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer  # noqa: F401  (the MRML classes the scene creates come from here)
import vtk
from vtk.util import numpy_support

from medprivacy.errors import CancelledError, InputError, ServerError
from MedPrivacySlicerCommon.testing import FakeWorker, PanelTestMixin

from .logic import MedLockerWatermarkLogic, ijk_to_ras, voxel_array

PASSPHRASE = "correct horse battery staple"
#: Cheap scrypt for keys written by tests (the default 2^17 costs about half a second per open on a fast core).
TEST_SCRYPT_LOG2_N = 12


def tiny_search(**overrides):
    from medprivacy.watermark.batch import SearchSettings

    options = dict(
        population=4,
        generations=1,
        local_iterations=1,
        seed=0,
        models=["wm-cls-resnet18", "wm-cls-vit"],
        weights=[0.7, 0.3],
    )
    options.update(overrides)
    return SearchSettings(**options)


class FakeProtection:
    """What ``FakeMedLockerWatermarkLogic.apply_protection`` returns, shaped like ``ProtectionResult``."""

    def __init__(self, name, output_node) -> None:
        self.name, self.output_node = name, output_node

    def prediction_lines(self) -> list[str]:
        return ["fake prediction"]


class FakeMedLockerWatermarkLogic:
    """Stands in for ``MedLockerWatermarkLogic`` (``protocols.MedLockerWatermarkLogicProtocol``) in the panel's
    in-app tests: records each call and answers at once, without a server."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.calls: list[tuple] = []
        self.key: list[str] = []
        self.key_path = None
        self.unsaved = 0

    def slice_count(self, volume_node) -> int:
        return 1

    def slice_index_at(self, volume_node, ras) -> int:
        return 0

    def load_logo(self, path=None):
        return "logo"

    def prepare_protection(
        self,
        volume_node,
        slice_index=None,
        logo=None,
        settings=None,
        lesion_source="server",
        segmentation_node=None,
        segment_ids=None,
    ):
        if volume_node is None:
            raise InputError("no input image: select one")
        self.calls.append(("prepare_protection", volume_node.GetID(), slice_index, lesion_source))
        return "image", logo, settings, None

    def compute_protection(
        self,
        image,
        logo,
        settings,
        url,
        token=None,
        ca_bundle=None,
        lesion_source="server",
        mask=None,
        progress=None,
        cancel=None,
    ):
        self.calls.append(("compute_protection", image, url, settings, lesion_source))
        return "computed"

    def apply_protection(self, computed, reference_node, name=None):
        self.calls.append(("apply_protection", computed, reference_node.GetID()))
        self.key.append("protected")
        self.unsaved += 1
        return FakeProtection("protected", self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "protected"))

    def test_connection(self, url, token=None, ca_bundle=None) -> str:
        self.calls.append(("test_connection", url))
        return "fake server"

    def list_models(self, url, token=None, ca_bundle=None):
        self.calls.append(("list_models", url))
        return {"cls-a": {}, "cls-b": {}}, {}

    def export_key(self, path, passphrase=None, key_file=None, **options):
        self.calls.append(("export_key", path))

    def load_key(self, path, passphrase=None, key_file=None):
        self.calls.append(("load_key", path))

    def new_key(self) -> None:
        self.key, self.unsaved = [], 0

    def generate_key_file(self, path):
        self.calls.append(("generate_key_file", path))

    def verify(self, volume_node, slice_index=None):
        self.calls.append(("verify", volume_node.GetID(), slice_index))

    def unlock(self, volume_node, slice_index=None, name=None):
        self.calls.append(("unlock", volume_node.GetID(), slice_index))
        return self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "restored")

    def start_folder_protection(
        self, input_dir, output_dir, key_path, url, *, on_progress=None, on_done=None, on_error=None, **options
    ):
        from .logic import DatasetResult

        self.calls.append(("start_folder_protection", input_dir, output_dir, key_path, url, options))
        result = DatasetResult(
            protected=2, output_dir=Path(output_dir), key_path=Path(key_path), reports=["fake report"]
        )
        return FakeWorker(lambda: result, on_progress, on_done, on_error)


class MedLockerWatermarkTestMixin(PanelTestMixin):
    """Test bodies that take the scene (and a server URL) to work in; the host class must be a ``unittest.TestCase``.

    No method name here contains "test": ``ScriptedLoadableModuleTest`` runs every such method, and these need
    arguments. Volumes carry an oblique direction, anisotropic spacing and a non-zero origin.
    """

    DIRECTIONS_RAS = (
        (0.8660254037844387, -0.25, 0.4330127018922193),
        (0.25, 0.9665063509461097, 0.05801270189221941),
        (-0.4330127018922193, 0.05801270189221941, 0.8995190528383291),
    )
    SPACING = (0.4, 0.6, 2.5)
    ORIGIN_RAS = (-12.5, 30.25, 7.75)

    # -- helpers --------------------------------------------------------------------------------------------------

    def make_volume(self, scene, voxels: np.ndarray, name: str = "image", rgb: bool = False):
        """A volume node holding ``voxels`` (K, J, I) or (K, J, I, 3) with the oblique test geometry."""
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", name)
        components = voxels.shape[3] if voxels.ndim == 4 else 1
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
        image_data.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).reshape(-1, components), deep=True)
        )
        node.SetAndObserveImageData(image_data)
        node.SetSpacing(*self.SPACING)
        node.SetOrigin(*self.ORIGIN_RAS)
        directions = np.eye(4)
        directions[:3, :3] = self.DIRECTIONS_RAS
        matrix = vtk.vtkMatrix4x4()
        for row in range(4):
            for col in range(4):
                matrix.SetElement(row, col, directions[row, col])
        node.SetIJKToRASDirectionMatrix(matrix)
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def sample_pixels(kind: str, shape=(48, 64)) -> np.ndarray:
        """Deterministic, textured 2D pictures: "gray8", "gray16", "rgb" (a single slice each, (1, H, W[, 3]))."""
        rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
        texture = (np.sin(rows / 3.0) + np.cos(cols / 5.0) + 2.0) / 4.0
        if kind == "gray8":
            return np.rint(255 * texture).astype(np.uint8)[None]
        if kind == "gray16":
            return np.rint(60000 * texture + 7).astype(np.uint16)[None]
        if kind == "rgb":
            return np.stack(
                [np.rint(255 * texture), np.rint(255 * texture[::-1]), np.full(shape, 90.0)], axis=-1
            ).astype(np.uint8)[None]
        raise ValueError(kind)

    def assert_one_line(self, error: Exception, *fragments: str) -> None:
        message = str(error)
        self.assertTrue(message and "\n" not in message, repr(message))
        for fragment in fragments:
            self.assertIn(fragment, message)

    # -- volumes <-> 2D images (no server) ------------------------------------------------------------------------

    def check_slices_round_trip(self, scene):
        logic = MedLockerWatermarkLogic(scene)
        for kind in ("gray8", "gray16", "rgb"):
            voxels = self.sample_pixels(kind)
            node = self.make_volume(scene, voxels, kind, rgb=kind == "rgb")
            image = logic.node_to_image(node)
            np.testing.assert_array_equal(image.pixels, voxels[0])
            copy = logic.image_to_node(image.pixels, image.source_dtype, node, image.slice_index, f"{kind} copy")
            self.assertEqual(copy.GetClassName(), node.GetClassName())
            self.assertEqual(voxel_array(copy).dtype, voxels.dtype)
            np.testing.assert_array_equal(voxel_array(copy), voxels)
            np.testing.assert_allclose(ijk_to_ras(copy), ijk_to_ras(node), rtol=0, atol=1e-9)

        # Signed CT-like voxels: shifted into MedLocker's unsigned range and back without loss.
        ct = (np.arange(5 * 20 * 24).reshape(5, 20, 24) * 37 % 4000 - 1024).astype(np.int16)
        volume = self.make_volume(scene, ct, "ct")
        image = logic.node_to_image(volume, 3)
        self.assertEqual(image.pixels.dtype, np.uint16)
        self.assertEqual(image.source_dtype, np.int16)
        single = logic.image_to_node(image.pixels, image.source_dtype, volume, 3, "ct slice 3")
        np.testing.assert_array_equal(voxel_array(single)[0], ct[3])
        # The single slice lies where slice 3 of the volume lies: its voxel (i, j, 0) is the volume's (i, j, 3).
        for index in [(0, 0), (23, 0), (0, 19), (23, 19)]:
            np.testing.assert_allclose(
                ijk_to_ras(single) @ np.array([*index, 0, 1.0]),
                ijk_to_ras(volume) @ np.array([*index, 3, 1.0]),
                rtol=0,
                atol=1e-9,
            )

        # The slice through a point (the Red view's centre in the widget), clamped to the volume.
        for k in range(5):
            self.assertEqual(logic.slice_index_at(volume, ijk_to_ras(volume) @ np.array([7, 4, k + 0.3, 1.0])), k)
        self.assertEqual(logic.slice_index_at(volume, ijk_to_ras(volume) @ np.array([0, 0, 40, 1.0])), 4)

    def check_rejects_unusable_inputs(self, scene, unreachable_url: str):
        logic = MedLockerWatermarkLogic(scene)
        logic.client_options = {"retries": 0, "connect_timeout": 2.0}
        empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        rgba = self.make_volume(scene, np.zeros((1, 8, 8, 4), np.uint8), "rgba", rgb=True)
        floats = self.make_volume(scene, np.zeros((1, 8, 8), np.float32), "floats")
        labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        labels.SetAndObserveImageData(vtk.vtkImageData())
        volume = self.make_volume(scene, np.zeros((4, 8, 8), np.uint8), "volume")
        for node, slice_index, fragment in [
            (None, None, "no input image"),
            (empty, None, "empty"),
            (rgba, None, "RGBA"),
            (floats, None, "float32"),
            (labels, None, "labelmap"),
            (volume, None, "choose the slice"),
            (volume, 4, "slices 0 to 3"),
        ]:
            with self.assertRaises(InputError) as raised:
                logic.node_to_image(node, slice_index)
            self.assert_one_line(raised.exception, fragment)

        gray = self.make_volume(scene, self.sample_pixels("gray8"), "gray")
        with self.assertRaises(InputError) as raised:  # sl < 1: the logo would be larger than the image
            logic.prepare_protection(gray, settings=tiny_search(sl=0.5))
        self.assert_one_line(raised.exception, "larger than the image")
        with self.assertRaises(InputError) as raised:
            logic.prepare_protection(gray, settings=tiny_search(mode="keep-in"), lesion_source="none")
        self.assert_one_line(raised.exception, "keep-in")
        with self.assertRaises(InputError) as raised:
            logic.prepare_protection(gray, settings=tiny_search(), lesion_source="segmentation", segmentation_node=None)
        self.assert_one_line(raised.exception, "segmentation")
        with self.assertRaises(ServerError) as raised:
            logic.protect(gray, unreachable_url, settings=tiny_search(mode="wap"))
        self.assert_one_line(raised.exception, "cannot reach")
        self.assertEqual(len(logic.key), 0, "a failed protection must not enter the key")

    # -- protect / unlock / verify / key (server) ------------------------------------------------------------------

    def check_protect_unlock_bit_exact(self, scene, url: str, folder):
        from medprivacy.watermark.keyfile import load_key

        logic = MedLockerWatermarkLogic(scene)
        nodes = {}
        for kind in ("gray8", "gray16", "rgb"):
            voxels = self.sample_pixels(kind)
            node = self.make_volume(scene, voxels, kind, rgb=kind == "rgb")
            stages = []
            result = logic.protect(
                node,
                url,
                settings=tiny_search(mode="wap"),
                lesion_source="none",
                progress=lambda text, fraction=None, stages=stages: stages.append(text),
            )
            self.assertTrue(stages)
            nodes[kind] = (node, result)
            entry = logic.key[result.name]
            self.assertEqual(result.name, kind)
            self.assertEqual(
                (entry.alpha, entry.x, entry.y), (result.params["alpha"], result.params["x"], result.params["y"])
            )

            # The watermark changes the image inside the logo region only, and does change it there.
            protected = voxel_array(result.output_node)
            self.assertEqual(protected.dtype, voxels.dtype)
            outside = np.ones(voxels.shape[1:3], dtype=bool)
            outside[entry.region] = False
            np.testing.assert_array_equal(protected[0][outside], voxels[0][outside])
            self.assertFalse(np.array_equal(protected[0][entry.region], voxels[0][entry.region]))
            np.testing.assert_allclose(ijk_to_ras(result.output_node), ijk_to_ras(node), rtol=0, atol=1e-9)

            # Predictions of every source model before and after, and the search history, come back.
            self.assertEqual(sorted(result.answer["before"]), ["wm-cls-resnet18", "wm-cls-vit"])
            self.assertEqual(sorted(result.answer["after"]), ["wm-cls-resnet18", "wm-cls-vit"])
            self.assertEqual(result.answer["weights"], [0.7, 0.3])
            self.assertTrue(result.history)
            lines = result.prediction_lines()  # verdict, the target searched away from, one line per model
            self.assertEqual(len(lines), 4)
            self.assertTrue(lines[1].startswith("target: away from"), lines[1])
            self.assertIsNone(result.segmentation_node)  # wap: no lesion mask
            self.assertEqual(result.roi_nodes, [])

            # verify: the protected image belongs to the key, the original does not; unlock is bit-exact.
            self.assertEqual(logic.verify(result.output_node).name, kind)
            self.assertIsNone(logic.verify(node))
            restored = logic.unlock(result.output_node)
            self.assertEqual(voxel_array(restored).dtype, voxels.dtype)
            np.testing.assert_array_equal(voxel_array(restored), voxels)
            with self.assertRaises(InputError) as raised:
                logic.unlock(node)
            self.assert_one_line(raised.exception, "not protected by the current key")
        self.assertEqual(logic.unsaved, 3)

        # Export, then a fresh session (another logic) loads the key and unlocks the same nodes.
        key_path = Path(folder) / "session.mlkey"
        logic.export_key(key_path, passphrase=PASSPHRASE, scrypt_log2_n=TEST_SCRYPT_LOG2_N)
        self.assertEqual(logic.unsaved, 0)
        if os.name == "posix":
            self.assertEqual(key_path.stat().st_mode & 0o777, 0o600)
        other = MedLockerWatermarkLogic(scene)
        self.assertEqual(sorted(other.load_key(key_path, passphrase=PASSPHRASE).names()), ["gray16", "gray8", "rgb"])
        for kind, (node, result) in nodes.items():
            self.assertEqual(other.verify(result.output_node).name, kind)
            np.testing.assert_array_equal(voxel_array(other.unlock(result.output_node)), voxel_array(node))
        with self.assertRaises(InputError) as raised:
            MedLockerWatermarkLogic(scene).load_key(key_path, passphrase="wrong " + PASSPHRASE)
        self.assert_one_line(raised.exception, "wrong passphrase")
        self.assertEqual(len(load_key(key_path, passphrase=PASSPHRASE)), 3)

        # A key file instead of a passphrase works the same way.
        secret = logic.generate_key_file(Path(folder) / "secret.bin")
        logic.export_key(Path(folder) / "by-file.mlkey", key_file=secret)
        self.assertEqual(
            len(MedLockerWatermarkLogic(scene).load_key(Path(folder) / "by-file.mlkey", key_file=secret)), 3
        )

    def check_volume_slice(self, scene, url: str):
        logic = MedLockerWatermarkLogic(scene)
        ct = (np.arange(4 * 40 * 48).reshape(4, 40, 48) * 53 % 300 - 100).astype(np.int16)
        volume = self.make_volume(scene, ct, "ct volume")
        display = volume.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(400, 40)  # shows -160..240 HU
        result = logic.protect(volume, url, slice_index=2, settings=tiny_search(mode="keep-out"), lesion_source="none")
        # The logo spans the displayed window, not int16's range: its white is 240 HU, not 32767.
        entry = logic.key[result.name]
        self.assertEqual(entry.window, (32768 - 160, 32768 + 240))
        self.assertLessEqual(int(voxel_array(result.output_node)[0][entry.region].max()), 240)
        output = result.output_node
        self.assertEqual(result.name, "ct volume slice 2")
        self.assertEqual(output.GetName(), "ct volume slice 2 protected")
        self.assertEqual(output.GetImageData().GetDimensions(), (48, 40, 1))
        self.assertEqual(voxel_array(output).dtype, np.int16)
        np.testing.assert_allclose(
            ijk_to_ras(output) @ np.array([0, 0, 0, 1.0]),
            ijk_to_ras(volume) @ np.array([0, 0, 2, 1.0]),
            rtol=0,
            atol=1e-9,
        )
        outside = np.ones(ct.shape[1:], dtype=bool)
        outside[entry.region] = False
        np.testing.assert_array_equal(voxel_array(output)[0][outside], ct[2][outside])
        # The volume's slice 2 itself is not the protected image; the output is, and it unlocks to that slice.
        self.assertIsNone(logic.verify(volume, 2))
        np.testing.assert_array_equal(voxel_array(logic.unlock(output))[0], ct[2])

    def check_keep_out_respects_segmentation(self, scene, url: str):
        """A lesion drawn in a segmentation node: keep-out keeps the logo off its box, keep-in puts it on it."""
        logic = MedLockerWatermarkLogic(scene)
        pixels = self.sample_pixels("gray8", shape=(64, 64))
        node = self.make_volume(scene, pixels, "fundus")
        lesion = np.zeros(pixels.shape, dtype=np.uint8)
        lesion[0, 36:46, 30:44] = 1  # rows 36..45, columns 30..43: box (30, 36, 14, 10)
        lesion[0, 10, 50] = 1  # a speck below the minimum region area: ignored, as in the paper
        # The user's segmentation, made the way Slicer imports a labelmap (not through the code under test).
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion labels")
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(64, 64, 1)
        image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(lesion.ravel(), deep=True))
        labelmap.SetAndObserveImageData(image_data)
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesions")
        self.assertTrue(
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node)
        )
        np.testing.assert_array_equal(logic.segmentation_to_mask(segmentation_node, node), lesion[0] != 0)

        for mode, seed in (("keep-out", 0), ("keep-out", 1), ("keep-in", 2)):
            result = logic.protect(
                node,
                url,
                settings=tiny_search(mode=mode, seed=seed),
                lesion_source="segmentation",
                segmentation_node=segmentation_node,
            )
            self.assertEqual(result.answer["lesion_source"], "mask")
            self.assertEqual(result.answer["lesion_boxes"], [[30, 36, 14, 10]])
            entry = logic.key[result.name]
            rows, cols = entry.region
            overlaps = rows.start < 46 and 36 < rows.stop and cols.start < 44 and 30 < cols.stop
            self.assertEqual(overlaps, mode == "keep-in", f"{mode}: logo at rows {rows}, columns {cols}")

            # The mask that constrained the logo is shown on the output, and the box as a markups ROI over exactly
            # its pixels.
            self.assertIsNotNone(result.segmentation_node)
            segmentation = result.segmentation_node.GetSegmentation()
            self.assertEqual(segmentation.GetNthSegment(0).GetName(), "Lesion")
            np.testing.assert_array_equal(
                logic.segmentation_to_mask(result.segmentation_node, result.output_node), lesion[0] != 0
            )
            self.assertEqual(len(result.roi_nodes), 1)
            roi = result.roi_nodes[0]
            self.assertTrue(roi.IsA("vtkMRMLMarkupsROINode"))
            ras_to_ijk = np.linalg.inv(ijk_to_ras(result.output_node))
            center = (ras_to_ijk @ np.array([*roi.GetCenter(), 1.0]))[:3]
            np.testing.assert_allclose(center, [30 + 6.5, 36 + 4.5, 0], atol=1e-6)
            np.testing.assert_allclose(
                roi.GetSize(), [14 * self.SPACING[0], 10 * self.SPACING[1], self.SPACING[2]], atol=1e-6
            )

    def check_server_lesions(self, scene, url: str):
        """Lesions from the server's segmenter: the overlay is the very mask the search was constrained by."""
        from medprivacy.transport.watermark_client import WatermarkClient
        from medprivacy.watermark.blending import unit_view
        from medprivacy.watermark.boxes import MaskParams, lesion_boxes

        logic = MedLockerWatermarkLogic(scene)
        pixels = self.sample_pixels("rgb", shape=(64, 64))
        node = self.make_volume(scene, pixels, "photo", rgb=True)
        result = logic.protect(node, url, settings=tiny_search(mode="wap", sl=8), lesion_source="server")
        self.assertIsNone(result.segmentation_node)  # wap ignores lesions, so none is asked for
        with WatermarkClient(url) as client:
            expected = client.lesions(unit_view(pixels[0])) >= 0.5
        boxes = lesion_boxes(expected, MaskParams.for_image(expected.shape))
        # The tiny untrained segmenter may mark much of the image: keep-in always has room then, keep-out when
        # it finds nothing.
        mode = "keep-in" if boxes else "keep-out"
        result = logic.protect(node, url, settings=tiny_search(mode=mode, sl=8), lesion_source="server")
        self.assertEqual(result.answer["lesion_source"], "mask")
        np.testing.assert_array_equal(
            logic.segmentation_to_mask(result.segmentation_node, result.output_node), expected
        )
        self.assertEqual(result.answer["lesion_boxes"], [list(b) for b in boxes])
        self.assertEqual(len(result.roi_nodes), len(boxes))

    # -- a dataset folder (server) ---------------------------------------------------------------------------------

    def check_dataset_folder(self, scene, url: str, folder):
        import SimpleITK as sitk

        from medprivacy.watermark import io as mio
        from medprivacy.watermark.keyfile import load_key, unlock

        logic = MedLockerWatermarkLogic(scene)
        folder = Path(folder)
        inputs = folder / "in"
        inputs.mkdir()
        originals = {
            "a_gray.png": self.sample_pixels("gray8")[0],
            "b_rgb.png": self.sample_pixels("rgb")[0],
            "c_gray16.tif": self.sample_pixels("gray16")[0],
        }
        for name, pixels in originals.items():
            sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), str(inputs / name))
        (inputs / "README.txt").write_text("not an image: skipped\n")

        stages = []
        result = logic.protect_folder(
            inputs,
            folder / "out",
            folder / "dataset.mlkey",
            url,
            passphrase=PASSPHRASE,
            settings=tiny_search(mode="wap"),
            scrypt_log2_n=TEST_SCRYPT_LOG2_N,
            progress=lambda text, fraction=None: stages.append(fraction),
        )
        self.assertEqual(result.protected, 3)
        self.assertEqual(len(result.reports), 3)
        self.assertEqual(stages[-1], 1.0)
        self.assertEqual(sorted(p.name for p in (folder / "out").iterdir()), sorted(originals))
        key = load_key(folder / "dataset.mlkey", passphrase=PASSPHRASE)
        self.assertEqual(sorted(key.names()), sorted(originals))
        for name, pixels in originals.items():
            protected = mio.read_image(folder / "out" / name).pixels
            self.assertFalse(np.array_equal(protected, pixels))
            np.testing.assert_array_equal(unlock(protected, key), pixels)
        self.assertEqual(len(logic.key), 0, "a dataset gets its own key, not the session's")

        # Cancel after the first image: the batch stops, and the key still restores what was written.
        calls = []

        def cancel_after_first() -> bool:
            calls.append(1)
            return len(calls) > 1

        with self.assertRaises(CancelledError) as raised:
            logic.protect_folder(
                inputs,
                folder / "out2",
                folder / "partial.mlkey",
                url,
                passphrase=PASSPHRASE,
                settings=tiny_search(mode="wap"),
                scrypt_log2_n=TEST_SCRYPT_LOG2_N,
                cancel=cancel_after_first,
            )
        self.assert_one_line(raised.exception, "cancelled after 1 of 3")
        written = sorted(p.name for p in (folder / "out2").iterdir())
        self.assertEqual(written, ["a_gray.png"])
        partial = load_key(folder / "partial.mlkey", passphrase=PASSPHRASE)
        self.assertEqual(partial.names(), ["a_gray.png"])
        np.testing.assert_array_equal(
            unlock(mio.read_image(folder / "out2" / "a_gray.png").pixels, partial), originals["a_gray.png"]
        )

        # The same key name again is refused before the server works, and an empty folder says so.
        with self.assertRaises(InputError) as raised:
            logic.protect_folder(inputs, folder / "out3", folder / "dataset.mlkey", url, passphrase=PASSPHRASE)
        self.assert_one_line(raised.exception, "already exists")
        (folder / "empty").mkdir()
        with self.assertRaises(InputError) as raised:
            logic.protect_folder(folder / "empty", folder / "out4", folder / "k.mlkey", url, passphrase=PASSPHRASE)
        self.assert_one_line(raised.exception, "holds no")

    def check_all_with_server(self, scene, url: str, set_up) -> None:
        """Every server body, each after ``set_up`` (the in-app test's scene reset)."""
        import tempfile

        for check in (self.check_protect_unlock_bit_exact, self.check_dataset_folder):
            set_up()
            with tempfile.TemporaryDirectory() as folder:
                check(scene, url, folder)
        for check in (self.check_volume_slice, self.check_keep_out_respects_segmentation, self.check_server_lesions):
            set_up()
            check(scene, url)

    def check_panel_on_fake_logic(self, scene) -> None:
        """The panel (application only) on ``FakeMedLockerWatermarkLogic``: parameter node <-> GUI, buttons follow
        the state, and Protect hands the panel's search settings and ticked models to the logic."""
        import qt

        from .logic import LESION_SOURCES
        from .widget import MedLockerWatermarkPanel

        url = "http://127.0.0.1:9"  # never contacted: the fake logic answers
        logic = FakeMedLockerWatermarkLogic(scene)
        with self.panel_on_fake_logic(MedLockerWatermarkPanel, logic) as panel:
            parameters = panel.parameterNode
            self.assertFalse(panel.ui.protectButton.enabled, "Protect without an input image")
            self.assertFalse(panel.ui.unlockButton.enabled)
            volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
            parameters.inputVolume = volume
            self.assertTrue(panel.ui.protectButton.enabled)
            panel.ui.lesionSourceComboBox.currentIndex = LESION_SOURCES.index("segmentation")
            self.assertEqual(parameters.lesionSource, "segmentation")
            self.assertTrue(panel.ui.segmentationSelector.enabled)
            panel.ui.lesionSourceComboBox.currentIndex = LESION_SOURCES.index("none")
            parameters.population = 7
            self.assertEqual(panel.ui.populationSpinBox.value, 7)

            panel.ui.serverUrlLineEdit.text = url
            panel.ui.refreshModelsButton.click()
            self.wait_until_idle(panel)
            table = panel.ui.modelsTableWidget
            self.assertEqual(table.rowCount, 2)
            table.item(1, 0).setCheckState(qt.Qt.Unchecked)  # keep cls-a only

            self.consent_to(panel, url)
            panel.ui.protectButton.click()
            self.assertFalse(panel.ui.protectButton.enabled, "Protect stays enabled while the job runs")
            self.wait_until_idle(panel)
            compute = [call for call in logic.calls if call[0] == "compute_protection"]
            self.assertEqual(len(compute), 1)
            _name, image, sent_url, settings, source = compute[0]
            self.assertEqual((image, sent_url, source), ("image", url, "none"))
            self.assertEqual((settings.models, settings.population, settings.seed), (["cls-a"], 7, None))
            self.assertIn("1 image(s)", panel.ui.keyStatusLabel.text)
            self.assertIn("fake prediction", panel.ui.predictionsTextEdit.toPlainText())

            parameters.unlockVolume = volume
            self.assertTrue(panel.ui.unlockButton.enabled)
            panel.ui.unlockButton.click()
            self.assertEqual(logic.calls[-1], ("unlock", volume.GetID(), None))

            # A dataset folder goes to the worker with the passphrase; its report reaches the panel, and a Cancel
            # while it runs leaves the panel idle and saying so.
            panel.ui.datasetInputPathLineEdit.currentPath = "/tmp/medlocker-in"
            panel.ui.datasetOutputPathLineEdit.currentPath = "/tmp/medlocker-out"
            panel.ui.datasetKeyPathLineEdit.currentPath = "/tmp/medlocker.mlkey"
            panel.ui.keyFilePathLineEdit.currentPath = ""
            panel.ui.passphraseLineEdit.text = PASSPHRASE
            panel.ui.datasetProtectButton.click()
            self.wait_until_idle(panel)
            started = [call for call in logic.calls if call[0] == "start_folder_protection"]
            self.assertEqual(started[-1][1:5], ("/tmp/medlocker-in", "/tmp/medlocker-out", "/tmp/medlocker.mlkey", url))
            self.assertEqual(started[-1][5]["passphrase"], PASSPHRASE)
            self.assertIn("fake report", panel.ui.predictionsTextEdit.toPlainText())
            self.assertIn("Protected 2 image(s)", panel.ui.statusLabel.text)
            panel.ui.datasetProtectButton.click()
            panel.ui.cancelButton.click()
            self.wait_until_idle(panel)
            self.assertIn("cancelled", panel.ui.statusLabel.text)
