"""MixupPrivacy: segment brain tissues on a remote server that only ever receives mixed, unreadable patches.

Only the classes that need the application live here: module, widget and in-app test, defined only when Qt is
importable. The logic, the shared test bodies and the worker helper are in ``MixupPrivacyLib`` (they run under
PyPI's ``slicer-core`` too) and are re-exported, because scripts and Slicer's generic tests look them up on this
module (``MixupPrivacy.MixupPrivacyLogic``).
"""
from __future__ import annotations

import os

import slicer

# MixupPrivacyLib first: in a source checkout it is what makes ``medprivacy`` importable. Its names are also
# re-exported from here, where scripts, Slicer's generic tests and Testing/ look them up (hence F401).
from MixupPrivacyLib import (  # noqa: F401
    DEFAULT_SERVER_URL,
    PIP_IMPORT_NAMES,
    PIP_REQUIREMENTS,
    PRIVACY_LEVELS,
    UNMIX_MODES,
    BackgroundJob,
    MixupPrivacyLogic,
    MixupPrivacyTestMixin,
    normalized_server_url,
)
from medprivacy.errors import CancelledError, InputError, MedPrivacyError  # noqa: F401  (CancelledError: re-exported)
from medprivacy.mixup.privacy import LEVELS

try:
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    _HAVE_APP = True
except ImportError:  # slicer-core: no Qt, so no application classes (nothing is stubbed)
    _HAVE_APP = False


if _HAVE_APP:
    try:
        from slicer.i18n import tr as _
        from slicer.i18n import translate
    except ImportError:  # Slicer before translations existed
        def _(text):
            return text

        def translate(_context, text):
            return text

    # Job plumbing, status line, server box and consent, the same in both MedPrivacy modules (needs Qt).
    from MedPrivacySlicerCommon.widgets import ServerJobWidgetMixin

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

    class MixupPrivacyWidget(ServerJobWidgetMixin, ScriptedLoadableModuleWidget):
        """GUI -> Logic only. Network and model work run in a ``BackgroundJob`` (``ServerJobWidgetMixin``);
        results are applied here."""

        settingsPrefix = _SETTINGS
        defaultServerUrl = DEFAULT_SERVER_URL

        def __init__(self, parent=None) -> None:
            ScriptedLoadableModuleWidget.__init__(self, parent)
            #: Set before ``setup`` to run the widget on another logic (tests, scripting).
            self.logic = None
            self._initJobState()

        # -- lifecycle -------------------------------------------------------------------------------------

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            uiWidget = slicer.util.loadUI(self.resourcePath("UI/MixupPrivacy.ui"))
            self.layout.addWidget(uiWidget)
            self.ui = slicer.util.childWidgetVariables(uiWidget)
            uiWidget.setMRMLScene(slicer.mrmlScene)
            if self.logic is None:
                self.logic = MixupPrivacyLogic(slicer.mrmlScene)

            self._setupJobTimer()

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
            self.ui.privacyComboBox.connect("currentIndexChanged(int)", self._onPrivacyChanged)
            self.ui.unmixComboBox.connect("currentIndexChanged(int)", self._saveSettings)
            self._setStatus(_("Ready."))
            self._updateButtons()

        def cleanup(self) -> None:
            self._stopJob()
            ScriptedLoadableModuleWidget.cleanup(self)

        # -- settings (never the token) --------------------------------------------------------------------

        def _restoreSettings(self) -> None:
            self._restoreServerSettings()
            settingsValue = slicer.util.settingsValue
            self.ui.keyDirectoryPathLineEdit.currentPath = settingsValue(_SETTINGS + "KeyDirectory", "") or self._defaultKeyDir()
            level = settingsValue(_SETTINGS + "PrivacyLevel", PRIVACY_LEVELS[0])
            self.ui.privacyComboBox.currentIndex = PRIVACY_LEVELS.index(level) if level in PRIVACY_LEVELS else 0
            self.ui.ttaSpinBox.value = settingsValue(_SETTINGS + "TtaCount", LEVELS[self._privacyLevel()].tta, converter=int)
            mode = settingsValue(_SETTINGS + "UnmixMode", UNMIX_MODES[0])
            self.ui.unmixComboBox.currentIndex = UNMIX_MODES.index(mode) if mode in UNMIX_MODES else 0

        def _saveSettings(self, *_args) -> None:
            settings = qt.QSettings()
            self._saveServerSettings(settings)
            settings.setValue(_SETTINGS + "KeyDirectory", self.ui.keyDirectoryPathLineEdit.currentPath)
            settings.setValue(_SETTINGS + "TtaCount", self.ui.ttaSpinBox.value)
            settings.setValue(_SETTINGS + "PrivacyLevel", self._privacyLevel())
            settings.setValue(_SETTINGS + "UnmixMode", self._unmixMode())

        @staticmethod
        def _defaultKeyDir() -> str:
            try:
                from medprivacy.mixup.bank import default_key_dir
            except ImportError:  # dependencies not installed yet: the user picks a folder or installs first
                return ""
            return str(default_key_dir())

        def _privacyLevel(self) -> str:
            return PRIVACY_LEVELS[max(0, min(self.ui.privacyComboBox.currentIndex, len(PRIVACY_LEVELS) - 1))]

        def _onPrivacyChanged(self, *_args) -> None:
            self.ui.ttaSpinBox.value = LEVELS[self._privacyLevel()].tta  # each level was measured at its own count
            self._saveSettings()

        def _unmixMode(self) -> str:
            return UNMIX_MODES[max(0, min(self.ui.unmixComboBox.currentIndex, len(UNMIX_MODES) - 1))]

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
                              privacy=self._privacyLevel(), tta=self.ui.ttaSpinBox.value, unmix=self._unmixMode(),
                              keep_uploaded=showUploaded, rebuild=self.ui.showRebuildCheckBox.checked)
                self._saveSettings()
                logic = self.logic
                self._startJob(
                    _("Private segmentation"),
                    lambda progress, cancel: logic.compute(image, progress=progress, cancel=cancel, **kwargs),
                    lambda result: self._applyResult(result, inputNodeID, outputNodeID, showUploaded),
                )

            self._guarded(_("Could not start the private segmentation."), start)

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
            uploadedNode, rebuildNode = self.logic.last_uploaded_node, self.logic.last_rebuild_node
            shown = rebuildNode or uploadedNode
            slicer.util.setSliceViewerLayers(background=shown or inputNode, fit=shown is not None)
            if rebuildNode is not None:
                self._setStatus(_("Done. Showing what a curious server could rebuild ({name}).").format(name=rebuildNode.GetName()))
            elif uploadedNode is not None:
                self._setStatus(_("Done. Showing what the server received ({name}).").format(name=uploadedNode.GetName()))
            else:
                self._setStatus(_("Done: tissue segments in {name}.").format(name=segmentationNode.GetName()))

        # -- dependencies and consent ----------------------------------------------------------------------

        def _ensureDependencies(self) -> bool:
            import importlib.util

            torchMissing = importlib.util.find_spec("torch") is None
            missing = [name for name in PIP_IMPORT_NAMES if importlib.util.find_spec(name) is None]
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

        def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
            return (
                _("The scan will be cut into patches, each mixed with a random reference patch from your private "
                  "key, and only these mixed patches are sent to:\n\n{server}\n\nThe key and the unmixed scan never "
                  "leave this computer. Send mixed patches to this server now and in the future?").format(server=server),
                _("Send data to a server?"),
            )

        # -- buttons (job plumbing and status: ServerJobWidgetMixin) -----------------------------------------

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
