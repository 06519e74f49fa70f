"""ObfuscationPrivacy: have a remote server train and run classifiers on frames it cannot read back (Popescu et al.
2022: a VAE followed by a secret random non-bijective intensity mapping). This file only declares the module: the
panel is in ``ObfuscationPrivacyLib.widget``, the logic and test bodies in ``ObfuscationPrivacyLib`` (also runs on
slicer-core, where only the Lib's names below are defined here, re-exported for scripts and Slicer's generic tests)."""

from __future__ import annotations

import os

# ObfuscationPrivacyLib first: in a source checkout it is what makes ``medprivacy`` importable (F401: re-exports).
from ObfuscationPrivacyLib import (  # noqa: F401
    DEFAULT_SERVER_URL,
    DEFAULT_TRAIN_STEPS,
    NEEDS_TORCH,
    PACKAGES,
    BackgroundJob,
    NodeFrames,
    ObfuscationPrivacyLogic,
    ObfuscationPrivacyTestMixin,
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
    from ObfuscationPrivacyLib.widget import ObfuscationPrivacyPanel

    class ObfuscationPrivacy(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("Obfuscation Privacy")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy developers (MedPrivacy)"]
            self.parent.helpText = _(
                "Obfuscates 2D frames and runs (2D + time) with this site's secret key (a VAE followed by a random "
                "many-to-one intensity mapping), so that a MedPrivacy server can train a classifier on them and "
                'classify new frames without seeing readable images. "Obfuscate" adds exactly what would leave this '
                "computer as a new node. Use the same key for training and for classification: a model only "
                "understands frames made with the key of its training frames. The key never leaves this computer."
            )
            self.parent.acknowledgementText = _(
                'Method: Popescu et al., "Obfuscation Algorithm for Privacy-Preserving Deep Learning-Based Medical '
                'Image Analysis", Applied Sciences 12(8), 2022.'
            )

    class ObfuscationPrivacyWidget(ScriptedLoadableModuleWidget):
        def __init__(self, parent=None) -> None:
            #: Set before ``setup`` to run the panel on another logic (tests, scripting).
            self.logic = None
            self.panel = None
            ScriptedLoadableModuleWidget.__init__(self, parent)

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            self.panel = ObfuscationPrivacyPanel(self.logic)
            self.logic = self.panel.logic
            self.layout.addWidget(self.panel)

        def cleanup(self) -> None:
            if self.panel is not None:
                self.panel.cleanup()
            ScriptedLoadableModuleWidget.cleanup(self)

        def onReload(self) -> None:
            reload_packages("ObfuscationPrivacyLib")  # else the module file would get the cached panel and logic
            ScriptedLoadableModuleWidget.onReload(self)

    class ObfuscationPrivacyTest(ScriptedLoadableModuleTest, ObfuscationPrivacyTestMixin):
        """The shared test bodies (shipped weights) and the panel's (on a fake logic); the server body needs
        OBFUSCATION_TEST_SERVER_URL (a running 'medprivacy serve')."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            tests = (self.test_frames_round_trip, self.test_rejects_unusable_inputs, self.test_panel_on_fake_logic)
            for test in (*tests, self.test_with_server):  # two lines, so that ruff format keeps this file short
                self.setUp()
                test()
            self.delayDisplay("ObfuscationPrivacy tests passed")

        def test_frames_round_trip(self):
            self.in_temporary_folder(self.check_frames_round_trip_with_geometry, slicer.mrmlScene)

        def test_rejects_unusable_inputs(self):
            # Port 9 (discard) on loopback: nothing listens there on a desktop, so the connection is refused.
            self.in_temporary_folder(self.check_rejects_unusable_inputs, slicer.mrmlScene, "http://127.0.0.1:9")

        def test_panel_on_fake_logic(self):
            self.check_panel_on_fake_logic(slicer.mrmlScene)

        def test_with_server(self):
            url = os.environ.get("OBFUSCATION_TEST_SERVER_URL")
            if not url:
                self.delayDisplay("Server test skipped: set OBFUSCATION_TEST_SERVER_URL to a running MedPrivacy server")
                return
            self.in_temporary_folder(self.check_train_classify_and_cancel, slicer.mrmlScene, url)
