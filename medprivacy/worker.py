"""One heavy task in its own process, so that the Slicer application stays responsive while it runs.

Inside Slicer the main thread holds the GIL between Qt events, so a Python thread doing numpy, torch or socket work
advances only at each timer tick; a separate process does not share that GIL. The Slicer modules start this module
with ``PythonSlicer`` (``MedPrivacySlicerCommon.worker``), CI with plain ``python``; both speak this protocol.

Protocol
--------
In: ``python -m medprivacy.worker REQUEST.json`` (or the request on stdin when no file is given), a JSON object::

    {"task": "mixup-segment",                        # one of TASKS
     "inputs": {"image": "/tmp/in.nrrd"},            # files read (task-specific names)
     "outputs": {"labelmap": "/tmp/out.nrrd"},       # files written, each atomically (medprivacy.files)
     "server": {"url": "https://...", "token_file": null, "ca_bundle": null, "timeout": 300},
     "options": {"tta": 2, "unmix": "naive"}}        # the core call's options

Secrets never travel in the request: the token comes from ``server.token_file`` or ``MEDPRIVACY_TOKEN``, a
watermark passphrase from ``MEDPRIVACY_KEY_PASSPHRASE`` (the runner sets both in the child's environment).

Out: one JSON object per line on stdout (anything else the libraries print goes to stderr)::

    {"event": "progress", "fraction": 0.42, "message": "segmenting mixed patches on the server"}   # 0..n times
    {"event": "result", "outputs": {"labelmap": "/tmp/out.nrrd", "stats": {...}}}                  # last, on success
    {"event": "error", "message": "one line naming the problem and the fix", "kind": "input"}      # last, on failure

``fraction`` is null when the stage cannot tell how far along it is; progress comes at most ten times a second
(and always at fraction 1). ``kind`` is ``input`` (bad input or option),
``server`` (unreachable, refused, wrong token), ``cancelled`` or ``internal`` (a bug: its traceback goes to stderr).

Cancel: SIGTERM (or Ctrl-C). The worker stops at once, removes every output it wrote in this run (temporary files
are never left: outputs are written then renamed) and reports ``cancelled``. Two tasks differ: ``watermark-folder``
keeps the images already written, since its key on disk always restores them (``watermark.batch``), and
``obfuscation-train`` stops at its next check (one per file, then one per poll) so that it cancels the server's
training job on the way out.

Exit code: 0 the result was reported; 1 the task failed (an error line was reported); 2 it was cancelled.

Tasks: this module is the protocol and the table ``TASK_MODULES``; each task's body lives with its feature
(``mixup/worker_tasks.py``, ``watermark/worker_tasks.py``, ``obfuscation/worker_tasks.py``) and is imported only
when a request names it, so a watermark worker never imports MONAI or torch.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import AuthError, CancelledError, InputError, MedPrivacyError, ServerError

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2
#: Progress lines are rate-limited: the pipeline may report thousands of steps, the GUI needs a few per second.
PROGRESS_INTERVAL_S = 0.1


class Terminated(BaseException):
    """SIGTERM, raised where the worker is, so that the stack unwinds and temporary files are removed."""


#: Set by SIGTERM. A task that must clean up elsewhere first (a training job on the server) sets ``cooperative``;
#: SIGTERM then only sets the flag, and the core call's ``cancel`` check raises CancelledError at its next check.
_cancel_requested = threading.Event()
_cooperative = threading.Event()


class Reporter:
    """Writes the protocol's JSON lines to the real stdout, whatever the libraries do with ``sys.stdout``."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._last_progress = 0.0
        self._last_message = None

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=_jsonable) + "\n"
        # A SIGTERM in the middle of a write would leave half a line for the app to parse: hold it until the end.
        blocking = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        if blocking:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            self._stream.write(line)
            self._stream.flush()
        finally:
            if blocking:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def progress(self, message: str, fraction: float | None = None) -> None:
        now = time.monotonic()
        final = fraction is not None and fraction >= 1.0
        if self._last_message is not None and not final and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress, self._last_message = now, message
        clamped = None if fraction is None else max(0.0, min(1.0, float(fraction)))
        self.emit("progress", fraction=clamped, message=str(message))


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Task:
    """What one task run gets: the request's parts, progress, and the list of outputs it has written."""

    def __init__(self, request: dict[str, Any], reporter: Reporter) -> None:
        self.inputs = dict(request.get("inputs") or {})
        self.outputs = dict(request.get("outputs") or {})
        self.server = dict(request.get("server") or {})
        self.options = dict(request.get("options") or {})
        self.progress = reporter.progress
        self.cancelled = _cancel_requested.is_set
        self.written: list[Path] = []

    def path(self, group: str, name: str, required: bool = True) -> Path | None:
        value = (self.inputs if group == "inputs" else self.outputs).get(name)
        if value in (None, ""):
            if required:
                raise InputError(f'the request names no {group[:-1]} {name!r}; add it under "{group}"')
            return None
        return Path(value)

    def input_file(self, name: str) -> Path:
        path = self.path("inputs", name)
        if not path.exists():
            raise InputError(f"input {name} {path} does not exist; export it again")
        return path

    def wrote(self, path: Path) -> None:
        self.written.append(Path(path))

    def cancel_cooperatively(self) -> None:
        """From now on SIGTERM only sets ``cancelled()``: the task must clean up elsewhere first (a server job)."""
        _cooperative.set()

    def client(self, client_class):
        url = (self.server.get("url") or "").strip()
        if not url:
            raise InputError("the request names no server URL; enter the server URL")
        options = {
            "token_file": self.server.get("token_file") or None,
            "ca_bundle": self.server.get("ca_bundle") or None,
        }
        if self.server.get("timeout"):
            options["read_timeout"] = float(self.server["timeout"])
        return client_class(url, **options)


# -- tasks, per feature ------------------------------------------------------------------------------------------

#: Task name -> the module holding its body (its ``TASKS`` table). Imported by name only when a request names the
#: task, so a MedLocker worker never imports MONAI or torch; ``Testing/slicer_modules/test_slicer_dependencies.py``
#: follows this table from the task names each Slicer module sends.
TASK_MODULES: dict[str, str] = {
    "mixup-keygen": "medprivacy.mixup.worker_tasks",
    "mixup-segment": "medprivacy.mixup.worker_tasks",
    "watermark-folder": "medprivacy.watermark.worker_tasks",
    "obfuscation-keygen": "medprivacy.obfuscation.worker_tasks",
    "obfuscation-apply": "medprivacy.obfuscation.worker_tasks",
    "obfuscation-classify": "medprivacy.obfuscation.worker_tasks",
    "obfuscation-train": "medprivacy.obfuscation.worker_tasks",
}
TASKS = tuple(TASK_MODULES)


def task_body(name: str) -> tuple[Callable[[Task], dict[str, Any]], bool]:
    """The task's function, and whether its partial outputs stay on a stop (complete and consistent by design)."""
    module = importlib.import_module(TASK_MODULES[name])
    return module.TASKS[name], name in getattr(module, "KEEPS_PARTIAL_OUTPUTS", ())


# -- running one request ----------------------------------------------------------------------------------------


def read_request(argv: list[str], stdin) -> dict[str, Any]:
    if len(argv) > 1:
        raise InputError("give one request file (or the request on stdin): python -m medprivacy.worker REQUEST.json")
    source = argv[0] if argv and argv[0] != "-" else None
    try:
        text = Path(source).read_text(encoding="utf-8") if source else stdin.read()
    except OSError as exc:
        raise InputError(f"cannot read the request {source}: {exc.strerror or exc}; check the path") from None
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise InputError(f"the request is not valid JSON ({exc}); send one JSON object") from None
    if not isinstance(request, dict) or request.get("task") not in TASKS:
        task = request.get("task") if isinstance(request, dict) else None
        raise InputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return request


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, (CancelledError, Terminated, KeyboardInterrupt)):
        return "cancelled"
    if isinstance(exc, (ServerError, AuthError)):
        return "server"
    return "input" if isinstance(exc, MedPrivacyError) else "internal"


def _remove(paths: list[Path]) -> None:
    import shutil

    for path in reversed(paths):
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:
            pass


def _on_sigterm(signum, frame) -> None:
    _cancel_requested.set()
    if not _cooperative.is_set():
        raise Terminated()


def run(argv: list[str], stdin=None, stdout=None) -> int:
    """Run one request; returns the exit code. ``stdout`` receives the JSON lines (default: the real stdout)."""
    reporter = Reporter(stdout if stdout is not None else sys.stdout)
    task, keeps_partial_outputs = None, False
    try:
        request = read_request(argv, stdin if stdin is not None else sys.stdin)
        body, keeps_partial_outputs = task_body(request["task"])
        task = Task(request, reporter)
        outputs = body(task)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: a late Cancel must not remove a finished result
        reporter.emit("result", outputs=outputs)
        return EXIT_OK
    except BaseException as exc:  # every outcome is reported, or the app waits for a line that never comes
        kind = _error_kind(exc)
        if task is not None and not keeps_partial_outputs:
            _remove(task.written)
        if kind == "internal":
            traceback.print_exc(file=sys.stderr)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            message = f"internal error ({type(exc).__name__}: {detail}); see the log"
        elif kind == "cancelled":
            message = str(exc).splitlines()[0] if isinstance(exc, CancelledError) and str(exc) else "cancelled"
        else:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reporter.emit("error", message=message, kind=kind)
        return EXIT_CANCELLED if kind == "cancelled" else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    # The protocol owns the real stdout; whatever the libraries print (warnings, C-level output) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run(sys.argv[1:] if argv is None else argv, stdout=protocol)


if __name__ == "__main__":
    sys.exit(main())
