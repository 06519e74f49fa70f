"""MixupPrivacy's panel: the parameter node of its state and the GUI -> logic calls (needs the application).

Segmentation and key generation run in a worker process through the logic's ``start_*`` calls (``ServerJobPanel``);
the logic puts the segmentation into the scene when the worker answers, and the panel shows it.
"""

from __future__ import annotations

import enum
from typing import Annotated

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from medprivacy.errors import InputError
from medprivacy.mixup.privacy import LEVELS
from MedPrivacySlicerCommon.widgets import ServerJobPanel

from .dependencies import NEEDS_TORCH, PACKAGES
from .logic import DEFAULT_SERVER_URL, PRIVACY_LEVELS, UNMIX_MODES, MixupPrivacyLogic
from .protocols import MixupPrivacyLogicProtocol


class PrivacyLevel(enum.Enum):
    """``PRIVACY_LEVELS``, in the combo box's order, with the labels it shows."""

    STANDARD = "standard"
    STRONG = "strong"
    PAPER = "paper"

    def label(self) -> str:
        return {"standard": _("Standard"), "strong": _("Strong"), "paper": _("Paper (comparison only)")}[self.value]


class UnmixMode(enum.Enum):
    LEARNED = "learned"
    NAIVE = "naive"

    def label(self) -> str:
        return {"learned": _("Learned"), "naive": _("Naive")}[self.value]


assert tuple(level.value for level in PrivacyLevel) == PRIVACY_LEVELS
assert tuple(mode.value for mode in UnmixMode) == UNMIX_MODES


@parameterNodeWrapper
class MixupPrivacyParameterNode:
    """The panel's state, saved with the scene. (Server URL, CA bundle and key folder are per user: QSettings.)"""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    privacy: PrivacyLevel = PrivacyLevel.STANDARD
    #: Mixed copies per patch; follows the privacy level (each level was measured at its own count).
    tta: Annotated[int, WithinRange(1, 32)] = LEVELS[PRIVACY_LEVELS[0]].tta
    unmix: UnmixMode = UnmixMode.LEARNED
    showUploaded: bool = False
    showRebuild: bool = False


class MixupPrivacyPanel(ServerJobPanel):
    moduleName = "MixupPrivacy"
    moduleTitle = "Mixup Privacy"
    defaultServerUrl = DEFAULT_SERVER_URL
    packages = PACKAGES
    needsTorch = NEEDS_TORCH
    keyModule = "medprivacy.mixup.bank"
    keyFileConstant = "BANK_FILE"
    parameterNodeClass = MixupPrivacyParameterNode

    def __init__(self, logic: MixupPrivacyLogicProtocol | None = None, installer=None, parent=None) -> None:
        ServerJobPanel.__init__(self, logic or MixupPrivacyLogic(slicer.mrmlScene), installer, parent)
        self._privacy = None
        self._restoreKeyDirectory()
        self.ui.keyDirectoryPathLineEdit.connect(
            "currentPathChanged(QString)", lambda path: self.setUserSetting("KeyDirectory", path)
        )
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.generateKeyButton.connect("clicked(bool)", self.onGenerateKey)
        self._setStatus(_("Ready."))
        self.initializeParameterNode()

    def parameterNodeGuiMapping(self):
        return {
            "inputVolume": self.ui.inputSelector,
            "outputSegmentation": self.ui.outputSelector,
            "privacy": self.ui.privacyComboBox,
            "tta": self.ui.ttaSpinBox,
            "unmix": self.ui.unmixComboBox,
            "showUploaded": self.ui.showUploadedCheckBox,
            "showRebuild": self.ui.showRebuildCheckBox,
        }

    def initializeParameterNode(self) -> None:
        self._privacy = None  # a new or reloaded scene keeps its own count
        ServerJobPanel.initializeParameterNode(self)

    def _connectedText(self, description: str) -> str:
        return _("Connected: {description}").format(description=description)

    def _onParameterNodeModified(self) -> None:
        parameters = self.parameterNode
        if parameters is not None and parameters.privacy != self._privacy:
            previous, self._privacy = self._privacy, parameters.privacy
            if previous is not None:  # a level the user picks brings the count it was measured at
                parameters.tta = LEVELS[self._privacy.value].tta
        self._updateButtons()

    # -- actions -------------------------------------------------------------------------------------------

    def onApply(self) -> None:
        def start():
            parameters = self.parameterNode
            inputNode = parameters.inputVolume
            self.logic.volume_node_to_sitk(inputNode)  # validates the input before any prompt
            url, token, caBundle = self._connection()
            if not self._ensureDependencies() or not self._confirmUpload(url):
                return
            outputNode = parameters.outputSegmentation
            kwargs = dict(
                url=url,
                token=token,
                ca_bundle=caBundle,
                key_dir=self.ui.keyDirectoryPathLineEdit.currentPath or None,
                privacy=parameters.privacy.value,
                tta=parameters.tta,
                unmix=parameters.unmix.value,
                output_segmentation_node=outputNode,
                show_uploaded=parameters.showUploaded,
                show_rebuild=parameters.showRebuild,
            )
            inputNodeID = inputNode.GetID()  # an ID, not the node, crosses the wait: the scene may change meanwhile
            logic = self.logic
            self._startWorkerJob(
                _("Private segmentation"),
                lambda onProgress, onDone, onError: logic.start_segmentation(
                    inputNode, on_progress=onProgress, on_done=onDone, on_error=onError, **kwargs
                ),
                lambda segmentationNode: self._showResult(segmentationNode, inputNodeID),
            )

        self._guarded(_("Could not start the private segmentation."), start)

    def onGenerateKey(self) -> None:
        def start():
            keyDir = self.ui.keyDirectoryPathLineEdit.currentPath or self._defaultKeyDir()
            if not keyDir:
                raise InputError("choose a folder for the private key")
            logic = self.logic
            self._startKeyGeneration(
                keyDir,
                _(
                    "{folder} already holds a private key. Replace it with a new one? Segmentations made with the old "
                    "key stay valid."
                ),
                lambda folder, replace, onProgress, onDone, onError: logic.start_key_generation(
                    folder, force=replace, on_progress=onProgress, on_done=onDone, on_error=onError
                ),
                _("Private key stored in {folder}."),
            )

        self._guarded(_("Could not generate the key."), start)

    def _showResult(self, segmentationNode, inputNodeID: str) -> None:
        inputNode = slicer.mrmlScene.GetNodeByID(inputNodeID)
        if self.parameterNode is not None:
            self.parameterNode.outputSegmentation = segmentationNode
        uploadedNode, rebuildNode = self.logic.last_uploaded_node, self.logic.last_rebuild_node
        shown = rebuildNode or uploadedNode
        slicer.util.setSliceViewerLayers(background=shown or inputNode, fit=shown is not None)
        if rebuildNode is not None:
            self._setStatus(
                _("Done. Showing what a curious server could rebuild ({name}).").format(name=rebuildNode.GetName())
            )
        elif uploadedNode is not None:
            self._setStatus(_("Done. Showing what the server received ({name}).").format(name=uploadedNode.GetName()))
        else:
            self._setStatus(_("Done: tissue segments in {name}.").format(name=segmentationNode.GetName()))

    # -- consent and buttons -------------------------------------------------------------------------------

    def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
        return (
            _(
                "The scan will be cut into patches, each mixed with a random reference patch from your private "
                "key, and only these mixed patches are sent to:\n\n{server}\n\nThe key and the unmixed scan never "
                "leave this computer. Send mixed patches to this server now and in the future?"
            ).format(server=server),
            _("Send data to a server?"),
        )

    def _updateButtons(self, *_args) -> None:
        busy = self.busy
        hasInput = self.parameterNode is not None and self.parameterNode.inputVolume is not None
        self.ui.applyButton.enabled = not busy and hasInput
        self.ui.applyButton.toolTip = (
            _("Segment the input volume through the private path") if hasInput else _("Select an input volume")
        )
        self.ui.cancelButton.enabled = self._job is not None
        self.ui.testConnectionButton.enabled = not busy
        self.ui.generateKeyButton.enabled = not busy
