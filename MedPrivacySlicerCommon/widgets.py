"""What both MedPrivacy widgets do the same way: run core calls in a ``BackgroundJob`` polled by a Qt timer, report
status, progress and errors, read the server box (URL, token, CA bundle) and ask once per server before uploading.

Needs the application (Qt, ``slicer.util``): import it only where ``qt`` imports (the module files' app guard).
A widget mixes ``ServerJobWidgetMixin`` in before ``ScriptedLoadableModuleWidget``, sets ``settingsPrefix`` and
``defaultServerUrl``, implements ``_updateButtons`` and ``_uploadConsentPrompt``, and calls ``_initJobState`` (in
``__init__``), ``_setupJobTimer`` (in ``setup``) and ``_stopJob`` (in ``cleanup``). Its ``.ui`` must have
``statusLabel``, ``progressBar``, ``cancelButton``, ``serverUrlLineEdit``, ``tokenLineEdit`` and
``caBundlePathLineEdit``. Where the two modules word a message differently, the hook methods below carry the
difference (``_cancellingText``, ``_cancelledText``).
"""
from __future__ import annotations

import logging
import queue
from typing import Any, Callable

import qt
import slicer

from medprivacy.consent import consented_servers, normalized_server_url, with_consent
from medprivacy.errors import CancelledError, InputError, MedPrivacyError
from medprivacy.jobs import BackgroundJob

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before translations existed
    def _(text):
        return text


class ServerJobWidgetMixin:
    """Job plumbing, status line and server box of a MedPrivacy module widget (see the module docstring)."""

    #: QSettings key prefix of the module, e.g. ``"MixupPrivacy/"``.
    settingsPrefix = ""
    #: Shown as the example when the server URL is empty, and restored when nothing is stored.
    defaultServerUrl = ""

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _initJobState(self) -> None:
        self._job: BackgroundJob | None = None
        self._jobDone: Callable[[Any], None] | None = None
        self._pollTimer = None

    def _setupJobTimer(self) -> None:
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._pollJob)

    def _stopJob(self) -> None:
        # The worker owns no Qt object; cancelling lets it stop at its next check, its result is dropped.
        if self._job is not None:
            self._job.cancel()
        self._job = None
        if self._pollTimer is not None:
            self._pollTimer.stop()

    # -- server box (never the token) ----------------------------------------------------------------------

    def _restoreServerSettings(self) -> None:
        settingsValue = slicer.util.settingsValue
        self.ui.serverUrlLineEdit.text = settingsValue(self.settingsPrefix + "ServerUrl", self.defaultServerUrl)
        self.ui.caBundlePathLineEdit.currentPath = settingsValue(self.settingsPrefix + "CaBundle", "")

    def _saveServerSettings(self, settings) -> None:
        settings.setValue(self.settingsPrefix + "ServerUrl", self.ui.serverUrlLineEdit.text.strip())
        settings.setValue(self.settingsPrefix + "CaBundle", self.ui.caBundlePathLineEdit.currentPath)

    def _connection(self) -> tuple[str, str | None, str | None]:
        url = self.ui.serverUrlLineEdit.text.strip()
        if not url:
            raise InputError("enter the server URL, e.g. " + self.defaultServerUrl)
        return url, self.ui.tokenLineEdit.text.strip() or None, self.ui.caBundlePathLineEdit.currentPath or None

    # -- consent, once per server --------------------------------------------------------------------------

    def _uploadConsentPrompt(self, server: str) -> tuple[str, str]:
        """(question, window title) asking to send this module's data to ``server`` now and in the future."""
        raise NotImplementedError

    def _confirmUpload(self, url: str) -> bool:
        # Stored as JSON text (medprivacy.consent), under the server's normalized URL.
        key = self.settingsPrefix + "ConsentedServers"
        stored = slicer.util.settingsValue(key, "[]")
        server = normalized_server_url(url)
        if server in consented_servers(stored):
            return True
        question, windowTitle = self._uploadConsentPrompt(server)
        if not slicer.util.confirmYesNoDisplay(question, windowTitle=windowTitle):
            return False
        qt.QSettings().setValue(key, with_consent(stored, url))
        return True

    # -- job plumbing --------------------------------------------------------------------------------------

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
        """User mistakes (MedPrivacyError) get one line; anything else is a bug and keeps its traceback."""
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            try:
                action()
            except MedPrivacyError as exc:
                self._showUserError(exc)

    def _startJob(self, title: str, work, onDone: Callable[[Any], None]) -> None:
        if self._job is not None:
            raise InputError(f"{self._job.title} is still running; wait for it or press Cancel")
        self._job = BackgroundJob(title, work).start()
        self._jobDone = onDone
        self.ui.progressBar.value = 0
        self._setStatus(_("{title}...").format(title=title))
        self._updateButtons()
        self._pollTimer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        while True:
            try:
                kind, payload, detail = job.messages.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                if detail is not None:
                    self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, detail))))
                self._setStatus(payload)
                continue
            self._pollTimer.stop()
            self._job, onDone = None, self._jobDone
            self._jobDone = None
            self._updateButtons()
            if kind == "done":
                self.ui.progressBar.value = 100
                self._guarded(_("{title} finished, but its result could not be shown.").format(title=job.title),
                              lambda: onDone(payload))
            elif isinstance(payload, CancelledError):
                self.ui.progressBar.value = 0
                self._setStatus(self._cancelledText(job.title, payload))
            elif isinstance(payload, MedPrivacyError):
                self._showUserError(payload)
            else:
                logging.error("%s failed:\n%s", job.title, detail)
                self._setStatus(_("{title} failed: {error}").format(title=job.title, error=payload))
                slicer.util.errorDisplay(_("{title} failed: {error}").format(title=job.title, error=payload),
                                         detailedText=detail)
            return

    def _showUserError(self, error: Exception) -> None:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._setStatus(message)
        slicer.util.errorDisplay(message)

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    def _updateButtons(self, *_args) -> None:
        raise NotImplementedError
