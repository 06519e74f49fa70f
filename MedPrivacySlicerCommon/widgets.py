"""What every MedPrivacy module panel does the same way: load the module's UI, keep its state in a parameter node,
run long work in a worker process (the logic's ``start_*`` calls), report status, progress and errors, read the
server box (URL, token, CA bundle), ask once per server before uploading, and run the shared dependency install step.

Jobs: long work (segmentation, key generation, folder protection, obfuscation, training) runs in a worker process
(``MedPrivacySlicerCommon.worker``): inside Slicer the main thread holds the GIL between Qt events, so a Python
thread doing numpy, torch or socket work would crawl. ``QProcessWorker`` delivers the worker's progress and outcome
from Qt's event loop on the main thread; Cancel terminates the process. Short server calls (connection test, model
lists, one image's watermark search) stay in a ``BackgroundJob`` thread polled by a Qt timer: they mostly wait on
the network, which releases the GIL, and a process start would cost more than the call.

Needs the application (Qt, ``slicer.util``, ``slicer.parameterNodeWrapper``): only the Libs' ``widget.py`` files
import it, and the module files import those only where ``slicer.ScriptedLoadableModule`` exists.

A module panel subclasses ``ServerJobPanel``, sets the class attributes below, builds its connections in
``__init__`` after calling the base one, then calls ``initializeParameterNode``; it implements ``_updateButtons``
(reading ``self.busy``) and ``_uploadConsentPrompt``. Its ``.ui`` must have ``statusLabel``, ``progressBar``,
``cancelButton``, ``serverUrlLineEdit``, ``tokenLineEdit`` and ``caBundlePathLineEdit``.

Per-user things (server URL, CA bundle, key folders, servers consented to) live in ``QSettings``; the rest of the
panel (selected nodes, options) lives in the parameter node, so it is saved with the scene. The token is never
stored.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import sys
from typing import Any, Callable

import qt
import slicer
import vtk
from slicer.i18n import tr as _

from medprivacy.consent import consented_servers, normalized_server_url, with_consent
from medprivacy.errors import CancelledError, InputError, MedPrivacyError
from medprivacy.jobs import BackgroundJob

from .dependencies import ensure_installed, install_running
from .worker import error_for


class WorkerJob:
    """A panel job run by a worker process: ``worker`` is what the logic's ``start_*`` call returned."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.worker = None

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()


#: Worker jobs of panels that were closed while they ran: kept until their process has ended, since a collected
#: QProcess kills its process before the worker can remove its temporary files.
_stoppedWorkerJobs: set = set()


class ServerJobPanel(qt.QWidget):
    """The shared part of a MedPrivacy module panel (see the module docstring)."""

    #: The Slicer module's name: UI file, QSettings prefix and parameter node singleton tag.
    moduleName = ""
    #: Its title, used in the dependency prompt.
    moduleTitle = ""
    #: Shown as the example when the server URL is empty, and restored when nothing is stored.
    defaultServerUrl = ""
    #: The module's ``Package`` list and whether it needs torch (``<Module>Lib/dependencies.py``).
    packages: tuple = ()
    needsTorch = False
    #: The module's ``parameterNodeWrapper`` class.
    parameterNodeClass: Any = None
    #: For a module with a private key folder (``ui.keyDirectoryPathLineEdit``): the core module that defines
    #: ``default_key_dir()`` and the name of its constant naming the key's file.
    keyModule = ""
    keyFileConstant = ""

    def __init__(self, logic, installer: Callable[[], bool] | None = None, parent=None) -> None:
        """``logic`` satisfies the module's logic protocol; ``installer`` replaces the dependency install step
        (tests pass one that reports everything installed)."""
        super().__init__(parent)
        self.logic = logic
        self._installer = installer or self._installDependencies
        self._job: BackgroundJob | WorkerJob | None = None
        self._jobDone: Callable[[Any], None] | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._parameterNodeObserver = None

        layout = qt.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        uiWidget = slicer.util.loadUI(os.path.join(self.resourceDir(), "UI", f"{self.moduleName}.ui"))
        uiWidget.setMRMLScene(slicer.mrmlScene)
        layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._pollJob)
        # A closed scene loses the parameter node's values: reconnect the GUI to the reset node afterwards.
        self._sceneObservers = [
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, lambda *_a: self.setParameterNode(None)),
            slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, lambda *_a: self.initializeParameterNode()),
        ]
        self._restoreServerSettings()
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self._saveServerSettings)
        self.ui.caBundlePathLineEdit.connect("currentPathChanged(QString)", self._saveServerSettings)

    @classmethod
    def resourceDir(cls) -> str:
        """The module's ``Resources`` folder, beside its Lib (where the subclass is defined)."""
        libDir = os.path.dirname(os.path.abspath(sys.modules[cls.__module__].__file__))
        return os.path.join(os.path.dirname(libDir), "Resources")

    def cleanup(self) -> None:
        """Called by the module widget's ``cleanup`` (module unloaded, or reloaded in developer mode)."""
        self._stopJob()
        self.setParameterNode(None)
        for tag in self._sceneObservers:
            slicer.mrmlScene.RemoveObserver(tag)
        self._sceneObservers = []

    # -- parameter node ------------------------------------------------------------------------------------

    @property
    def parameterNode(self):
        return self._parameterNode

    def parameterNodeGuiMapping(self) -> dict[str, Any]:
        """Parameter name -> widget, for ``connectParametersToGui``."""
        raise NotImplementedError

    def initializeParameterNode(self) -> None:
        """Wrap the module's singleton parameter node (created on first use, like ScriptedLoadableModuleLogic's
        ``getParameterNode``) and connect it to the panel."""
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # owned by the Python variable now
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node = slicer.mrmlScene.AddNode(node)
        node.SetAttribute("ModuleName", self.moduleName)  # a closed scene drops it
        self.setParameterNode(self.parameterNodeClass(node))
        self._onParameterNodeModified()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNode.parameterNode.RemoveObserver(self._parameterNodeObserver)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectParametersToGui(self.parameterNodeGuiMapping())
            self._parameterNodeObserver = parameterNode.parameterNode.AddObserver(
                vtk.vtkCommand.ModifiedEvent, lambda *_a: self._onParameterNodeModified()
            )

    def _onParameterNodeModified(self) -> None:
        """Called when the parameter node (or a node it references) changes."""
        self._updateButtons()

    # -- server box (per user, never the token) ------------------------------------------------------------

    def userSetting(self, name: str, default: str = "") -> str:
        return slicer.util.settingsValue(f"{self.moduleName}/{name}", default)

    def setUserSetting(self, name: str, value) -> None:
        qt.QSettings().setValue(f"{self.moduleName}/{name}", value)

    def _restoreServerSettings(self) -> None:
        self.ui.serverUrlLineEdit.text = self.userSetting("ServerUrl", self.defaultServerUrl)
        self.ui.caBundlePathLineEdit.currentPath = self.userSetting("CaBundle")

    def _saveServerSettings(self, *_args) -> None:
        self.setUserSetting("ServerUrl", self.ui.serverUrlLineEdit.text.strip())
        self.setUserSetting("CaBundle", self.ui.caBundlePathLineEdit.currentPath)

    def _connection(self) -> tuple[str, str | None, str | None]:
        url = self.ui.serverUrlLineEdit.text.strip()
        if not url:
            raise InputError("enter the server URL, e.g. " + self.defaultServerUrl)
        self._saveServerSettings()
        return url, self.ui.tokenLineEdit.text.strip() or None, self.ui.caBundlePathLineEdit.currentPath or None

    def onTestConnection(self) -> None:
        def start():
            url, token, caBundle = self._connection()
            if not self._ensureDependencies():
                return
            logic = self.logic
            # A thread, not a worker: one short request, mostly waiting on the network (the GIL is free meanwhile).
            self._startJob(
                _("Connection test"),
                lambda progress, cancel: logic.test_connection(url, token=token, ca_bundle=caBundle),
                lambda description: self._setStatus(self._connectedText(description)),
            )

        self._guarded(_("Could not test the connection."), start)

    def _connectedText(self, description: str) -> str:
        return description

    # -- private keys ----------------------------------------------------------------------------------------

    def _restoreKeyDirectory(self) -> None:
        self.ui.keyDirectoryPathLineEdit.currentPath = self.userSetting("KeyDirectory") or self._defaultKeyDir()

    def _defaultKeyDir(self) -> str:
        try:
            module = importlib.import_module(self.keyModule)
        except ImportError:  # dependencies not installed yet: the user picks a folder or installs first
            return ""
        return str(module.default_key_dir())

    def _startKeyGeneration(
        self, keyDir: str, replaceQuestion: str, start, doneText: str, onDone: Callable[[], None] = lambda: None
    ) -> None:
        """Generate a key in ``keyDir`` in a worker process: ``start(keyDir, replace, on_progress, on_done,
        on_error)`` (a logic's ``start_key_generation``). A key already there is replaced only after
        ``replaceQuestion`` is answered yes."""
        if not self._ensureDependencies():
            return
        keyFile = getattr(importlib.import_module(self.keyModule), self.keyFileConstant)  # needs the dependencies
        replace = os.path.isfile(os.path.join(keyDir, keyFile))
        if replace and not slicer.util.confirmYesNoDisplay(replaceQuestion.format(folder=keyDir)):
            return
        self.ui.keyDirectoryPathLineEdit.currentPath = keyDir
        self._startWorkerJob(
            _("Key generation"),
            lambda onProgress, onResult, onError: start(keyDir, replace, onProgress, onResult, onError),
            lambda _result: (onDone(), self._setStatus(doneText.format(folder=keyDir))),
        )

    # -- consent, once per server --------------------------------------------------------------------------

    def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
        """(question, window title) asking to send this module's data to ``server`` now and in the future."""
        raise NotImplementedError

    def _confirmUpload(self, url: str) -> bool:
        # Stored as JSON text (medprivacy.consent), under the server's normalized URL.
        stored = self.userSetting("ConsentedServers", "[]")
        server = normalized_server_url(url)
        if server in consented_servers(stored):
            return True
        question, windowTitle = self._uploadConsentPrompt(server)
        if not slicer.util.confirmYesNoDisplay(question, windowTitle=windowTitle):
            return False
        self.setUserSetting("ConsentedServers", with_consent(stored, url))
        return True

    # -- dependencies --------------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        return self._installer()

    def _installDependencies(self) -> bool:
        return ensure_installed(self.moduleTitle, self.packages, self.needsTorch, busy_changed=self._updateButtons)

    # -- job plumbing --------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A job of this panel, or a dependency install of any MedPrivacy module, is running."""
        return self._job is not None or install_running()

    def _cancellingText(self) -> str:
        return _("Cancelling...")

    def _cancelledText(self, title: str, reason: CancelledError) -> str:
        return _("{title} cancelled.").format(title=title)

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.cancelButton.enabled = False
            self._setStatus(self._cancellingText())

    def _guarded(self, message: str, action: Callable[[], None]) -> None:
        """User mistakes (MedPrivacyError) get one line; anything else is a bug and keeps its traceback.

        No wait cursor: actions may open dialogs (consent, file choosers, the install prompt), which must show the
        normal cursor; long work runs in a job, with the progress bar."""
        with slicer.util.tryWithErrorDisplay(message):
            try:
                action()
            except MedPrivacyError as exc:
                self._showUserError(exc)

    def _startJob(self, title: str, work, onDone: Callable[[Any], None]) -> None:
        """A short call in a ``BackgroundJob`` thread: ``work(progress, cancel)``, polled by the panel's timer."""
        self._beginJob(BackgroundJob(title, work), onDone)
        self._job.start()
        self._pollTimer.start()

    def _startWorkerJob(self, title: str, start, onDone: Callable[[Any], None]) -> None:
        """Long work in a worker process: ``start(on_progress, on_done, on_error)`` is a logic's ``start_*`` call,
        which starts the process and returns its worker. ``QProcessWorker`` calls back on the main thread from Qt's
        event loop (its ``QProcess`` signals), so nothing is polled here."""
        job = WorkerJob(title)
        self._beginJob(job, onDone)
        try:
            job.worker = start(
                lambda text, fraction: self._onJobProgress(job, text, fraction),
                lambda result: self._onJobDone(job, result),
                lambda message, kind: self._onWorkerError(job, message, kind),
            )
        except BaseException:  # nothing started: the panel is idle again, and _guarded reports the error
            if self._job is job:
                self._endJob()
            raise

    def _beginJob(self, job, onDone: Callable[[Any], None]) -> None:
        if self._job is not None:
            raise InputError(f"{self._job.title} is still running; wait for it or press Cancel")
        self._job, self._jobDone = job, onDone
        self.ui.progressBar.value = 0
        self._setStatus(_("{title}...").format(title=job.title))
        self._updateButtons()

    def _endJob(self):
        """The finished job's ``onDone``; the panel is idle again."""
        self._pollTimer.stop()
        onDone, self._job, self._jobDone = self._jobDone, None, None
        self._updateButtons()
        return onDone

    def _stopJob(self) -> None:
        # Cancelling lets a thread stop at its next check and terminates a worker; the result is dropped.
        job = self._job
        if job is not None:
            job.cancel()
            if isinstance(job, WorkerJob) and job.worker is not None:
                _stoppedWorkerJobs.add(job)
        self._job = None
        self._pollTimer.stop()

    def _pollJob(self) -> None:
        job = self._job
        if not isinstance(job, BackgroundJob):
            self._pollTimer.stop()
            return
        while self._job is job:
            try:
                kind, payload, detail = job.messages.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self._onJobProgress(job, payload, detail)
            elif kind == "done":
                self._onJobDone(job, payload)
            else:
                self._onJobFailed(job, payload, detail)

    def _onJobProgress(self, job, text: str, fraction: float | None) -> None:
        if self._job is not job:
            return
        if fraction is not None:
            self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        self._setStatus(text)

    def _onJobDone(self, job, result) -> None:
        _stoppedWorkerJobs.discard(job)  # a stopped worker may still have finished first
        if self._job is not job:
            return
        onDone = self._endJob()
        self.ui.progressBar.value = 100
        self._guarded(
            _("{title} finished, but its result could not be shown.").format(title=job.title), lambda: onDone(result)
        )

    def _onWorkerError(self, job, message: str, kind: str) -> None:
        _stoppedWorkerJobs.discard(job)  # its process has ended: nothing holds it any more
        detail = _("The worker's log is in the Python console.") if kind == "internal" else None
        self._onJobFailed(job, error_for(message, kind), detail)

    def _onJobFailed(self, job, error: Exception, detail: str | None) -> None:
        if self._job is not job:
            return
        self._endJob()
        if isinstance(error, CancelledError):
            self.ui.progressBar.value = 0
            self._setStatus(self._cancelledText(job.title, error))
        elif isinstance(error, MedPrivacyError):
            self._showUserError(error)
        else:  # a bug, in this process or the worker's: keep what explains it
            logging.error("%s failed:\n%s", job.title, detail)
            self._setStatus(_("{title} failed: {error}").format(title=job.title, error=error))
            slicer.util.errorDisplay(
                _("{title} failed: {error}").format(title=job.title, error=error), detailedText=detail
            )

    def _showUserError(self, error: Exception) -> None:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._setStatus(message)
        slicer.util.errorDisplay(message)

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _updateButtons(self, *_args) -> None:
        raise NotImplementedError
