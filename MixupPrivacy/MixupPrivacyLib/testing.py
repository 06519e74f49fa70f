"""Test bodies shared by the in-application self-test (``MixupPrivacyTest``) and pytest on slicer-core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk

from medprivacy.errors import InputError
from medprivacy.labels import TISSUE_SEGMENTS
from MedPrivacySlicerCommon.mrml_geometry import LPS_TO_RAS, ijk_to_ras
from MedPrivacySlicerCommon.testing import FakeWorker, PanelTestMixin

from .logic import PRIVACY_LEVELS, MixupPrivacyLogic


class FakeMixupPrivacyLogic:
    """Stands in for ``MixupPrivacyLogic`` (``protocols.MixupPrivacyLogicProtocol``) in the panel's in-app tests:
    records each call and answers from Qt's event loop (``FakeWorker``), without a server, a key or a process."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.calls: list[tuple] = []
        self.last_uploaded_node = None
        self.last_rebuild_node = None

    def volume_node_to_sitk(self, volume_node):
        if volume_node is None:
            raise InputError("no input volume: select one")
        self.calls.append(("volume_node_to_sitk", volume_node.GetID()))
        return "image"

    def test_connection(self, url, token=None, ca_bundle=None):
        self.calls.append(("test_connection", url, token, ca_bundle))
        return "fake server"

    def start_key_generation(self, key_dir, force=False, on_progress=None, on_done=None, on_error=None, **options):
        self.calls.append(("start_key_generation", key_dir, force))
        return FakeWorker(lambda: key_dir, on_progress, on_done, on_error)

    def start_segmentation(
        self,
        input_node,
        url,
        output_segmentation_node=None,
        show_uploaded=False,
        on_progress=None,
        on_done=None,
        on_error=None,
        **options,
    ):
        self.calls.append(("start_segmentation", input_node.GetID(), url, dict(options, show_uploaded=show_uploaded)))

        def into_scene():
            self.calls.append(("into_scene", input_node.GetID()))
            return output_segmentation_node or self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")

        return FakeWorker(into_scene, on_progress, on_done, on_error)


class MixupPrivacyTestMixin(PanelTestMixin):
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
        import SimpleITK as sitk

        logic = MixupPrivacyLogic(scene)
        voxels = (np.arange(int(np.prod(shape))) % 1000 - 300).astype(dtype).reshape(shape)
        image = sitk.GetImageFromArray(voxels)
        image.SetSpacing(self.SPACING)
        image.SetOrigin(tuple(LPS_TO_RAS @ np.array(self.ORIGIN_RAS)))
        image.SetDirection(tuple((LPS_TO_RAS @ np.array(self.OBLIQUE_DIRECTION_RAS)).ravel()))
        return logic.sitk_to_volume_node(image, name), voxels

    def check_volume_round_trip(self, scene):
        import SimpleITK as sitk

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
        np.testing.assert_allclose(image.GetOrigin(), LPS_TO_RAS @ np.array(self.ORIGIN_RAS), rtol=0, atol=1e-12)

        # Independent check through MRML's own IJK->RAS matrix: every corner voxel lands on the same point.
        node_ijk_to_ras = ijk_to_ras(node)
        for index in [(0, 0, 0), (10, 0, 0), (0, 8, 0), (0, 0, 6), (10, 8, 6)]:
            ras = (node_ijk_to_ras @ np.array(index + (1,)))[:3]
            lps = np.array(image.TransformIndexToPhysicalPoint(index))
            np.testing.assert_allclose(LPS_TO_RAS @ lps, ras, rtol=0, atol=1e-9)

        # A second trip through a new node is lossless too.
        again = logic.volume_node_to_sitk(logic.sitk_to_volume_node(image, "again"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(again), voxels)
        self.assertEqual(again.GetSpacing(), image.GetSpacing())
        self.assertEqual(again.GetOrigin(), image.GetOrigin())
        self.assertEqual(again.GetDirection(), image.GetDirection())

    def check_labelmap_to_segmentation(self, scene):
        import SimpleITK as sitk

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
        for name, color in TISSUE_SEGMENTS.values():
            segment_id = segmentation.GetSegmentIdBySegmentName(name)
            self.assertTrue(segment_id, f"segment {name!r} missing")
            np.testing.assert_allclose(segmentation.GetSegment(segment_id).GetColor(), color, rtol=0, atol=1e-6)
        display_node = segmentation_node.GetDisplayNode()
        self.assertIsNotNone(display_node)
        self.assertTrue(display_node.GetVisibility())
        self.assertIs(
            segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()),
            node,
        )

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
        for node, reason in [
            (single_slice, "2D"),
            (vector, "scalar"),
            (empty, "no voxels"),
            (labelmap, "labelmap"),
            (None, "no input volume"),
        ]:
            with self.assertRaises(InputError) as raised:
                logic.volume_node_to_sitk(node)
            message = str(raised.exception)
            self.assertIn(reason, message)
            self.assertNotIn("\n", message)

    def check_private_segmentation_end_to_end(
        self, scene, url, key_dir, audit_dir=None, token=None, ca_bundle=None, unmix="naive", image=None
    ):
        """Key generation, then ``run`` against a real server, from a volume node to tissue segments.

        ``image`` defaults to the real MNI152 T1 (it lies on the model grid, so no registration slows the test).
        With ``audit_dir`` (the server's ``--audit-dir``) also checks that the server received exactly the mixed
        patches and never the target's.
        """
        import SimpleITK as sitk

        from medprivacy.transport import InferenceClient, decode_tensor_raw, encode_tensor

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
        segmentation_node = logic.run(
            node,
            url,
            token=token,
            ca_bundle=ca_bundle,
            key_dir=key_dir,
            tta=2,
            unmix=unmix,
            show_uploaded=True,
            seed=0,
            progress=lambda stage, fraction=None: stages.append(stage),
        )
        result = logic.last_result
        self.assertTrue(stages, "no progress was reported")

        # Exactly the three tissue segments, on the input's geometry, holding exactly the pipeline's labels.
        segmentation = segmentation_node.GetSegmentation()
        self.assertEqual(
            sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())),
            sorted(name for name, _color in TISSUE_SEGMENTS.values()),
        )
        self.assertIs(
            segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()),
            node,
        )
        labels = logic.segmentation_to_labelmap_array(segmentation_node, node)
        self.assertEqual(labels.shape, sitk.GetArrayViewFromImage(image).shape)
        np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(result.labelmap))
        self.assertTrue(set(np.unique(labels).tolist()) <= {0} | set(TISSUE_SEGMENTS))
        from medprivacy.mixup.pipeline import make_uploads

        session = result.session  # this run's secrets: each copy's secret grid, orientations, references
        sent_targets = make_uploads(session, bank, slice(None))[2]  # the scan's part of every upload, as it was mixed
        self.assertEqual(result.stats["patches_sent"], len(sent_targets))

        # "Show what is sent" shows mixed data, far from the scan itself.
        self.assertIsNotNone(logic.last_uploaded_node)
        uploaded = logic.volume_node_to_sitk(logic.last_uploaded_node)
        mask = session.mask
        difference = np.abs(sitk.GetArrayViewFromImage(uploaded)[mask] - session.volume[mask]).mean()
        self.assertGreater(difference, 0.05, "the uploaded volume is nearly the scan itself")

        if audit_dir is None:
            return
        received = sorted(set(Path(audit_dir).glob("*.npy")) - audited_before)
        self.assertTrue(received, "the server's audit folder got nothing")
        self.assertTrue(all(path.name.endswith("-mixup.npy") for path in received), [path.name for path in received])
        rows = np.concatenate([np.load(path).reshape(-1, int(np.prod(patch_size))) for path in received])
        self.assertEqual(len(rows), result.stats["patches_sent"])
        # Compare in the wire's own uint8 codes, made by its encoder, so an unmixed patch would match bit for bit.
        target_codes = decode_tensor_raw(encode_tensor(sent_targets, "uint8", compress=False))[0]
        target_codes = target_codes.reshape(len(sent_targets), -1)
        target_rows = {row.tobytes() for row in target_codes}
        self.assertFalse(
            any(row.astype(np.uint8).tobytes() in target_rows for row in rows),
            "the server received an unmixed patch of the scan",
        )

    def check_private_segmentation_end_to_end_from_environment(self, scene, url):
        """``check_private_segmentation_end_to_end`` with the options the in-app test reads from the environment."""
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.check_private_segmentation_end_to_end(
                scene,
                url,
                os.path.join(folder, "key"),
                audit_dir=os.environ.get("MIXUPPRIVACY_TEST_AUDIT_DIR") or None,
                token=os.environ.get("MEDPRIVACY_TOKEN") or None,
                unmix=os.environ.get("MIXUPPRIVACY_TEST_UNMIX", "naive"),
            )

    def check_panel_on_fake_logic(self, scene):
        """The panel (application only) on ``FakeMixupPrivacyLogic``: parameter node <-> GUI, buttons follow the
        state, and Apply hands the panel's options to the logic and its result to the scene."""
        from medprivacy.mixup.privacy import LEVELS

        from .widget import MixupPrivacyPanel, PrivacyLevel

        url = "http://127.0.0.1:9"  # never contacted: the fake logic answers
        logic = FakeMixupPrivacyLogic(scene)
        with self.panel_on_fake_logic(MixupPrivacyPanel, logic) as panel:
            parameters = panel.parameterNode
            self.assertFalse(panel.ui.applyButton.enabled, "Apply without an input volume")
            volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
            parameters.inputVolume = volume
            self.assertIs(panel.ui.inputSelector.currentNode(), volume)
            self.assertTrue(panel.ui.applyButton.enabled)

            # A level picked in the GUI reaches the node and brings the count it was measured at.
            panel.ui.privacyComboBox.currentIndex = PRIVACY_LEVELS.index("strong")
            self.assertEqual(parameters.privacy, PrivacyLevel.STRONG)
            self.assertEqual(parameters.tta, LEVELS["strong"].tta)
            panel.ui.ttaSpinBox.value = 3
            parameters.showUploaded = True
            self.assertTrue(panel.ui.showUploadedCheckBox.checked)

            panel.ui.serverUrlLineEdit.text = url
            self.consent_to(panel, url)
            panel.ui.applyButton.click()
            self.assertFalse(panel.ui.applyButton.enabled, "Apply stays enabled while the job runs")
            self.assertTrue(panel.ui.cancelButton.enabled)
            self.wait_until_idle(panel)
            started = [call for call in logic.calls if call[0] == "start_segmentation"]
            self.assertEqual(len(started), 1)
            _name, input_id, sent_url, options = started[0]
            self.assertEqual((input_id, sent_url), (volume.GetID(), url))
            self.assertEqual((options["privacy"], options["tta"], options["show_uploaded"]), ("strong", 3, True))
            self.assertEqual(logic.calls[-1], ("into_scene", volume.GetID()))
            self.assertIsNotNone(parameters.outputSegmentation)
            self.assertIn(parameters.outputSegmentation.GetName(), panel.ui.statusLabel.text)
            self.assertTrue(panel.ui.applyButton.enabled)

            panel.ui.testConnectionButton.click()
            self.wait_until_idle(panel)
            self.assertIn("fake server", panel.ui.statusLabel.text)

            # Cancel while the worker runs: the panel is idle again, says so, and nothing reaches the scene.
            panel.ui.applyButton.click()
            panel.ui.cancelButton.click()
            self.wait_until_idle(panel)
            self.assertIn("cancelled", panel.ui.statusLabel.text)
            self.assertEqual(logic.calls[-1][0], "start_segmentation")
            self.assertTrue(panel.ui.applyButton.enabled)
