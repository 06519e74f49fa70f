"""ObfuscationPrivacy's panel: the parameter node of its state and the GUI -> logic calls (needs the application).

Key generation, obfuscation, classification and training run in a worker process through the logic's ``start_*``
calls; the model list is one short request in a ``BackgroundJob`` (``ServerJobPanel`` says why). Results are put into
the scene here.
"""

from __future__ import annotations

import os
from typing import Annotated, Union

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from medprivacy.errors import InputError, MedPrivacyError
from MedPrivacySlicerCommon.widgets import ServerJobPanel

from .dependencies import NEEDS_TORCH, PACKAGES
from .logic import DEFAULT_SERVER_URL, DEFAULT_TRAIN_STEPS, NodeFrames, ObfuscationPrivacyLogic
from .protocols import ObfuscationPrivacyLogicProtocol


@parameterNodeWrapper
class ObfuscationPrivacyParameterNode:
    """The panel's state, saved with the scene. (Server URL, CA bundle and key folder are per user: QSettings.)"""

    #: A scalar volume (frames along K) or a sequence of single-slice volumes.
    inputNode: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLSequenceNode]
    trainSteps: Annotated[int, WithinRange(1, 20000)] = DEFAULT_TRAIN_STEPS
    trainName: str = ""


class ObfuscationPrivacyPanel(ServerJobPanel):
    moduleName = "ObfuscationPrivacy"
    moduleTitle = "Obfuscation Privacy"
    defaultServerUrl = DEFAULT_SERVER_URL
    packages = PACKAGES
    needsTorch = NEEDS_TORCH
    keyModule = "medprivacy.obfuscation.key"
    keyFileConstant = "KEY_FILE"
    parameterNodeClass = ObfuscationPrivacyParameterNode

    def __init__(self, logic: ObfuscationPrivacyLogicProtocol | None = None, installer=None, parent=None) -> None:
        ServerJobPanel.__init__(self, logic or ObfuscationPrivacyLogic(slicer.mrmlScene), installer, parent)
        self._restoreKeyDirectory()
        for button, action in (
            (self.ui.generateKeyButton, self.onGenerateKey),
            (self.ui.obfuscateButton, self.onObfuscate),
            (self.ui.refreshModelsButton, self.onRefreshModels),
            (self.ui.classifyButton, self.onClassify),
            (self.ui.trainButton, self.onTrain),
        ):
            button.connect("clicked(bool)", action)
        self.ui.keyDirectoryPathLineEdit.connect("currentPathChanged(QString)", self._onKeyChanged)
        self._setStatus(_("Ready."))
        self.initializeParameterNode()
        self._onKeyChanged()

    def parameterNodeGuiMapping(self):
        return {
            "inputNode": self.ui.inputSelector,
            "trainSteps": self.ui.trainStepsSpinBox,
            "trainName": self.ui.trainNameLineEdit,
        }

    # -- key -----------------------------------------------------------------------------------------------

    def _keyDir(self) -> str:
        keyDir = self.ui.keyDirectoryPathLineEdit.currentPath
        if not keyDir:
            raise InputError("choose the obfuscation key folder, or generate a key")
        return keyDir

    def _onKeyChanged(self, *_args) -> None:
        keyDir = self.ui.keyDirectoryPathLineEdit.currentPath
        try:
            described = keyDir and os.path.isdir(keyDir)
            self.ui.keyStatusLabel.text = self.logic.describe_key(keyDir) if described else _("No key yet.")
        except MedPrivacyError as exc:
            self.ui.keyStatusLabel.text = str(exc).splitlines()[0]
        self.setUserSetting("KeyDirectory", keyDir)
        self._updateButtons()

    def onGenerateKey(self) -> None:
        def start():
            keyDir = self.ui.keyDirectoryPathLineEdit.currentPath or self._defaultKeyDir()
            logic = self.logic
            self._startKeyGeneration(
                keyDir,
                _(
                    "{folder} already holds an obfuscation key. Models trained on frames made with it will not "
                    "understand frames made with a new key. Replace it anyway?"
                ),
                lambda folder, replace, onProgress, onDone, onError: logic.start_key_generation(
                    folder, force=replace, on_progress=onProgress, on_done=onDone, on_error=onError
                ),
                _("Key stored in {folder}."),
                onDone=self._onKeyChanged,
            )

        self._guarded(_("Could not generate the key."), start)

    # -- obfuscate -----------------------------------------------------------------------------------------

    def onObfuscate(self) -> None:
        def start():
            frames = self.logic.node_to_frames(self.parameterNode.inputNode)
            keyDir = self._keyDir()
            if not self._ensureDependencies():
                return
            logic = self.logic
            self._startWorkerJob(
                _("Obfuscation"),
                lambda onProgress, onDone, onError: logic.start_obfuscation(
                    frames.pixels, keyDir, on_progress=onProgress, on_done=onDone, on_error=onError
                ),
                lambda result: self._showObfuscated(result, frames),
            )

        self._guarded(_("Could not obfuscate the frames."), start)

    def _showObfuscated(self, result, frames: NodeFrames) -> None:
        codes, keyId = result
        node = self.logic.frames_to_node(codes, frames)
        if node.IsA("vtkMRMLScalarVolumeNode"):
            slicer.util.setSliceViewerLayers(background=node, fit=True)
        self._setStatus(
            _("{count} frame(s) obfuscated with key {key} into {name}: this is what a server would receive.").format(
                count=len(codes), key=keyId, name=node.GetName()
            )
        )

    # -- server --------------------------------------------------------------------------------------------

    def onRefreshModels(self) -> None:
        def start():
            url, token, caBundle = self._connection()
            keyDir = self._keyDir()
            if not self._ensureDependencies():
                return
            logic = self.logic
            # A thread, not a worker: one short request, mostly waiting on the network (the GIL is free meanwhile).
            self._startJob(
                _("Model list"),
                lambda progress, cancel: logic.list_models(url, token=token, ca_bundle=caBundle, key_dir=keyDir),
                self._showModels,
            )

        self._guarded(_("Could not list the server's models."), start)

    def _showModels(self, models) -> None:
        self.ui.modelComboBox.clear()
        for model in models:
            accuracy = model.get("validation_accuracy")
            label = f"{model['id']}: {', '.join(model['classes'])}"
            if accuracy is not None:
                label += f" (validation {accuracy:.3f})"
            self.ui.modelComboBox.addItem(label, model["id"])
        self._setStatus(_("{count} model(s) on the server trained with this key.").format(count=len(models)))
        self._updateButtons()

    def onClassify(self) -> None:
        def start():
            frames = self.logic.node_to_frames(self.parameterNode.inputNode)
            keyDir = self._keyDir()
            model = self.ui.modelComboBox.currentData
            url, token, caBundle = self._connection()
            if not self._ensureDependencies() or not self._confirmUpload(url):
                return
            logic = self.logic
            name = f"{frames.name} classification"
            self._startWorkerJob(
                _("Classification"),
                lambda onProgress, onDone, onError: logic.start_classification(
                    frames.pixels,
                    keyDir,
                    url,
                    model,
                    token,
                    caBundle,
                    on_progress=onProgress,
                    on_done=onDone,
                    on_error=onError,
                ),
                lambda answer: self._showClassification(answer, name, frames.index_values),
            )

        self._guarded(_("Could not classify the frames."), start)

    def _showClassification(self, answer, name: str, frameLabels) -> None:
        table = self.logic.results_table(answer, name, frameLabels)
        self.ui.resultsTableView.setMRMLTableNode(table)
        self._setStatus(
            _("{count} frame(s) classified with {model}.").format(count=len(answer["predicted"]), model=answer["model"])
        )

    def onTrain(self) -> None:
        def start():
            dataset = self.ui.datasetPathLineEdit.currentPath
            keyDir = self._keyDir()
            url, token, caBundle = self._connection()
            if not dataset:
                raise InputError("choose the dataset folder (one subfolder per class) or CSV")
            if not self._ensureDependencies() or not self._confirmUpload(url):
                return
            steps, name = self.parameterNode.trainSteps, self.parameterNode.trainName.strip()
            logic = self.logic
            self._startWorkerJob(
                _("Training on the server"),
                lambda onProgress, onDone, onError: logic.start_training(
                    dataset,
                    keyDir,
                    url,
                    token,
                    caBundle,
                    steps,
                    name,
                    on_progress=onProgress,
                    on_done=onDone,
                    on_error=onError,
                ),
                self._showTrained,
            )

        self._guarded(_("Could not start the training."), start)

    def _showTrained(self, job) -> None:
        self._setStatus(
            _("Model {model} trained (validation accuracy {accuracy}).").format(
                model=job["model"], accuracy=job["progress"].get("validation_accuracy")
            )
        )
        self.onRefreshModels()

    # -- consent and buttons -------------------------------------------------------------------------------

    def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
        return (
            _(
                'The frames are obfuscated here with your key ("Obfuscate" shows exactly what is sent), and only '
                "the obfuscated frames and the key's public id are sent to:\n\n{server}\n\nThe key never leaves this "
                "computer. Send obfuscated frames to this server now and in the future?"
            ).format(server=server),
            _("Send obfuscated frames to a server?"),
        )

    def _cancellingText(self) -> str:
        return _("Cancelling (a training job on the server is cancelled too)...")

    def _updateButtons(self, *_args) -> None:
        busy = self.busy
        hasInput = self.parameterNode is not None and self.parameterNode.inputNode is not None
        hasKey = bool(self.ui.keyDirectoryPathLineEdit.currentPath)
        self.ui.obfuscateButton.enabled = not busy and hasInput and hasKey
        self.ui.classifyButton.enabled = not busy and hasInput and hasKey and self.ui.modelComboBox.count > 0
        self.ui.trainButton.enabled = not busy and hasKey
        self.ui.generateKeyButton.enabled = not busy
        self.ui.refreshModelsButton.enabled = not busy
        self.ui.testConnectionButton.enabled = not busy
        self.ui.cancelButton.enabled = self._job is not None
