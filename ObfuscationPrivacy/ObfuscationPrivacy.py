"""ObfuscationPrivacy: have a remote server train and run classifiers on frames it cannot read back (Popescu et al.
2022: a VAE followed by a secret random non-bijective intensity mapping).

Only the classes that need the application live here: module, widget and in-app test, defined only when Qt is
importable. The logic and the shared test bodies are in ``ObfuscationPrivacyLib`` (they run under PyPI's
``slicer-core`` too) and are re-exported, because scripts and Slicer's generic tests look them up on this module.
"""
from __future__ import annotations

import os

import slicer

# ObfuscationPrivacyLib first: in a source checkout it is what makes ``medprivacy`` importable.
from ObfuscationPrivacyLib import (
    DEFAULT_SERVER_URL,
    DEFAULT_TRAIN_STEPS,
    PIP_IMPORT_NAMES,
    PIP_REQUIREMENTS,
    BackgroundJob,
    NodeFrames,
    ObfuscationPrivacyLogic,
    ObfuscationPrivacyTestMixin,
    normalized_server_url,
)
from medprivacy.errors import CancelledError, InputError, MedPrivacyError

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

__all__ = [
    "BackgroundJob", "DEFAULT_SERVER_URL", "DEFAULT_TRAIN_STEPS", "NodeFrames", "ObfuscationPrivacyLogic",
    "ObfuscationPrivacyTestMixin", "PIP_IMPORT_NAMES", "PIP_REQUIREMENTS", "normalized_server_url", "CancelledError",
    "InputError", "MedPrivacyError",
]


if _HAVE_APP:
    try:
        from slicer.i18n import tr as _
        from slicer.i18n import translate
    except ImportError:  # Slicer before translations existed
        def _(text):
            return text

        def translate(_context, text):
            return text

    # Job plumbing, status line, server box and consent, the same in every MedPrivacy module (needs Qt).
    from MedPrivacySlicerCommon.widgets import ServerJobWidgetMixin

    _SETTINGS = "ObfuscationPrivacy/"

    class ObfuscationPrivacy(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("Obfuscation Privacy")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy contributors"]
            self.parent.helpText = _(
                "Obfuscates 2D frames and runs (2D + time) with this site's secret key (a VAE followed by a random "
                "many-to-one intensity mapping), so that a MedPrivacy server can train a classifier on them and "
                "classify new frames without seeing readable images. \"Obfuscate\" adds exactly what would leave this "
                "computer as a new node. Use the same key for training and for classification: a model only "
                "understands frames made with the key of its training frames. The key never leaves this computer."
            )
            self.parent.acknowledgementText = _(
                "Method: Popescu et al., \"Obfuscation Algorithm for Privacy-Preserving Deep Learning-Based Medical "
                "Image Analysis\", Applied Sciences 12(8), 2022."
            )

    class ObfuscationPrivacyWidget(ServerJobWidgetMixin, ScriptedLoadableModuleWidget):
        """GUI -> Logic only. Each action is one logic call run in a ``BackgroundJob`` (``ServerJobWidgetMixin``);
        results are put into the scene here."""

        settingsPrefix = _SETTINGS
        defaultServerUrl = DEFAULT_SERVER_URL

        def __init__(self, parent=None) -> None:
            ScriptedLoadableModuleWidget.__init__(self, parent)
            #: Set before ``setup`` to run the widget on another logic (tests, scripting).
            self.logic = None
            self._initJobState()

        def setup(self) -> None:
            ScriptedLoadableModuleWidget.setup(self)
            uiWidget = slicer.util.loadUI(self.resourcePath("UI/ObfuscationPrivacy.ui"))
            self.layout.addWidget(uiWidget)
            self.ui = slicer.util.childWidgetVariables(uiWidget)
            uiWidget.setMRMLScene(slicer.mrmlScene)
            if self.logic is None:
                self.logic = ObfuscationPrivacyLogic(slicer.mrmlScene)
            self._setupJobTimer()
            self._restoreSettings()
            self.ui.trainStepsSpinBox.value = DEFAULT_TRAIN_STEPS

            self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
            self.ui.generateKeyButton.connect("clicked(bool)", self.onGenerateKey)
            self.ui.obfuscateButton.connect("clicked(bool)", self.onObfuscate)
            self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
            self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
            self.ui.trainButton.connect("clicked(bool)", self.onTrain)
            self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
            self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
            self.ui.keyDirectoryPathLineEdit.connect("currentPathChanged(QString)", self._onKeyChanged)
            self.ui.serverUrlLineEdit.connect("editingFinished()", self._saveSettings)
            self.ui.caBundlePathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
            self._setStatus(_("Ready."))
            self._onKeyChanged()

        def cleanup(self) -> None:
            self._stopJob()
            ScriptedLoadableModuleWidget.cleanup(self)

        # -- settings (never the token) --------------------------------------------------------------------

        def _restoreSettings(self) -> None:
            self._restoreServerSettings()
            self.ui.keyDirectoryPathLineEdit.currentPath = slicer.util.settingsValue(_SETTINGS + "KeyDirectory", self._defaultKeyDir())

        def _saveSettings(self, *_args) -> None:
            settings = qt.QSettings()
            self._saveServerSettings(settings)
            settings.setValue(_SETTINGS + "KeyDirectory", self.ui.keyDirectoryPathLineEdit.currentPath)

        @staticmethod
        def _defaultKeyDir() -> str:
            from medprivacy.obfuscation.key import default_key_dir

            return str(default_key_dir())

        def _keyDir(self) -> str:
            keyDir = self.ui.keyDirectoryPathLineEdit.currentPath
            if not keyDir:
                raise InputError("choose the obfuscation key folder, or generate a key")
            return keyDir

        def _onKeyChanged(self, *_args) -> None:
            keyDir = self.ui.keyDirectoryPathLineEdit.currentPath
            try:
                self.ui.keyStatusLabel.text = self.logic.describe_key(keyDir) if keyDir and os.path.isdir(keyDir) else _("No key yet.")
            except MedPrivacyError as exc:
                self.ui.keyStatusLabel.text = str(exc).splitlines()[0]
            self._saveSettings()
            self._updateButtons()

        # -- key -------------------------------------------------------------------------------------------

        def onGenerateKey(self) -> None:
            def start():
                keyDir = self.ui.keyDirectoryPathLineEdit.currentPath or self._defaultKeyDir()
                if not self._ensureDependencies():
                    return
                from medprivacy.obfuscation.key import KEY_FILE

                replace = os.path.isfile(os.path.join(keyDir, KEY_FILE))
                if replace and not slicer.util.confirmYesNoDisplay(
                    _("{folder} already holds an obfuscation key. Models trained on frames made with it will not "
                      "understand frames made with a new key. Replace it anyway?").format(folder=keyDir)
                ):
                    return
                self.ui.keyDirectoryPathLineEdit.currentPath = keyDir
                logic = self.logic
                self._startJob(_("Key generation"),
                               lambda progress, cancel: logic.generate_key(keyDir, force=replace, progress=progress, cancel=cancel),
                               lambda description: (self._onKeyChanged(), self._setStatus(_("Key stored in {folder}.").format(folder=keyDir))))

            self._guarded(_("Could not generate the key."), start)

        # -- obfuscate -------------------------------------------------------------------------------------

        def onObfuscate(self) -> None:
            def start():
                frames = self.logic.node_to_frames(self.ui.inputSelector.currentNode())
                keyDir = self._keyDir()
                if not self._ensureDependencies():
                    return
                logic = self.logic
                self._startJob(_("Obfuscation"),
                               lambda progress, cancel: logic.obfuscate_frames(frames.pixels, keyDir, progress),
                               lambda result: self._showObfuscated(result, frames))

            self._guarded(_("Could not obfuscate the frames."), start)

        def _showObfuscated(self, result, frames: NodeFrames) -> None:
            codes, keyId = result
            node = self.logic.frames_to_node(codes, frames)
            if node.IsA("vtkMRMLScalarVolumeNode"):
                slicer.util.setSliceViewerLayers(background=node, fit=True)
            self._setStatus(_("{count} frame(s) obfuscated with key {key} into {name}: this is what a server would receive.").format(
                count=len(codes), key=keyId, name=node.GetName()))

        # -- server ----------------------------------------------------------------------------------------

        def onTestConnection(self) -> None:
            def start():
                url, token, caBundle = self._connection()
                if not self._ensureDependencies():
                    return
                self._saveSettings()
                logic = self.logic
                self._startJob(_("Connection test"), lambda progress, cancel: logic.test_connection(url, token=token, ca_bundle=caBundle),
                               lambda line: self._setStatus(line))

            self._guarded(_("Could not test the connection."), start)

        def onRefreshModels(self) -> None:
            def start():
                url, token, caBundle = self._connection()
                keyDir = self._keyDir()
                if not self._ensureDependencies():
                    return
                logic = self.logic
                self._startJob(_("Model list"),
                               lambda progress, cancel: logic.list_models(url, token=token, ca_bundle=caBundle, key_dir=keyDir),
                               self._showModels)

            self._guarded(_("Could not list the server's models."), start)

        def _showModels(self, models) -> None:
            self.ui.modelComboBox.clear()
            for model in models:
                accuracy = model.get("validation_accuracy")
                label = f"{model['id']}: {', '.join(model['classes'])}" + (f" (validation {accuracy:.3f})" if accuracy is not None else "")
                self.ui.modelComboBox.addItem(label, model["id"])
            self._setStatus(_("{count} model(s) on the server trained with this key.").format(count=len(models)))
            self._updateButtons()

        def onClassify(self) -> None:
            def start():
                inputNode = self.ui.inputSelector.currentNode()
                frames = self.logic.node_to_frames(inputNode)
                keyDir = self._keyDir()
                model = self.ui.modelComboBox.currentData
                url, token, caBundle = self._connection()
                if not self._ensureDependencies() or not self._confirmUpload(url):
                    return
                self._saveSettings()
                logic = self.logic
                name = f"{frames.name} classification"
                self._startJob(
                    _("Classification"),
                    lambda progress, cancel: logic.classify_frames(frames.pixels, keyDir, url, model, token, caBundle, progress, cancel),
                    lambda answer: self._showClassification(answer, name, frames.index_values),
                )

            self._guarded(_("Could not classify the frames."), start)

        def _showClassification(self, answer, name: str, frameLabels) -> None:
            table = self.logic.results_table(answer, name, frameLabels)
            self.ui.resultsTableView.setMRMLTableNode(table)
            self._setStatus(_("{count} frame(s) classified with {model}.").format(count=len(answer["predicted"]), model=answer["model"]))

        def onTrain(self) -> None:
            def start():
                dataset = self.ui.datasetPathLineEdit.currentPath
                keyDir = self._keyDir()
                url, token, caBundle = self._connection()
                if not dataset:
                    raise InputError("choose the dataset folder (one subfolder per class) or CSV")
                if not self._ensureDependencies() or not self._confirmUpload(url):
                    return
                self._saveSettings()
                steps = self.ui.trainStepsSpinBox.value
                name = self.ui.trainNameLineEdit.text.strip()
                logic = self.logic
                self._startJob(
                    _("Training on the server"),
                    lambda progress, cancel: logic.train_from_folder(dataset, keyDir, url, token, caBundle, steps, name, progress, cancel),
                    lambda job: (self._setStatus(_("Model {model} trained (validation accuracy {accuracy}).").format(
                        model=job["model"], accuracy=job["progress"].get("validation_accuracy"))), self.onRefreshModels()),
                )

            self._guarded(_("Could not start the training."), start)

        # -- dependencies and consent ----------------------------------------------------------------------

        def _ensureDependencies(self) -> bool:
            import importlib.util

            torchMissing = importlib.util.find_spec("torch") is None
            missing = [name for name in PIP_IMPORT_NAMES if importlib.util.find_spec(name) is None]
            if not torchMissing and not missing:
                return True
            names = (["torch (PyTorch extension)"] if torchMissing else []) + missing
            if not slicer.util.confirmYesNoDisplay(
                _("Obfuscation Privacy needs Python packages that are not installed yet: {names}.\n\n"
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
                slicer.util.pip_install(PIP_REQUIREMENTS)
            return True

        def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
            return (
                _("The frames are obfuscated here with your key (\"Obfuscate\" shows exactly what is sent), and only "
                  "the obfuscated frames and the key's public id are sent to:\n\n{server}\n\nThe key never leaves this "
                  "computer. Send obfuscated frames to this server now and in the future?").format(server=server),
                _("Send obfuscated frames to a server?"),
            )

        def _cancellingText(self) -> str:
            return _("Cancelling (a training job on the server is cancelled too)...")

        def _updateButtons(self, *_args) -> None:
            busy = self._job is not None
            hasInput = self.ui.inputSelector.currentNode() is not None
            hasKey = bool(self.ui.keyDirectoryPathLineEdit.currentPath)
            self.ui.obfuscateButton.enabled = not busy and hasInput and hasKey
            self.ui.classifyButton.enabled = not busy and hasInput and hasKey and self.ui.modelComboBox.count > 0
            self.ui.trainButton.enabled = not busy and hasKey
            self.ui.generateKeyButton.enabled = not busy
            self.ui.refreshModelsButton.enabled = not busy
            self.ui.testConnectionButton.enabled = not busy
            self.ui.cancelButton.enabled = busy

    class ObfuscationPrivacyTest(ScriptedLoadableModuleTest, ObfuscationPrivacyTestMixin):
        """Runs the shared test bodies on the application's scene with the shipped weights; the server body needs
        OBFUSCATION_TEST_SERVER_URL (a running 'medprivacy serve')."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            for test in (self.test_frames_round_trip, self.test_rejects_unusable_inputs, self.test_with_server):
                self.setUp()
                test()
            self.delayDisplay("ObfuscationPrivacy tests passed")

        def test_frames_round_trip(self):
            import tempfile

            with tempfile.TemporaryDirectory() as folder:
                self.check_frames_round_trip_with_geometry(slicer.mrmlScene, folder)

        def test_rejects_unusable_inputs(self):
            import tempfile

            # Port 9 (discard) on loopback: nothing listens there on a desktop, so the connection is refused.
            with tempfile.TemporaryDirectory() as folder:
                self.check_rejects_unusable_inputs(slicer.mrmlScene, "http://127.0.0.1:9", folder)

        def test_with_server(self):
            import tempfile

            url = os.environ.get("OBFUSCATION_TEST_SERVER_URL")
            if not url:
                self.delayDisplay("Server test skipped: set OBFUSCATION_TEST_SERVER_URL to a running MedPrivacy server")
                return
            with tempfile.TemporaryDirectory() as folder:
                self.check_train_classify_and_cancel(slicer.mrmlScene, url, folder)
