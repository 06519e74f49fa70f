"""Helpers for the in-application panel tests, which run a module's panel on an injected fake logic (as
SlicerNNUnet's widget tests do); the fakes' ``start_*`` calls answer through ``FakeWorker``. The host class must
be a ``unittest.TestCase``; Qt is imported only inside the methods, so the Libs' ``testing.py`` files that mix this
in still import under slicer-core."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

#: The per-user settings a panel writes; a test puts them back as they were.
PANEL_SETTINGS = ("ServerUrl", "CaBundle", "ConsentedServers", "KeyDirectory")


class PanelTestMixin:
    def wait_until_idle(self, panel, timeout: float = 10.0) -> None:
        """Let the event loop poll the panel's job until it has finished."""
        import slicer

        deadline = time.monotonic() + timeout
        while panel.busy:
            if time.monotonic() > deadline:
                self.fail(f"the panel's job did not finish within {timeout} s")
            slicer.app.processEvents()
            time.sleep(0.01)

    @contextlib.contextmanager
    def user_settings_kept(self, module_name: str):
        """Put the module's per-user settings back as they were after the test."""
        import qt

        settings = qt.QSettings()
        keys = [f"{module_name}/{name}" for name in PANEL_SETTINGS]
        saved = {key: settings.value(key) for key in keys if settings.contains(key)}
        try:
            yield
        finally:
            for key in keys:
                if key in saved:
                    settings.setValue(key, saved[key])
                else:
                    settings.remove(key)

    @contextlib.contextmanager
    def panel_on_fake_logic(self, panel_class, logic):
        """A panel on ``logic``, with nothing to install, cleaned up and the user's settings put back afterwards."""
        with self.user_settings_kept(panel_class.moduleName):
            panel = panel_class(logic, installer=lambda: True)
            try:
                yield panel
            finally:
                panel.cleanup()

    def consent_to(self, panel, url: str) -> None:
        """Record consent for ``url`` as the user's answer to the upload prompt would (inside
        ``user_settings_kept``)."""
        from medprivacy.consent import with_consent

        panel.setUserSetting("ConsentedServers", with_consent(panel.userSetting("ConsentedServers", "[]"), url))


class FakeWorker:
    """What a fake logic's ``start_*`` call returns to the panel: like ``QProcessWorker`` it answers later, from
    Qt's event loop on the main thread (one progress step, then ``result()``'s value, or its MedPrivacyError as an
    ``input`` error line), without a process. ``cancel()`` before the answer gives the ``cancelled`` line, as a
    terminated worker does."""

    def __init__(self, result: Callable[[], Any], on_progress=None, on_done=None, on_error=None) -> None:
        import qt

        self._result, self._on_progress, self._on_done, self._on_error = result, on_progress, on_done, on_error
        self.cancelled = False
        qt.QTimer.singleShot(0, self._progress)

    def cancel(self) -> None:
        self.cancelled = True

    def _progress(self) -> None:
        import qt

        if not self.cancelled and self._on_progress is not None:
            self._on_progress("halfway", 0.5)
        qt.QTimer.singleShot(10, self._answer)

    def _answer(self) -> None:
        from medprivacy.errors import MedPrivacyError

        if self.cancelled:
            self._on_error("cancelled", "cancelled")
            return
        try:
            value = self._result()
        except MedPrivacyError as exc:
            self._on_error(str(exc), "input")
            return
        self._on_done(value)
