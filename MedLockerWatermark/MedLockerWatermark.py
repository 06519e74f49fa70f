"""MedLockerWatermark: visible adversarial watermarks that make unauthorised AI models misread an image, removable
bit for bit with a key (Pu et al., MedLocker).

Only the classes that need the application live here: module, widget and in-app test, defined only when Qt is
importable. The logic and the shared test bodies are in ``MedLockerWatermarkLib`` (they run under PyPI's
``slicer-core`` too) and are re-exported, because scripts and Slicer's generic tests look them up on this module.
"""
from __future__ import annotations

import os

import slicer

# MedLockerWatermarkLib first: in a source checkout it is what makes ``medprivacy`` importable.
from MedLockerWatermarkLib import (
    DEFAULT_MODE,
    DEFAULT_SERVER_URL,
    LESION_SOURCES,
    MODES,
    PIP_IMPORT_NAMES,
    PIP_REQUIREMENTS,
    BackgroundJob,
    MedLockerWatermarkLogic,
    MedLockerWatermarkTestMixin,
    ProtectionResult,
    SliceImage,
    describe_predictions,
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
    "BackgroundJob", "DEFAULT_MODE", "DEFAULT_SERVER_URL", "LESION_SOURCES", "MODES", "MedLockerWatermarkLogic",
    "MedLockerWatermarkTestMixin", "PIP_IMPORT_NAMES", "PIP_REQUIREMENTS", "ProtectionResult", "SliceImage",
    "describe_predictions", "normalized_server_url", "CancelledError", "InputError", "MedPrivacyError",
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

    # Job plumbing, status line, server box and consent, the same in both MedPrivacy modules (needs Qt).
    from MedPrivacySlicerCommon.widgets import ServerJobWidgetMixin

    _SETTINGS = "MedLockerWatermark/"
    _MODEL_USE, _MODEL_NAME, _MODEL_WEIGHT = range(3)

    class MedLockerWatermark(ScriptedLoadableModule):
        def __init__(self, parent):
            ScriptedLoadableModule.__init__(self, parent)
            self.parent.title = _("MedLocker Watermark")
            self.parent.categories = [translate("qSlicerAbstractCoreModule", "Utilities")]
            self.parent.dependencies = []
            self.parent.contributors = ["MedPrivacy contributors"]
            self.parent.helpText = _(
                "Protects 2D images (a picture, or one slice of a volume) with a visible logo placed and blended so "
                "that unauthorised AI classifiers misread the image, while a clinician still sees it. The search runs "
                "on a MedPrivacy server; the logo is blended here into the exact pixels, and the key that restores "
                "the original bit for bit never leaves this computer unless you export it (encrypted). "
                "Keep-out placement keeps the logo off the lesions."
            )
            self.parent.acknowledgementText = _(
                "Method: Pu et al., \"MedLocker: a transferable adversarial watermarking for preventing unauthorized "
                "analysis of medical image dataset\"."
            )

    class MedLockerWatermarkWidget(ServerJobWidgetMixin, ScriptedLoadableModuleWidget):
        """GUI -> Logic only. Server work runs in a ``BackgroundJob`` (``ServerJobWidgetMixin``); results are put
        into the scene here."""

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
            uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedLockerWatermark.ui"))
            self.layout.addWidget(uiWidget)
            self.ui = slicer.util.childWidgetVariables(uiWidget)
            uiWidget.setMRMLScene(slicer.mrmlScene)
            if self.logic is None:
                self.logic = MedLockerWatermarkLogic(slicer.mrmlScene)

            self._setupJobTimer()

            self.ui.modeComboBox.clear()
            for mode in MODES:
                self.ui.modeComboBox.addItem(mode)
            self.ui.lesionSourceComboBox.clear()
            for source in LESION_SOURCES:
                self.ui.lesionSourceComboBox.addItem(source)
            self._restoreSettings()

            self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
            self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
            self.ui.currentSliceButton.connect("clicked(bool)", self.onUseCurrentSlice)
            self.ui.protectButton.connect("clicked(bool)", self.onProtect)
            self.ui.exportKeyButton.connect("clicked(bool)", self.onExportKey)
            self.ui.loadKeyButton.connect("clicked(bool)", self.onLoadKey)
            self.ui.newKeyButton.connect("clicked(bool)", self.onNewKey)
            self.ui.newKeyFileButton.connect("clicked(bool)", self.onNewKeyFile)
            self.ui.unlockButton.connect("clicked(bool)", self.onUnlock)
            self.ui.verifyButton.connect("clicked(bool)", self.onVerify)
            self.ui.datasetProtectButton.connect("clicked(bool)", self.onProtectDataset)
            self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
            self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
            self.ui.unlockInputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
            self.ui.lesionSourceComboBox.connect("currentIndexChanged(int)", self._updateButtons)
            self.ui.serverUrlLineEdit.connect("editingFinished()", self._saveSettings)
            self.ui.caBundlePathLineEdit.connect("currentPathChanged(QString)", self._saveSettings)
            self._setStatus(_("Ready."))
            self._updateKeyStatus()
            self._updateButtons()

        def cleanup(self) -> None:
            self._stopJob()
            ScriptedLoadableModuleWidget.cleanup(self)

        # -- settings (never the token or the passphrase) ----------------------------------------------------

        def _restoreSettings(self) -> None:
            self._restoreServerSettings()
            mode = slicer.util.settingsValue(_SETTINGS + "Mode", DEFAULT_MODE)
            self.ui.modeComboBox.currentIndex = MODES.index(mode) if mode in MODES else MODES.index(DEFAULT_MODE)

        def _saveSettings(self, *_args) -> None:
            settings = qt.QSettings()
            self._saveServerSettings(settings)
            settings.setValue(_SETTINGS + "Mode", self.ui.modeComboBox.currentText)

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
            seed = self.ui.seedSpinBox.value
            return SearchSettings(
                mode=self.ui.modeComboBox.currentText, models=models or None, weights=weights or None,
                sl=self.ui.slSpinBox.value, population=self.ui.populationSpinBox.value,
                generations=self.ui.generationsSpinBox.value, crossover_rate=self.ui.crossoverSpinBox.value,
                step=self.ui.stepSpinBox.value, local_iterations=self.ui.hopsSpinBox.value,
                alpha_range=(self.ui.alphaMinSpinBox.value, self.ui.alphaMaxSpinBox.value),
                seed=None if seed < 0 else seed,
            )

        def _credentials(self) -> dict[str, str]:
            keyFile = self.ui.keyFilePathLineEdit.currentPath
            if keyFile:
                return {"key_file": keyFile}
            passphrase = self.ui.passphraseLineEdit.text
            if not passphrase:
                raise InputError("enter the key's passphrase, or choose a key file")
            return {"passphrase": passphrase}

        # -- server ----------------------------------------------------------------------------------------

        def onTestConnection(self) -> None:
            def start():
                url, token, caBundle = self._connection()
                if not self._ensureDependencies():
                    return
                self._saveSettings()
                logic = self.logic
                self._startJob(_("Connection test"),
                               lambda progress, cancel: logic.test_connection(url, token=token, ca_bundle=caBundle),
                               lambda line: self._setStatus(line))

            self._guarded(_("Could not test the connection."), start)

        def onRefreshModels(self) -> None:
            def start():
                url, token, caBundle = self._connection()
                if not self._ensureDependencies():
                    return
                logic = self.logic
                self._startJob(_("Model list"),
                               lambda progress, cancel: logic.list_models(url, token=token, ca_bundle=caBundle),
                               self._showModels)

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
            self._setStatus(_("{count} source model(s), {segmenters} lesion segmenter(s) on the server.").format(
                count=len(classifiers), segmenters=len(segmenters)))

        # -- protect ---------------------------------------------------------------------------------------

        def onUseCurrentSlice(self) -> None:
            def action():
                node = self.ui.inputSelector.currentNode()
                sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
                center = sliceNode.GetSliceToRAS().MultiplyPoint((0.0, 0.0, 0.0, 1.0))
                self.ui.sliceSpinBox.value = self.logic.slice_index_at(node, center)

            self._guarded(_("Could not read the current slice."), action)

        def onProtect(self) -> None:
            def start():
                inputNode = self.ui.inputSelector.currentNode()
                source = self.ui.lesionSourceComboBox.currentText
                # Everything that can be wrong with the input is found before any prompt or upload.
                image, logo, settings, mask = self.logic.prepare_protection(
                    inputNode, self._sliceIndex(inputNode), self._logo(), self._searchSettings(), source,
                    self.ui.segmentationSelector.currentNode())
                url, token, caBundle = self._connection()
                if not self._ensureDependencies() or not self._confirmUpload(url):
                    return
                self._saveSettings()
                inputNodeID = inputNode.GetID()  # IDs, not nodes, cross the wait: the scene may change meanwhile
                logic = self.logic
                self._startJob(
                    _("Watermark search"),
                    lambda progress, cancel: logic.compute_protection(image, logo, settings, url, token, caBundle, source,
                                                                      mask, progress=progress, cancel=cancel),
                    lambda computed: self._applyProtection(computed, inputNodeID),
                )

            self._guarded(_("Could not start the protection."), start)

        def _sliceIndex(self, node):
            if node is None:
                return None
            return self.ui.sliceSpinBox.value if self.logic.slice_count(node) > 1 else None

        def _logo(self):
            return self.logic.load_logo(self.ui.logoPathLineEdit.currentPath or None)

        def _applyProtection(self, computed, inputNodeID: str) -> None:
            inputNode = slicer.mrmlScene.GetNodeByID(inputNodeID)
            if inputNode is None:
                raise InputError("the input image was removed from the scene before the result arrived")
            result = self.logic.apply_protection(computed, inputNode)
            slicer.util.setSliceViewerLayers(background=result.output_node, fit=True)
            self.ui.predictionsTextEdit.setPlainText("\n".join(
                [_("Protected as {name!r} in {node}.").format(name=result.name, node=result.output_node.GetName())]
                + result.prediction_lines()))
            self._updateKeyStatus()
            self._setStatus(_("Done. Export the key (Key tab) before closing Slicer: it is the only way back to the original."))

        # -- key -------------------------------------------------------------------------------------------

        def onExportKey(self) -> None:
            def action():
                credentials = self._credentials()
                path = qt.QFileDialog.getSaveFileName(self.parent, _("Export MedLocker key"), "", "MedLocker key (*.mlkey)")
                if not path:
                    return
                self.logic.export_key(path, **credentials)
                self._updateKeyStatus()
                self._setStatus(_("Key saved, encrypted, to {path}.").format(path=path))

            self._guarded(_("Could not export the key."), action)

        def onLoadKey(self) -> None:
            def action():
                if self.logic.unsaved and not slicer.util.confirmYesNoDisplay(
                        _("{count} protected image(s) are not in an exported key yet and can only be unlocked with "
                          "it. Load another key anyway?").format(count=self.logic.unsaved)):
                    return
                credentials = self._credentials()
                path = qt.QFileDialog.getOpenFileName(self.parent, _("Load MedLocker key"), "", "MedLocker key (*.mlkey);;All files (*)")
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
                            count=self.logic.unsaved)):
                    return
                self.logic.new_key()
                self._updateKeyStatus()

            self._guarded(_("Could not start a new key."), action)

        def onNewKeyFile(self) -> None:
            def action():
                path = qt.QFileDialog.getSaveFileName(self.parent, _("New key file (32-byte secret)"), "", "All files (*)")
                if not path:
                    return
                self.logic.generate_key_file(path)
                self.ui.keyFilePathLineEdit.currentPath = path
                self._setStatus(_("Secret written to {path}; keep it safe.").format(path=path))

            self._guarded(_("Could not write the key file."), action)

        def onUnlock(self) -> None:
            def action():
                node = self.ui.unlockInputSelector.currentNode()
                restored = self.logic.unlock(node, self._unlockSlice(node))
                slicer.util.setSliceViewerLayers(background=restored, fit=True)
                self._setStatus(_("Original restored exactly in {name}.").format(name=restored.GetName()))

            self._guarded(_("Could not unlock the image."), action)

        def onVerify(self) -> None:
            def action():
                node = self.ui.unlockInputSelector.currentNode()
                entry = self.logic.verify(node, self._unlockSlice(node))
                if entry is None:
                    self._setStatus(_("Not protected by the current key (or changed after protection)."))
                else:
                    self._setStatus(_("Protected by the current key as {name!r}: alpha {alpha:.1f} at x={x} y={y}.").format(
                        name=entry.name, alpha=entry.alpha, x=entry.x, y=entry.y))

            self._guarded(_("Could not verify the image."), action)

        def _unlockSlice(self, node):
            if node is None:
                return None
            return self.ui.unlockSliceSpinBox.value if self.logic.slice_count(node) > 1 else None

        def _updateKeyStatus(self) -> None:
            key, path = self.logic.key, self.logic.key_path
            text = _("Current key: {count} image(s)").format(count=len(key))
            if path is not None:
                text += _(", from {path}").format(path=path)
            if self.logic.unsaved:
                text += _(" — {count} not exported yet").format(count=self.logic.unsaved)
            self.ui.keyStatusLabel.text = text

        # -- dataset ---------------------------------------------------------------------------------------

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
                self._saveSettings()
                lesions = "none" if self.ui.lesionSourceComboBox.currentText == "none" else "auto"
                append = self.ui.datasetAppendCheckBox.checked
                logic = self.logic
                self._startJob(
                    _("Dataset protection"),
                    lambda progress, cancel: logic.protect_folder(
                        inputDir, outputDir, keyPath, url, token=token, ca_bundle=caBundle, logo=logo, settings=settings,
                        lesions=lesions, append=append, progress=progress, cancel=cancel, **credentials),
                    lambda result: self._showDataset(result),
                )

            self._guarded(_("Could not start the dataset protection."), start)

        def _showDataset(self, result) -> None:
            self.ui.predictionsTextEdit.setPlainText("\n".join(result.reports))
            self._setStatus(_("Protected {count} image(s) into {folder}; key {key}.").format(
                count=result.protected, folder=result.output_dir, key=result.key_path))

        # -- dependencies and consent ----------------------------------------------------------------------

        def _ensureDependencies(self) -> bool:
            import importlib.util

            missing = [name for name in PIP_IMPORT_NAMES if importlib.util.find_spec(name) is None]
            if not missing:
                return True
            if not slicer.util.confirmYesNoDisplay(
                _("MedLocker Watermark needs Python packages that are not installed yet: {names}.\n\n"
                  "Download and install them now?").format(names=", ".join(missing))
            ):
                return False
            slicer.util.pip_install(PIP_REQUIREMENTS)
            return True

        def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
            return (
                _("To search the watermark, the image itself (and the logo and any lesion mask) is sent to:\n\n"
                  "{server}\n\nThe key that restores the original stays on this computer. Send images to this server "
                  "now and in the future?").format(server=server),
                _("Send images to a server?"),
            )

        # -- job messages (the plumbing itself: ServerJobWidgetMixin) ----------------------------------------

        def _cancellingText(self) -> str:
            return _("Cancelling (the current image's search finishes first)...")

        def _cancelledText(self, title: str, reason) -> str:
            return _("{title} cancelled: {reason}").format(title=title, reason=reason)

        # -- buttons ---------------------------------------------------------------------------------------

        def _updateButtons(self, *_args) -> None:
            busy = self._job is not None
            hasInput = self.ui.inputSelector.currentNode() is not None
            self.ui.protectButton.enabled = not busy and hasInput
            self.ui.segmentationSelector.enabled = self.ui.lesionSourceComboBox.currentText == "segmentation"
            hasProtected = self.ui.unlockInputSelector.currentNode() is not None
            self.ui.unlockButton.enabled = hasProtected
            self.ui.verifyButton.enabled = hasProtected
            self.ui.datasetProtectButton.enabled = not busy
            self.ui.cancelButton.enabled = busy
            self.ui.testConnectionButton.enabled = not busy
            self.ui.refreshModelsButton.enabled = not busy

    class MedLockerWatermarkTest(ScriptedLoadableModuleTest, MedLockerWatermarkTestMixin):
        """Runs the shared test bodies on the application's scene; the server ones need MEDLOCKER_TEST_SERVER_URL
        (a 'medprivacy serve' holding MedLocker models whose names the bodies use, e.g. the tiny test models)."""

        def setUp(self):
            slicer.mrmlScene.Clear()

        def runTest(self):
            for test in (self.test_slices_round_trip, self.test_rejects_unusable_inputs, self.test_with_server):
                self.setUp()
                test()
            self.delayDisplay("MedLockerWatermark tests passed")

        def test_slices_round_trip(self):
            self.check_slices_round_trip(slicer.mrmlScene)

        def test_rejects_unusable_inputs(self):
            # Port 9 (discard) on loopback: nothing listens there on a desktop, so the connection is refused.
            self.check_rejects_unusable_inputs(slicer.mrmlScene, "http://127.0.0.1:9")

        def test_with_server(self):
            url = os.environ.get("MEDLOCKER_TEST_SERVER_URL")
            if not url:
                self.delayDisplay("Server tests skipped: set MEDLOCKER_TEST_SERVER_URL to a running MedLocker server")
                return
            import tempfile

            for check in (self.check_protect_unlock_bit_exact, self.check_dataset_folder):
                self.setUp()
                with tempfile.TemporaryDirectory() as folder:
                    check(slicer.mrmlScene, url, folder)
            for check in (self.check_volume_slice, self.check_keep_out_respects_segmentation, self.check_server_lesions):
                self.setUp()
                check(slicer.mrmlScene, url)
