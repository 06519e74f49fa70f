"""Threads for the Slicer panels' short server calls (connection test, model lists, one image's search).

Long work runs in a worker process instead (``medprivacy.worker``): inside Slicer the main thread holds the GIL
between Qt events, so a thread doing numpy or torch work would crawl; one that mostly waits on the network does not.
Plain threading and a queue, no Qt: the core package stays importable without Slicer, and each module's panel
drains ``messages`` from its own Qt timer on the main thread.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Any, Callable


class BackgroundJob:
    """Runs one core call in a worker thread; it reaches the GUI only through ``messages``.

    ``work(progress, cancel)`` runs in the thread and must not touch Qt or MRML. The GUI drains ``messages``
    from a timer on the main thread: ``("progress", text, fraction or None)`` any number of times, then exactly one
    ``("done", result, None)`` or ``("error", exception, formatted_traceback)``.
    """

    def __init__(self, title: str, work: Callable[[Callable[[str, float | None], None], Callable[[], bool]], Any]):
        self.title = title
        self.messages: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._work = work
        self._thread = threading.Thread(target=self._run, name=f"MedPrivacy: {title}", daemon=True)

    def start(self) -> BackgroundJob:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def _progress(self, text: str, fraction: float | None = None) -> None:
        # The core reports a stage without a fraction when it cannot tell how far along it is.
        self.messages.put(("progress", str(text), None if fraction is None else float(fraction)))

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self.cancel_event.is_set)
        except BaseException as exc:  # every outcome must reach the GUI, or it waits forever
            self.messages.put(("error", exc, traceback.format_exc()))
        else:
            self.messages.put(("done", result, None))
