"""MixupPrivacy: segment brain tissues on a remote server that only ever receives mixed, unreadable patches.

This file only declares the module. The panel is ``MixupPrivacyLib.widget``; the logic and the test bodies are in
``MixupPrivacyLib``, which also runs under PyPI's ``slicer-core``. There, without the application, only the Lib's
names below are defined here (re-exported, because scripts and Slicer's generic tests look them up on this module).
"""

from __future__ import annotations

import os

# MixupPrivacyLib first: in a source checkout it is what makes ``medprivacy`` importable (hence F401: re-exports).
from MixupPrivacyLib import (  # noqa: F401
    DEFAULT_SERVER_URL,
    NEEDS_TORCH,
    PACKAGES,
    PRIVACY_LEVELS,
    UNMIX_MODES,
    BackgroundJob,
    MixupPrivacyLogic,
    MixupPrivacyTestMixin,
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

    from MedPrivacySlicerCommon.reloading import reload_packages
    from MixupPrivacyLib.widget import MixupPrivacyPanel

    class MixupPrivacy(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("Mixup Privacy")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy developers (MedPrivacy)"]
            self.parent.helpText = _(
                "Segments CSF, gray matter and white matter of a brain MRI on a remote GPU server without showing "
                "it the scan: every patch is mixed with a reference patch from this computer's private key before "
                "upload, and the server's answer is unmixed here. Generate the key once, test the connection, "
                'then Apply. "Show what is sent" adds a volume with exactly the patches the server received.'
            )
            self.parent.acknowledgementText = _(
                'Method: Kim, Dolz and Desrosiers, "Mixup-Privacy: a simple yet effective approach for '
                'privacy-preserving segmentation" (IPMI 2023).'
            )

    class MixupPrivacyWidget(ScriptedLoadableModuleWidget):
        def __init__(self, parent=None) -> None:
            #: Set before ``setup`` to run the panel on another logic (tests, scripting).
            self.logic = None
            self.panel = None
            ScriptedLoadableModuleWidget.__init__(self, parent)

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            self.panel = MixupPrivacyPanel(self.logic)
            self.logic = self.panel.logic
            self.layout.addWidget(self.panel)

        def cleanup(self) -> None:
            if self.panel is not None:
                self.panel.cleanup()
            ScriptedLoadableModuleWidget.cleanup(self)

        def onReload(self) -> None:
            reload_packages("MixupPrivacyLib")  # else the module file would get the cached panel and logic
            ScriptedLoadableModuleWidget.onReload(self)

    class MixupPrivacyTest(ScriptedLoadableModuleTest, MixupPrivacyTestMixin):
        """Runs the shared test bodies, and the panel's on an injected fake logic, in the application's scene."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            tests = self.test_volume_round_trip, self.test_labelmap_to_segmentation, self.test_rejects_unusable_volumes
            for test in (*tests, self.test_panel_on_fake_logic, self.test_private_segmentation_end_to_end):
                self.setUp()
                test()
            self.delayDisplay("MixupPrivacy tests passed")

        def test_volume_round_trip(self):
            self.check_volume_round_trip(slicer.mrmlScene)

        def test_labelmap_to_segmentation(self):
            self.check_labelmap_to_segmentation(slicer.mrmlScene)

        def test_rejects_unusable_volumes(self):
            self.check_rejects_unusable_volumes(slicer.mrmlScene)

        def test_panel_on_fake_logic(self):
            self.check_panel_on_fake_logic(slicer.mrmlScene)

        def test_private_segmentation_end_to_end(self):
            # Needs a running 'medprivacy serve': opt in through the environment.
            url = os.environ.get("MIXUPPRIVACY_TEST_SERVER_URL")
            if not url:
                skipped = "End-to-end test skipped: set MIXUPPRIVACY_TEST_SERVER_URL to a running server"
                self.delayDisplay(
                    f"{skipped} (and MIXUPPRIVACY_TEST_AUDIT_DIR to its --audit-dir to check what it got)"
                )
                return
            self.check_private_segmentation_end_to_end_from_environment(slicer.mrmlScene, url)
