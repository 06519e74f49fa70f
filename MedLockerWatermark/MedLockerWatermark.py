"""MedLockerWatermark: visible adversarial watermarks that make AI models misread an image, removable bit for bit with
a key (Pu et al., MedLocker). Declares the module only: the panel is in ``MedLockerWatermarkLib.widget``, logic and
test bodies in ``MedLockerWatermarkLib`` (on slicer-core only the Lib's names below are defined, re-exported)."""

from __future__ import annotations

import os

# MedLockerWatermarkLib first: in a source checkout it is what makes ``medprivacy`` importable (F401: re-exports).
from MedLockerWatermarkLib import (  # noqa: F401
    DEFAULT_MODE,
    DEFAULT_SERVER_URL,
    LESION_SOURCES,
    MODES,
    NEEDS_TORCH,
    PACKAGES,
    BackgroundJob,
    MedLockerWatermarkLogic,
    MedLockerWatermarkTestMixin,
    ProtectionResult,
    SliceImage,
    describe_predictions,
    normalized_server_url,
)

# isort: split
from medprivacy.errors import CancelledError, InputError, MedPrivacyError  # noqa: F401

try:
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    _HAVE_APP = True
except ImportError:  # slicer-core: no application, so no module, widget or test class (nothing is stubbed)
    _HAVE_APP = False


if _HAVE_APP:
    import slicer
    from slicer.i18n import tr as _, translate

    from MedLockerWatermarkLib.widget import MedLockerWatermarkPanel
    from MedPrivacySlicerCommon.reloading import reload_packages

    class MedLockerWatermark(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("MedLocker Watermark")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy developers (MedPrivacy)"]
            self.parent.helpText = _(
                "Protects 2D images (a picture, or one slice of a volume) with a visible logo placed and blended so "
                "that unauthorised AI classifiers misread the image, while a clinician still sees it. The search runs "
                "on a MedPrivacy server; the logo is blended here into the exact pixels, and the key that restores "
                "the original bit for bit never leaves this computer unless you export it (encrypted). "
                "Keep-out placement keeps the logo off the lesions."
            )
            self.parent.acknowledgementText = _(
                'Method: Pu et al., "MedLocker: a transferable adversarial watermarking for preventing unauthorized '
                'analysis of medical image dataset".'
            )

    class MedLockerWatermarkWidget(ScriptedLoadableModuleWidget):
        def __init__(self, parent=None) -> None:
            #: Set before ``setup`` to run the panel on another logic (tests, scripting).
            self.logic = None
            self.panel = None
            ScriptedLoadableModuleWidget.__init__(self, parent)

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            self.panel = MedLockerWatermarkPanel(self.logic)
            self.logic = self.panel.logic
            self.layout.addWidget(self.panel)

        def cleanup(self) -> None:
            if self.panel is not None:
                self.panel.cleanup()
            ScriptedLoadableModuleWidget.cleanup(self)

        def onReload(self) -> None:
            reload_packages("MedLockerWatermarkLib")  # else the module file would get the cached panel and logic
            ScriptedLoadableModuleWidget.onReload(self)

    class MedLockerWatermarkTest(ScriptedLoadableModuleTest, MedLockerWatermarkTestMixin):
        """The shared test bodies and the panel's (on a fake logic); server ones need MEDLOCKER_TEST_SERVER_URL."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            tests = (self.test_slices_round_trip, self.test_rejects_unusable_inputs, self.test_panel_on_fake_logic)
            for test in (*tests, self.test_with_server):  # two lines, so that ruff format keeps this file short
                self.setUp()
                test()
            self.delayDisplay("MedLockerWatermark tests passed")

        def test_slices_round_trip(self):
            self.check_slices_round_trip(slicer.mrmlScene)

        def test_rejects_unusable_inputs(self):
            # Port 9 (discard) on loopback: nothing listens there on a desktop, so the connection is refused.
            self.check_rejects_unusable_inputs(slicer.mrmlScene, "http://127.0.0.1:9")

        def test_panel_on_fake_logic(self):
            self.check_panel_on_fake_logic(slicer.mrmlScene)

        def test_with_server(self):
            url = os.environ.get("MEDLOCKER_TEST_SERVER_URL")
            if not url:
                self.delayDisplay("Server tests skipped: set MEDLOCKER_TEST_SERVER_URL to a running MedLocker server")
                return
            self.check_all_with_server(slicer.mrmlScene, url, self.setUp)
