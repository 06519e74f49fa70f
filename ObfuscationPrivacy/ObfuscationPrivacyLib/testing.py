"""Test bodies shared by the in-application self-test (``ObfuscationPrivacyTest``) and pytest on slicer-core.

Bodies that need a server take its URL: under pytest a real ``medprivacy serve``, in the application a server named
by OBFUSCATION_TEST_SERVER_URL. ``models_dir`` holds the VAE that key generation copies (pytest: a tiny untrained
one; in the application: None, the shipped weights). A few training steps keep each server body to seconds.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import slicer  # noqa: F401  (the MRML classes the scene creates come from here)
import vtk
from vtk.util import numpy_support

from medprivacy.errors import CancelledError, InputError, ServerError
from MedPrivacySlicerCommon.testing import FakeWorker, PanelTestMixin

from .logic import NodeFrames, ObfuscationPrivacyLogic, ijk_to_ras, volume_voxels


class FakeObfuscationPrivacyLogic:
    """Stands in for ``ObfuscationPrivacyLogic`` (``protocols.ObfuscationPrivacyLogicProtocol``) in the panel's
    in-app tests: records each call and answers from Qt's event loop (``FakeWorker``), without a key, weights, a
    server or a process."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.calls: list[tuple] = []

    def describe_key(self, key_dir) -> str:
        return "fake key"

    def start_key_generation(self, key_dir, force=False, vae_from=None, on_progress=None, on_done=None, on_error=None):
        self.calls.append(("start_key_generation", key_dir, force))
        return FakeWorker(lambda: "fake key", on_progress, on_done, on_error)

    def node_to_frames(self, node):
        if node is None:
            raise InputError("no input frames: select a volume or a sequence")
        self.calls.append(("node_to_frames", node.GetID()))
        return NodeFrames(
            pixels=np.zeros((2, 4, 4), np.uint8),
            ijk_to_ras=np.eye(4),
            transform_id=None,
            name=node.GetName(),
            sequence=False,
            index_values=["0", "1"],
        )

    def frames_to_node(self, codes, source, name=None):
        self.calls.append(("frames_to_node", len(codes)))
        return self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "obfuscated")

    def start_obfuscation(self, pixels, key_dir, on_progress=None, on_done=None, on_error=None):
        self.calls.append(("start_obfuscation", pixels.shape, key_dir))
        return FakeWorker(lambda: (np.zeros_like(pixels), "key-id"), on_progress, on_done, on_error)

    def test_connection(self, url, token=None, ca_bundle=None) -> str:
        self.calls.append(("test_connection", url))
        return "fake server"

    def list_models(self, url, token=None, ca_bundle=None, key_dir=None) -> list:
        self.calls.append(("list_models", url, key_dir))
        return [{"id": "m1", "classes": ["a", "b"], "validation_accuracy": 0.5}]

    def start_classification(
        self, pixels, key_dir, url, model, token=None, ca_bundle=None, on_progress=None, on_done=None, on_error=None
    ):
        self.calls.append(("start_classification", pixels.shape, url, model))
        answer = {"model": model, "classes": ["a", "b"], "predicted": ["a", "b"], "probabilities": [[1, 0], [0, 1]]}
        return FakeWorker(lambda: answer, on_progress, on_done, on_error)

    def start_training(
        self,
        dataset,
        key_dir,
        url,
        token=None,
        ca_bundle=None,
        steps=None,
        name=None,
        on_progress=None,
        on_done=None,
        on_error=None,
    ):
        self.calls.append(("start_training", dataset, url, steps, name))
        return FakeWorker(
            lambda: {"model": "m2", "progress": {"validation_accuracy": 0.75}}, on_progress, on_done, on_error
        )

    def results_table(self, answer, name="Obfuscated classification", frame_labels=None):
        self.calls.append(("results_table", name, list(frame_labels)))
        return self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)


class ObfuscationPrivacyTestMixin(PanelTestMixin):
    """Test bodies that take the scene (and a server URL, a folder, the models folder); the host class must be a
    ``unittest.TestCase``. No method name here contains "test": ``ScriptedLoadableModuleTest`` runs every such
    method, and these need arguments. Volumes carry an oblique direction, anisotropic spacing and an origin."""

    DIRECTIONS_RAS = (
        (0.8660254037844387, -0.25, 0.4330127018922193),
        (0.25, 0.9665063509461097, 0.05801270189221941),
        (-0.4330127018922193, 0.05801270189221941, 0.8995190528383291),
    )
    SPACING = (0.3, 0.45, 66.7)
    ORIGIN_RAS = (-12.5, 30.25, 7.75)

    # -- helpers --------------------------------------------------------------------------------------------------

    def make_volume(self, scene, voxels: np.ndarray, name: str = "run", node_class: str = "vtkMRMLScalarVolumeNode"):
        node = scene.AddNewNodeByClass(node_class, name)
        components = voxels.shape[3] if voxels.ndim == 4 else 1
        image_data = vtk.vtkImageData()
        image_data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
        image_data.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).reshape(-1, components), deep=True)
        )
        node.SetAndObserveImageData(image_data)
        node.SetSpacing(*self.SPACING)
        node.SetOrigin(*self.ORIGIN_RAS)
        directions = vtk.vtkMatrix4x4()
        for row in range(3):
            for col in range(3):
                directions.SetElement(row, col, self.DIRECTIONS_RAS[row][col])
        node.SetIJKToRASDirectionMatrix(directions)
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def angiography_run(frames: int = 4, size: int = 48, seed: int = 900_001) -> np.ndarray:
        """A synthetic angiography run (frames, size, size) as 12-bit unsigned integers."""
        from medprivacy.obfuscation.data import render_run

        return np.round(render_run(seed, frames=frames, size=size) * 4095).astype(np.uint16)

    def make_sequence(self, scene, frames: np.ndarray, name: str = "sequence"):
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        sequence.SetIndexName("time")
        sequence.SetIndexUnit("s")
        scratch = slicer.vtkMRMLScene()
        for index, frame in enumerate(frames):
            item = self.make_volume(scratch, frame[None], f"frame {index}")
            sequence.SetDataNodeAtValue(item, f"{index * 0.0667:.4f}")
        return sequence

    def assert_one_line(self, error: Exception, *fragments: str) -> None:
        message = str(error)
        self.assertTrue(message and "\n" not in message, repr(message))
        for fragment in fragments:
            self.assertIn(fragment, message)

    def key_folder(self, folder, models_dir=None, name: str = "key") -> str:
        key_dir = str(Path(folder) / name)
        ObfuscationPrivacyLogic(slicer.vtkMRMLScene(), models_dir).generate_key(key_dir)
        return key_dir

    # -- volumes and sequences (no server) ------------------------------------------------------------------------

    def check_frames_round_trip_with_geometry(self, scene, folder, models_dir=None):
        logic = ObfuscationPrivacyLogic(scene, models_dir)
        key_dir = self.key_folder(folder, models_dir)
        self.assertEqual(stat.S_IMODE(os.stat(key_dir).st_mode), 0o700)
        run = self.angiography_run()
        volume = self.make_volume(scene, run)
        source = logic.node_to_frames(volume)
        np.testing.assert_array_equal(source.pixels, run)
        codes, key_id = logic.obfuscate_frames(source.pixels, key_dir)
        self.assertEqual(codes.dtype, np.uint8)
        self.assertEqual(len(key_id), 16)
        output = logic.frames_to_node(codes, source)
        self.assertEqual(output.GetClassName(), "vtkMRMLScalarVolumeNode")
        np.testing.assert_array_equal(volume_voxels(output), codes)
        # Same field of view: the outer corners of frame 0 and the frame positions along K do not move.
        size_in, size_out = np.array(run.shape[1:][::-1]), np.array(codes.shape[1:][::-1])
        for corner in ((-0.5, -0.5), (size_in[0] - 0.5, size_in[1] - 0.5)):
            scaled = (np.array(corner) + 0.5) * size_out / size_in - 0.5
            np.testing.assert_allclose(
                ijk_to_ras(output) @ np.array([*scaled, 2, 1.0]),
                ijk_to_ras(volume) @ np.array([*corner, 2, 1.0]),
                rtol=0,
                atol=1e-9,
            )
        # The same frames with the same key always give the same codes, frame by frame.
        again, _ = logic.obfuscate_frames(run[2:3], key_dir)
        np.testing.assert_array_equal(again[0], codes[2])

        sequence = self.make_sequence(scene, run)
        frames = logic.node_to_frames(sequence)
        self.assertTrue(frames.sequence)
        np.testing.assert_array_equal(frames.pixels, run)
        out = logic.frames_to_node(logic.obfuscate_frames(frames.pixels, key_dir)[0], frames)
        self.assertEqual(out.GetClassName(), "vtkMRMLSequenceNode")
        self.assertEqual(out.GetNumberOfDataNodes(), len(run))
        self.assertEqual([out.GetNthIndexValue(i) for i in range(len(run))], frames.index_values)
        for index in range(len(run)):
            np.testing.assert_array_equal(volume_voxels(out.GetNthDataNode(index))[0], codes[index])

    def check_rejects_unusable_inputs(self, scene, unreachable_url, folder, models_dir=None):
        logic = ObfuscationPrivacyLogic(scene, models_dir)
        rgb = self.make_volume(scene, np.zeros((1, 16, 16, 3), np.uint8), "photo", "vtkMRMLVectorVolumeNode")
        labels = self.make_volume(scene, np.zeros((1, 16, 16), np.uint8), "labels", "vtkMRMLLabelMapVolumeNode")
        empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        for node, fragment in (
            (None, "no input selected"),
            (rgb, "gray frames"),
            (labels, "labelmap"),
            (empty, "empty"),
        ):
            with self.assertRaises(InputError) as caught:
                logic.node_to_frames(node)
            self.assert_one_line(caught.exception, fragment)
        mixed = self.make_sequence(scene, self.angiography_run(frames=2))
        scratch = slicer.vtkMRMLScene()
        mixed.SetDataNodeAtValue(self.make_volume(scratch, np.zeros((1, 20, 20), np.uint16), "odd"), "9")
        with self.assertRaises(InputError) as caught:
            logic.node_to_frames(mixed)
        self.assert_one_line(caught.exception, "differ in size")
        with self.assertRaises(InputError) as caught:
            logic.obfuscate_frames(self.angiography_run(1), str(Path(folder) / "no-key-here"))
        self.assert_one_line(caught.exception, "no obfuscation key", "keygen")
        key_dir = self.key_folder(folder, models_dir, "rejects")
        with self.assertRaises(InputError) as caught:
            logic.generate_key(key_dir)
        self.assert_one_line(caught.exception, "already exists")
        with self.assertRaises(ServerError) as caught:
            logic.classify_frames(self.angiography_run(1), key_dir, unreachable_url, "obf-000000000000")
        self.assert_one_line(caught.exception, "cannot reach")

    # -- with a server --------------------------------------------------------------------------------------------

    def write_dataset(self, folder, per_class: int = 6, size: int = 48) -> str:
        """Two classes (LCA, RCA) of synthetic angiograms as 16-bit PNG files, one subfolder per class."""
        import SimpleITK as sitk

        from medprivacy.obfuscation.data import VIEWS, render_angio

        root = Path(folder) / "dataset"
        for seed in range(900_100, 900_100 + 2 * per_class):
            frame = render_angio(seed, size)
            target = root / VIEWS[frame.labels["view"]]
            target.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(
                sitk.GetImageFromArray(np.round(frame.image * 65535).astype(np.uint16)), str(target / f"{seed}.png")
            )
        return str(root)

    def check_train_classify_and_cancel(self, scene, url, folder, models_dir=None):
        logic = ObfuscationPrivacyLogic(scene, models_dir)
        key_dir = self.key_folder(folder, models_dir, "site")
        dataset = self.write_dataset(folder)
        seen = []
        job = logic.train_from_folder(
            dataset, key_dir, url, steps=8, progress=lambda text, fraction: seen.append(fraction)
        )
        self.assertEqual(job["status"], "done")
        self.assertTrue(job["model"].startswith("obf-"))
        self.assertTrue(seen and max(seen) <= 1.0)
        models = logic.list_models(url, key_dir=key_dir)
        self.assertIn(job["model"], [m["id"] for m in models])

        run = self.make_volume(scene, self.angiography_run(frames=3))
        answer = logic.classify_frames(logic.node_to_frames(run).pixels, key_dir, url, job["model"])
        self.assertEqual(answer["classes"], ["LCA", "RCA"])
        self.assertEqual(answer["probabilities"].shape, (3, 2))
        np.testing.assert_allclose(answer["probabilities"].sum(axis=1), 1.0, atol=1e-4)
        table = logic.results_table(answer)
        self.assertEqual(table.GetNumberOfRows(), 3)
        self.assertEqual(
            [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())], ["frame", "class", "LCA", "RCA"]
        )

        # Another key's frames are refused by the model, with the reason.
        other = self.key_folder(folder, models_dir, "other")
        with self.assertRaises(ServerError) as caught:
            logic.classify_frames(self.angiography_run(1), other, url, job["model"])
        self.assert_one_line(caught.exception, "obfuscated with key", "trained on key")

        # Cancel while the server trains (the checks before are one per file, then one per poll of the job): the
        # job ends cancelled on the server too.
        files = sum(1 for _ in Path(dataset).rglob("*.png"))
        calls = {"n": 0}

        def cancel_while_training() -> bool:
            calls["n"] += 1
            return calls["n"] > files + 1

        with self.assertRaises(CancelledError):
            logic.train_from_folder(dataset, key_dir, url, steps=20000, cancel=cancel_while_training)
        client = logic.client(url)
        try:
            job_id = client.jobs()[-1]["job"]
            deadline = time.monotonic() + 60
            while client.job(job_id)["status"] not in ("cancelled", "done", "failed") and time.monotonic() < deadline:
                time.sleep(0.2)
            self.assertEqual(client.job(job_id)["status"], "cancelled")
        finally:
            client.close()

    def in_temporary_folder(self, check, *arguments) -> None:
        """``check(*arguments, folder)`` with a fresh temporary folder (the in-app test's bodies)."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            check(*arguments, folder)

    def check_panel_on_fake_logic(self, scene) -> None:
        """The panel (application only) on ``FakeObfuscationPrivacyLogic``: parameter node <-> GUI, buttons follow
        the state and the key folder, and Train/Classify hand the panel's options to the logic."""
        import tempfile

        from .widget import ObfuscationPrivacyPanel

        url = "http://127.0.0.1:9"  # never contacted: the fake logic answers
        logic = FakeObfuscationPrivacyLogic(scene)
        with self.panel_on_fake_logic(ObfuscationPrivacyPanel, logic) as panel, tempfile.TemporaryDirectory() as folder:
            parameters = panel.parameterNode
            panel.ui.keyDirectoryPathLineEdit.currentPath = folder
            self.assertEqual(panel.ui.keyStatusLabel.text, "fake key")
            self.assertFalse(panel.ui.obfuscateButton.enabled, "Obfuscate without input frames")
            run = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "run")
            parameters.inputNode = run
            self.assertIs(panel.ui.inputSelector.currentNode(), run)
            self.assertTrue(panel.ui.obfuscateButton.enabled)
            self.assertFalse(panel.ui.classifyButton.enabled, "Classify without a model")

            panel.ui.obfuscateButton.click()
            self.assertFalse(panel.ui.obfuscateButton.enabled, "Obfuscate stays enabled while the job runs")
            self.wait_until_idle(panel)
            self.assertEqual(logic.calls[-1], ("frames_to_node", 2))
            self.assertIn("key-id", panel.ui.statusLabel.text)

            panel.ui.serverUrlLineEdit.text = url
            panel.ui.refreshModelsButton.click()
            self.wait_until_idle(panel)
            self.assertTrue(panel.ui.classifyButton.enabled)
            self.consent_to(panel, url)
            panel.ui.classifyButton.click()
            self.wait_until_idle(panel)
            self.assertIn(("start_classification", (2, 4, 4), url, "m1"), logic.calls)
            self.assertEqual(logic.calls[-1], ("results_table", "run classification", ["0", "1"]))

            panel.ui.trainStepsSpinBox.value = 12
            parameters.trainName = "tiny"
            self.assertEqual((parameters.trainSteps, panel.ui.trainNameLineEdit.text), (12, "tiny"))
            panel.ui.datasetPathLineEdit.currentPath = folder
            panel.ui.trainButton.click()
            self.wait_until_idle(panel)
            self.assertIn(("start_training", folder, url, 12, "tiny"), logic.calls)
