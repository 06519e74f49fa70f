"""The app side of ``medprivacy.worker``: start one worker process, turn its JSON lines into callbacks, cancel it.

Two ways to run the same protocol, parsed by one class (``WorkerProtocol``):

- ``QProcessWorker`` (in the Slicer application): ``PythonSlicer -m medprivacy.worker REQUEST.json`` through
  ``qt.QProcess``; lines are read as they arrive (``readyReadStandardOutput``), so the callbacks run on the main
  thread from Qt's event loop and no Python thread competes for the GIL.
- ``SubprocessWorker`` (CI, scripts): ``subprocess.Popen`` and a reader thread that
  queues lines; ``poll()`` dispatches them on the caller's thread, like Qt's signals do.

``start_worker`` picks the first inside the application and the second elsewhere; ``run_worker`` blocks until the
outcome and raises the same one-line errors as the in-process calls. The Slicer logics build each task's request in
one ``start_*`` method on ``start_task`` (a private folder for the task's files, the outputs turned into the logic's
result, every outcome reported once); the panels call those, and ``run_task`` runs the same method to its end for
scripts and tests. Cancel = SIGTERM (``QProcess.terminate``);
the worker removes its outputs and reports ``cancelled``. A worker that ignores it is killed after a grace period.
No Qt import at module level: this file also runs on slicer-core and plain Python.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

#: Seconds a cancelled worker gets to clean up before it is killed.
KILL_AFTER_S = 10.0
#: Lines of the worker's stderr kept to explain a worker that died without an answer.
STDERR_TAIL_LINES = 20
TOKEN_ENV = "MEDPRIVACY_TOKEN"

Progress = Callable[[str, "float | None"], None]
OnResult = Callable[[dict], None]
OnError = Callable[[str, str], None]  # (one-line message, kind: input | server | cancelled | internal)


class WorkerProtocol:
    """Parses the worker's stdout (bytes, in any chunks) into progress/result/error callbacks.

    Exactly one of ``on_result`` or ``on_error`` is called, by the worker's own line or, when the process ends
    without one (a crash, a kill), by ``finish`` with its exit code and last stderr line.
    """

    def __init__(
        self, on_progress: Progress | None = None, on_result: OnResult | None = None, on_error: OnError | None = None
    ) -> None:
        self.on_progress, self.on_result, self.on_error = on_progress, on_result, on_error
        self._buffer = b""
        self.done = False
        self.cancel_requested = False
        self.stderr_tail: list[str] = []

    def feed(self, data: bytes) -> None:
        self._buffer += bytes(data)
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._line(line)

    def feed_stderr(self, data: bytes) -> None:
        text = bytes(data).decode("utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        self.stderr_tail = (self.stderr_tail + lines)[-STDERR_TAIL_LINES:]

    def finish(self, exit_code: int | None) -> None:
        if self._buffer:
            self._line(self._buffer)
            self._buffer = b""
        if self.done:
            return
        if self.cancel_requested:
            self._finish_error("cancelled", "cancelled")
            return
        last = self.stderr_tail[-1] if self.stderr_tail else "no message"
        self._finish_error(
            f"the worker process stopped without an answer (exit code {exit_code}: {last}); see the Python console",
            "internal",
        )

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text or self.done:
            return
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or "event" not in message:
            self.feed_stderr(raw)  # not ours: keep it with the diagnostics
            return
        event = message["event"]
        if event == "progress":
            if self.on_progress is not None:
                fraction = message.get("fraction")
                self.on_progress(str(message.get("message", "")), None if fraction is None else float(fraction))
        elif event == "result":
            self.done = True
            if self.on_result is not None:
                self.on_result(dict(message.get("outputs") or {}))
        elif event == "error":
            self._finish_error(
                str(message.get("message") or "the worker failed"), str(message.get("kind") or "internal")
            )

    def _finish_error(self, message: str, kind: str) -> None:
        self.done = True
        if self.on_error is not None:
            self.on_error(message, kind)


# -- starting the process -------------------------------------------------------------------------------------


def in_slicer_app() -> bool:
    try:
        import slicer

        return getattr(slicer, "app", None) is not None
    except ImportError:
        return False


def python_executable() -> str:
    """``PythonSlicer`` inside the application (Slicer puts it on PATH, see ``slicer.util.pip_install``); this
    interpreter elsewhere."""
    if in_slicer_app():
        import shutil

        found = shutil.which("PythonSlicer")
        if found:
            return found
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def package_root() -> str:
    """The folder holding ``medprivacy``: in a built extension it sits in the scripted modules' folder, which
    Slicer puts on its own ``sys.path`` but a child ``PythonSlicer`` does not know about."""
    import medprivacy

    return str(Path(medprivacy.__file__).resolve().parent.parent)


def worker_environment(token: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to add to the child's environment: where ``medprivacy`` is, and secrets (never argv)."""
    paths = [package_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}
    if token:
        env[TOKEN_ENV] = token
    env.update(extra or {})
    return env


def write_request(request: dict[str, Any], folder: str | os.PathLike | None = None) -> Path:
    """The request as a private JSON file (0600): it names the patient's files."""
    handle, name = tempfile.mkstemp(prefix="medprivacy-request-", suffix=".json", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(request, stream)
    return Path(name)


class SubprocessWorker:
    """The protocol over ``subprocess.Popen`` with a reader thread; callbacks run in ``poll``/``wait``'s thread."""

    def __init__(
        self,
        request: dict[str, Any],
        on_progress: Progress | None = None,
        on_result: OnResult | None = None,
        on_error: OnError | None = None,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        self.protocol = WorkerProtocol(on_progress, on_result, on_error)
        self._request, self._env, self._python = request, env or {}, python or python_executable()
        self._events: queue.Queue = queue.Queue()
        self.process: subprocess.Popen | None = None
        self._request_path: Path | None = None
        self._killer: threading.Timer | None = None
        self._closed: set[str] = set()  # the pipes that reached their end

    def start(self) -> SubprocessWorker:
        self._request_path = write_request(self._request)
        self.process = subprocess.Popen(
            [self._python, "-m", "medprivacy.worker", str(self._request_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **self._env},
        )
        for stream, kind in ((self.process.stdout, "out"), (self.process.stderr, "err")):
            threading.Thread(target=self._read, args=(stream, kind), daemon=True).start()
        return self

    def _read(self, stream, kind: str) -> None:
        for line in iter(stream.readline, b""):
            self._events.put((kind, line))
        self._events.put((kind, None))

    @property
    def running(self) -> bool:
        """True until the process has exited and its outcome was dispatched (the result may come a little earlier)."""
        return self.process is not None and not (self.protocol.done and self.process.poll() is not None)

    def poll(self, timeout: float = 0.0) -> bool:
        """Dispatch what arrived (waiting up to ``timeout`` s for the first); True until the process has ended."""
        try:
            kind, line = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
            while True:
                if line is None:
                    self._closed.add(kind)
                elif kind == "out":
                    self.protocol.feed(line)
                else:
                    self.protocol.feed_stderr(line)
                kind, line = self._events.get_nowait()
        except queue.Empty:
            pass
        # Never wait for the process here: poll runs on the GUI's tick.
        exited = self._closed >= {"out", "err"} and self.process.poll() is not None
        if exited:
            self.protocol.finish(self.process.returncode)  # a worker that died without an answer
            self._cleanup()
        return not exited

    def wait(self, cancel: Callable[[], bool] | None = None, interval: float = 0.05) -> None:
        while self.poll(interval):
            if cancel is not None and cancel() and not self.protocol.cancel_requested:
                self.cancel()

    def cancel(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.protocol.cancel_requested = True
        self.process.terminate()
        self._killer = threading.Timer(KILL_AFTER_S, self._kill)
        self._killer.daemon = True
        self._killer.start()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def _cleanup(self) -> None:
        if self._killer is not None:
            self._killer.cancel()
        if self._request_path is not None:
            self._request_path.unlink(missing_ok=True)
            self._request_path = None


class QProcessWorker:
    """The protocol over ``qt.QProcess`` (application only); callbacks run on the main thread from Qt's loop."""

    def __init__(
        self,
        request: dict[str, Any],
        on_progress: Progress | None = None,
        on_result: OnResult | None = None,
        on_error: OnError | None = None,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        import qt

        self.protocol = WorkerProtocol(on_progress, on_result, on_error)
        self._request, self._python = request, python or python_executable()
        self._request_path: Path | None = None
        self.process = qt.QProcess()
        environment = qt.QProcessEnvironment.systemEnvironment()
        for name, value in (env or {}).items():
            environment.insert(name, value)
        self.process.setProcessEnvironment(environment)
        self.process.connect("readyReadStandardOutput()", self._on_stdout)
        self.process.connect("readyReadStandardError()", self._on_stderr)
        self.process.connect("finished(int,QProcess::ExitStatus)", self._on_finished)
        self.process.connect("errorOccurred(QProcess::ProcessError)", self._on_process_error)

    def start(self) -> QProcessWorker:
        self._request_path = write_request(self._request)
        self.process.start(self._python, ["-m", "medprivacy.worker", str(self._request_path)])
        return self

    @property
    def running(self) -> bool:
        return not self.protocol.done

    def cancel(self) -> None:
        import qt

        if self.process.state() == qt.QProcess.NotRunning:
            return
        self.protocol.cancel_requested = True
        if os.name == "nt":
            self.process.kill()  # terminate() only posts WM_CLOSE, which a console process never reads
        else:
            self.process.terminate()  # SIGTERM: the worker removes its outputs and reports "cancelled"
            qt.QTimer.singleShot(int(KILL_AFTER_S * 1000), self._kill)

    def _kill(self) -> None:
        import qt

        if self.process.state() != qt.QProcess.NotRunning:
            self.process.kill()

    def _on_stdout(self) -> None:
        self.protocol.feed(_as_bytes(self.process.readAllStandardOutput()))

    def _on_stderr(self) -> None:
        import logging

        data = _as_bytes(self.process.readAllStandardError())
        self.protocol.feed_stderr(data)
        logging.info("MedPrivacy worker: %s", data.decode("utf-8", errors="replace").rstrip())

    def _on_finished(self, exit_code, _status=None) -> None:
        import qt

        self._on_stdout()
        # The exit code means nothing after a crash (a kill, a segfault): Qt's docs, QProcess::exitCode.
        crashed = self.process.exitStatus() == qt.QProcess.CrashExit
        self.protocol.finish(None if crashed else int(exit_code))
        self._cleanup()

    def _on_process_error(self, error) -> None:
        import qt

        if error == qt.QProcess.FailedToStart and not self.protocol.done:
            self.protocol._finish_error(
                f"could not start {self._python}: {self.process.errorString()}; check the Slicer installation",
                "internal",
            )
            self._cleanup()

    def _cleanup(self) -> None:
        if self._request_path is not None:
            self._request_path.unlink(missing_ok=True)
            self._request_path = None


def _as_bytes(data) -> bytes:
    """A QByteArray (PythonQt) or bytes as bytes."""
    raw = data.data() if hasattr(data, "data") else data
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8")


def start_worker(
    request: dict[str, Any],
    on_progress: Progress | None = None,
    on_result: OnResult | None = None,
    on_error: OnError | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
):
    """Start one worker: through ``QProcess`` in the application, ``subprocess`` elsewhere (then call ``poll``).

    Keep the returned object until its outcome arrives: a collected ``QProcess`` takes its process down with it.
    """
    worker_class = QProcessWorker if in_slicer_app() else SubprocessWorker
    return worker_class(request, on_progress, on_result, on_error, env=worker_environment(token, env)).start()


def error_for(message: str, kind: str) -> Exception:
    """The one-line exception the in-process call would have raised for a worker's error line; an ``internal``
    error (a bug, its traceback in the worker's stderr) is a plain RuntimeError."""
    from medprivacy.errors import CancelledError, InputError, ServerError

    return {"cancelled": CancelledError, "input": InputError, "server": ServerError}.get(kind, RuntimeError)(message)


def raise_for(message: str, kind: str):
    from medprivacy.errors import MedPrivacyError

    error = error_for(message, kind)
    raise error if isinstance(error, MedPrivacyError) else MedPrivacyError(message)


def run_worker(
    request: dict[str, Any],
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run one worker to its end in this thread (a ``BackgroundJob``, a script, a test); returns its outputs.

    ``cancel()`` is polled every 50 ms and terminates the worker; errors are raised as one-line MedPrivacyErrors.
    """
    outcome: dict[str, Any] = {}
    worker = SubprocessWorker(
        request,
        progress,
        lambda outputs: outcome.update(outputs=outputs),
        lambda message, kind: outcome.update(error=(message, kind)),
        env=worker_environment(token, env),
    ).start()
    worker.wait(cancel)
    if "error" in outcome:
        raise_for(*outcome["error"])
    return outcome["outputs"]


def one_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def start_task(
    prepare: Callable[[Path], dict[str, Any]],
    finish: Callable[[dict], Any],
    on_progress: Progress | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: OnError | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
    prefix: str = "medprivacy-task-",
):
    """Start one worker task whose files live in a private temporary folder; returns the worker at once.

    ``prepare(folder)`` writes the task's inputs there and returns its request. When the worker answers,
    ``finish(outputs)`` turns its outputs into the caller's result (it may read the folder and, on the main thread,
    touch MRML); then the folder is removed and ``on_done(result)`` runs. Every failure, ``finish``'s included,
    reaches ``on_error(message, kind)`` once: a Qt callback that raised would leave the GUI waiting forever.
    """
    import logging
    import shutil

    from medprivacy.errors import MedPrivacyError

    folder = Path(tempfile.mkdtemp(prefix=prefix))

    def failed(message: str, kind: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if on_error is not None:
            on_error(message, kind)

    def finished(outputs: dict) -> None:
        try:
            result = finish(outputs)
        except Exception as exc:
            if not isinstance(exc, MedPrivacyError):
                logging.exception("reading the worker's result failed")
            failed(one_line(exc), "input" if isinstance(exc, MedPrivacyError) else "internal")
            return
        shutil.rmtree(folder, ignore_errors=True)
        if on_done is not None:
            on_done(result)

    try:
        return start_worker(prepare(folder), on_progress, finished, failed, token=token, env=env)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def run_task(
    start: Callable[..., Any], progress: Progress | None = None, cancel: Callable[[], bool] | None = None
) -> Any:
    """Run a logic's ``start_*`` call (``start(on_progress=, on_done=, on_error=)``, e.g. a ``functools.partial``)
    to its end in this thread; returns what ``on_done`` got and raises what ``on_error`` got as the in-process
    call's one-line error. For scripts and tests outside the application, where ``start_worker`` gives a
    ``SubprocessWorker``: in the application the panels take the callbacks from Qt's loop instead."""
    outcome: dict[str, Any] = {}
    worker = start(
        on_progress=progress,
        on_done=lambda result: outcome.update(result=result),
        on_error=lambda message, kind: outcome.update(error=(message, kind)),
    )
    worker.wait(cancel)
    if "error" in outcome:
        raise_for(*outcome["error"])
    return outcome["result"]
