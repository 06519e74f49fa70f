"""MedLockerWatermark's panel: the parameter node of its state and the GUI -> logic calls (needs the application).

A dataset folder is protected in a worker process (the logic's ``start_folder_protection``); short server calls
and one image's search run in a ``BackgroundJob`` (``ServerJobPanel`` says why). Results are put into the scene here.
"""

from __future__ import annotations

from typing import Annotated, Union

import qt
import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from medprivacy.errors import InputError
from MedPrivacySlicerCommon.widgets import ServerJobPanel

from .dependencies import NEEDS_TORCH, PACKAGES
from .logic import DEFAULT_MODE, DEFAULT_SERVER_URL, LESION_SOURCES, MODES, MedLockerWatermarkLogic
from .protocols import MedLockerWatermarkLogicProtocol

_MODEL_USE, _MODEL_NAME, _MODEL_WEIGHT = range(3)


@parameterNodeWrapper
class MedLockerWatermarkParameterNode:
    """The panel's state, saved with the scene; ranges are the controls' own. (Server URL and CA bundle are per
    user: QSettings. Passphrase, key file and folders are asked each session.)"""

    #: Greyscale or colour (RGB vector) volume; the combo box's nodeTypes are these exactly.
    inputVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
    sliceIndex: Annotated[int, WithinRange(0, 100000)] = 0
    mode: Annotated[str, Choice(list(MODES))] = DEFAULT_MODE
    lesionSource: Annotated[str, Choice(list(LESION_SOURCES))] = LESION_SOURCES[0]
    lesionSegmentation: slicer.vtkMRMLSegmentationNode
    logoScale: Annotated[float, WithinRange(1.0, 64.0)] = 4.0
    population: Annotated[int, WithinRange(2, 1000)] = 50
    generations: Annotated[int, WithinRange(1, 100)] = 3
    crossoverRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.9
    step: Annotated[int, WithinRange(1, 1000)] = 10
    localIterations: Annotated[int, WithinRange(1, 100)] = 3
    alphaMin: Annotated[float, WithinRange(0.0, 255.0)] = 100.0
    alphaMax: Annotated[float, WithinRange(0.0, 255.0)] = 255.0
    #: -1: a fresh random search each time.
    seed: Annotated[int, WithinRange(-1, 2147483647)] = -1
    unlockVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
    unlockSliceIndex: Annotated[int, WithinRange(0, 100000)] = 0
    appendToKey: bool = False


class MedLockerWatermarkPanel(ServerJobPanel):
    moduleName = "MedLockerWatermark"
    moduleTitle = "MedLocker Watermark"
    defaultServerUrl = DEFAULT_SERVER_URL
    packages = PACKAGES
    needsTorch = NEEDS_TORCH
    parameterNodeClass = MedLockerWatermarkParameterNode

    def __init__(self, logic: MedLockerWatermarkLogicProtocol | None = None, installer=None, parent=None) -> None:
        ServerJobPanel.__init__(self, logic or MedLockerWatermarkLogic(slicer.mrmlScene), installer, parent)
        for button, action in (
            (self.ui.refreshModelsButton, self.onRefreshModels),
            (self.ui.currentSliceButton, self.onUseCurrentSlice),
            (self.ui.protectButton, self.onProtect),
            (self.ui.exportKeyButton, self.onExportKey),
            (self.ui.loadKeyButton, self.onLoadKey),
            (self.ui.newKeyButton, self.onNewKey),
            (self.ui.newKeyFileButton, self.onNewKeyFile),
            (self.ui.unlockButton, self.onUnlock),
            (self.ui.verifyButton, self.onVerify),
            (self.ui.datasetProtectButton, self.onProtectDataset),
        ):
            button.connect("clicked(bool)", action)
        self._setStatus(_("Ready."))
        self._updateKeyStatus()
        self.initializeParameterNode()

    def parameterNodeGuiMapping(self):
        ui = self.ui
        return {
            "inputVolume": ui.inputSelector,
            "sliceIndex": ui.sliceSpinBox,
            "mode": ui.modeComboBox,
            "lesionSource": ui.lesionSourceComboBox,
            "lesionSegmentation": ui.segmentationSelector,
            "logoScale": ui.slSpinBox,
            "population": ui.populationSpinBox,
            "generations": ui.generationsSpinBox,
            "crossoverRate": ui.crossoverSpinBox,
            "step": ui.stepSpinBox,
            "localIterations": ui.hopsSpinBox,
            "alphaMin": ui.alphaMinSpinBox,
            "alphaMax": ui.alphaMaxSpinBox,
            "seed": ui.seedSpinBox,
            "unlockVolume": ui.unlockInputSelector,
            "unlockSliceIndex": ui.unlockSliceSpinBox,
            "appendToKey": ui.datasetAppendCheckBox,
        }

    # -- reading the panel ---------------------------------------------------------------------------------

    def _searchSettings(self):
        from medprivacy.watermark.batch import SearchSettings

        models, weights = [], []
        table = self.ui.modelsTableWidget
        for row in range(table.rowCount):
            use = table.item(row, _MODEL_USE)
            if use is not None and use.checkState() == qt.Qt.Checked:
                models.append(table.item(row, _MODEL_NAME).text())
                try:
                    weights.append(float(table.item(row, _MODEL_WEIGHT).text()))
                except (AttributeError, ValueError):
                    raise InputError(f"the weight of {models[-1]} must be a number") from None
        if table.rowCount and not models:
            raise InputError("tick at least one source model, or refresh the list from the server")
        p = self.parameterNode
        return SearchSettings(
            mode=p.mode,
            models=models or None,
            weights=weights or None,
            sl=p.logoScale,
            population=p.population,
            generations=p.generations,
            crossover_rate=p.crossoverRate,
            step=p.step,
            local_iterations=p.localIterations,
            alpha_range=(p.alphaMin, p.alphaMax),
            seed=None if p.seed < 0 else p.seed,
        )

    def _credentials(self) -> dict[str, str]:
        keyFile = self.ui.keyFilePathLineEdit.currentPath
        if keyFile:
            return {"key_file": keyFile}
        passphrase = self.ui.passphraseLineEdit.text
        if not passphrase:
            raise InputError("enter the key's passphrase, or choose a key file")
        return {"passphrase": passphrase}

    def _sliceIndex(self, node, index: int):
        if node is None:
            return None
        return index if self.logic.slice_count(node) > 1 else None

    def _logo(self):
        return self.logic.load_logo(self.ui.logoPathLineEdit.currentPath or None)

    # -- server --------------------------------------------------------------------------------------------

    def onRefreshModels(self) -> None:
        def start():
            url, token, caBundle = self._connection()
            if not self._ensureDependencies():
                return
            logic = self.logic
            # A thread, not a worker: one short request, mostly waiting on the network (the GIL is free meanwhile).
            self._startJob(
                _("Model list"),
                lambda progress, cancel: logic.list_models(url, token=token, ca_bundle=caBundle),
                self._showModels,
            )

        self._guarded(_("Could not list the server's models."), start)

    def _showModels(self, models) -> None:
        classifiers, segmenters = models
        table = self.ui.modelsTableWidget
        table.setRowCount(len(classifiers))
        for row, name in enumerate(sorted(classifiers)):
            use = qt.QTableWidgetItem()
            use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            use.setCheckState(qt.Qt.Checked)
            nameItem = qt.QTableWidgetItem(name)
            nameItem.setFlags(qt.Qt.ItemIsEnabled)
            table.setItem(row, _MODEL_USE, use)
            table.setItem(row, _MODEL_NAME, nameItem)
            table.setItem(row, _MODEL_WEIGHT, qt.QTableWidgetItem("1.0"))
        self._setStatus(
            _("{count} source model(s), {segmenters} lesion segmenter(s) on the server.").format(
                count=len(classifiers), segmenters=len(segmenters)
            )
        )

    # -- protect -------------------------------------------------------------------------------------------

    def onUseCurrentSlice(self) -> None:
        def action():
            sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            center = sliceNode.GetSliceToRAS().MultiplyPoint((0.0, 0.0, 0.0, 1.0))
            self.parameterNode.sliceIndex = self.logic.slice_index_at(self.parameterNode.inputVolume, center)

        self._guarded(_("Could not read the current slice."), action)

    def onProtect(self) -> None:
        def start():
            p = self.parameterNode
            inputNode, source = p.inputVolume, p.lesionSource
            # Everything that can be wrong with the input is found before any prompt or upload.
            image, logo, settings, mask = self.logic.prepare_protection(
                inputNode,
                self._sliceIndex(inputNode, p.sliceIndex),
                self._logo(),
                self._searchSettings(),
                source,
                p.lesionSegmentation,
            )
            url, token, caBundle = self._connection()
            if not self._ensureDependencies() or not self._confirmUpload(url):
                return
            inputNodeID = inputNode.GetID()  # IDs, not nodes, cross the wait: the scene may change meanwhile
            logic = self.logic
            # One image's search is one server request whose wait releases the GIL; the worker has no task for it
            # (a dataset folder, the long case, runs in the worker).
            self._startJob(
                _("Watermark search"),
                lambda progress, cancel: logic.compute_protection(
                    image, logo, settings, url, token, caBundle, source, mask, progress=progress, cancel=cancel
                ),
                lambda computed: self._applyProtection(computed, inputNodeID),
            )

        self._guarded(_("Could not start the protection."), start)

    def _applyProtection(self, computed, inputNodeID: str) -> None:
        inputNode = slicer.mrmlScene.GetNodeByID(inputNodeID)
        if inputNode is None:
            raise InputError("the input image was removed from the scene before the result arrived")
        result = self.logic.apply_protection(computed, inputNode)
        slicer.util.setSliceViewerLayers(background=result.output_node, fit=True)
        self.ui.predictionsTextEdit.setPlainText(
            "\n".join(
                [_("Protected as {name!r} in {node}.").format(name=result.name, node=result.output_node.GetName())]
                + result.prediction_lines()
            )
        )
        self._updateKeyStatus()
        self._setStatus(
            _("Done. Export the key (Key tab) before closing Slicer: it is the only way back to the original.")
        )

    # -- key -----------------------------------------------------------------------------------------------

    def onExportKey(self) -> None:
        def action():
            credentials = self._credentials()
            path = qt.QFileDialog.getSaveFileName(self, _("Export MedLocker key"), "", "MedLocker key (*.mlkey)")
            if not path:
                return
            self.logic.export_key(path, **credentials)
            self._updateKeyStatus()
            self._setStatus(_("Key saved, encrypted, to {path}.").format(path=path))

        self._guarded(_("Could not export the key."), action)

    def onLoadKey(self) -> None:
        def action():
            if self.logic.unsaved and not slicer.util.confirmYesNoDisplay(
                _(
                    "{count} protected image(s) are not in an exported key yet and can only be unlocked with "
                    "it. Load another key anyway?"
                ).format(count=self.logic.unsaved)
            ):
                return
            credentials = self._credentials()
            path = qt.QFileDialog.getOpenFileName(
                self, _("Load MedLocker key"), "", "MedLocker key (*.mlkey);;All files (*)"
            )
            if not path:
                return
            self.logic.load_key(path, **credentials)
            self._updateKeyStatus()
            self._setStatus(_("Key {path} loaded.").format(path=path))

        self._guarded(_("Could not load the key."), action)

    def onNewKey(self) -> None:
        def action():
            if self.logic.unsaved and not slicer.util.confirmYesNoDisplay(
                _("{count} protected image(s) are not in an exported key yet. Start a new key anyway?").format(
                    count=self.logic.unsaved
                )
            ):
                return
            self.logic.new_key()
            self._updateKeyStatus()

        self._guarded(_("Could not start a new key."), action)

    def onNewKeyFile(self) -> None:
        def action():
            path = qt.QFileDialog.getSaveFileName(self, _("New key file (32-byte secret)"), "", "All files (*)")
            if not path:
                return
            self.logic.generate_key_file(path)
            self.ui.keyFilePathLineEdit.currentPath = path
            self._setStatus(_("Secret written to {path}; keep it safe.").format(path=path))

        self._guarded(_("Could not write the key file."), action)

    def onUnlock(self) -> None:
        def action():
            node = self.parameterNode.unlockVolume
            restored = self.logic.unlock(node, self._sliceIndex(node, self.parameterNode.unlockSliceIndex))
            slicer.util.setSliceViewerLayers(background=restored, fit=True)
            self._setStatus(_("Original restored exactly in {name}.").format(name=restored.GetName()))

        self._guarded(_("Could not unlock the image."), action)

    def onVerify(self) -> None:
        def action():
            node = self.parameterNode.unlockVolume
            entry = self.logic.verify(node, self._sliceIndex(node, self.parameterNode.unlockSliceIndex))
            if entry is None:
                self._setStatus(_("Not protected by the current key (or changed after protection)."))
            else:
                self._setStatus(
                    _("Protected by the current key as {name!r}: alpha {alpha:.1f} at x={x} y={y}.").format(
                        name=entry.name, alpha=entry.alpha, x=entry.x, y=entry.y
                    )
                )

        self._guarded(_("Could not verify the image."), action)

    def _updateKeyStatus(self) -> None:
        key, path = self.logic.key, self.logic.key_path
        text = _("Current key: {count} image(s)").format(count=len(key))
        if path is not None:
            text += _(", from {path}").format(path=path)
        if self.logic.unsaved:
            text += _(" — {count} not exported yet").format(count=self.logic.unsaved)
        self.ui.keyStatusLabel.text = text

    # -- dataset -------------------------------------------------------------------------------------------

    def onProtectDataset(self) -> None:
        def start():
            inputDir = self.ui.datasetInputPathLineEdit.currentPath
            outputDir = self.ui.datasetOutputPathLineEdit.currentPath
            keyPath = self.ui.datasetKeyPathLineEdit.currentPath
            if not inputDir or not outputDir or not keyPath:
                raise InputError("choose the input folder, the output folder and the key file")
            credentials = self._credentials()
            settings, logo = self._searchSettings(), self._logo()
            url, token, caBundle = self._connection()
            if not self._ensureDependencies() or not self._confirmUpload(url):
                return
            lesions = "none" if self.parameterNode.lesionSource == "none" else "auto"
            append = self.parameterNode.appendToKey
            logic = self.logic
            self._startWorkerJob(
                _("Dataset protection"),
                lambda onProgress, onDone, onError: logic.start_folder_protection(
                    inputDir,
                    outputDir,
                    keyPath,
                    url,
                    token=token,
                    ca_bundle=caBundle,
                    logo=logo,
                    settings=settings,
                    lesions=lesions,
                    append=append,
                    on_progress=onProgress,
                    on_done=onDone,
                    on_error=onError,
                    **credentials,
                ),
                self._showDataset,
            )

        self._guarded(_("Could not start the dataset protection."), start)

    def _showDataset(self, result) -> None:
        self.ui.predictionsTextEdit.setPlainText("\n".join(result.reports))
        self._setStatus(
            _("Protected {count} image(s) into {folder}; key {key}.").format(
                count=result.protected, folder=result.output_dir, key=result.key_path
            )
        )

    # -- consent, job messages, buttons --------------------------------------------------------------------

    def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
        return (
            _(
                "To search the watermark, the image itself (and the logo and any lesion mask) is sent to:\n\n"
                "{server}\n\nThe key that restores the original stays on this computer. Send images to this server "
                "now and in the future?"
            ).format(server=server),
            _("Send images to a server?"),
        )

    def _cancellingText(self) -> str:
        return _("Cancelling (the current image's search finishes first)...")

    def _cancelledText(self, title: str, reason) -> str:
        return _("{title} cancelled: {reason}").format(title=title, reason=reason)

    def _updateButtons(self, *_args) -> None:
        busy, p = self.busy, self.parameterNode
        hasInput = p is not None and p.inputVolume is not None
        self.ui.protectButton.enabled = not busy and hasInput
        self.ui.segmentationSelector.enabled = p is not None and p.lesionSource == "segmentation"
        hasProtected = p is not None and p.unlockVolume is not None
        self.ui.unlockButton.enabled = hasProtected
        self.ui.verifyButton.enabled = hasProtected
        self.ui.datasetProtectButton.enabled = not busy
        self.ui.cancelButton.enabled = self._job is not None
        self.ui.testConnectionButton.enabled = not busy
        self.ui.refreshModelsButton.enabled = not busy
