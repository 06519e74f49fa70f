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
"""
from __future__ import annotations

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
PASSPHRASE_ENV = "MEDPRIVACY_KEY_PASSPHRASE"
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
                raise InputError(f"the request names no {group[:-1]} {name!r}; add it under \"{group}\"")
            return None
        return Path(value)

    def input_file(self, name: str) -> Path:
        path = self.path("inputs", name)
        if not path.exists():
            raise InputError(f"input {name} {path} does not exist; export it again")
        return path

    def wrote(self, path: Path) -> None:
        self.written.append(Path(path))

    def client(self, client_class=None):
        if client_class is None:
            from .transport import InferenceClient as client_class
        url = (self.server.get("url") or "").strip()
        if not url:
            raise InputError("the request names no server URL; enter the server URL")
        options = {"token_file": self.server.get("token_file") or None,
                   "ca_bundle": self.server.get("ca_bundle") or None}
        if self.server.get("timeout"):
            options["read_timeout"] = float(self.server["timeout"])
        return client_class(url, **options)


# -- tasks -------------------------------------------------------------------------------------------------------

def _mixup_keygen(task: Task) -> dict[str, Any]:
    from .mixup.bank import generate_bank

    options = {k: task.options[k] for k in ("subjects", "patches", "deformation") if task.options.get(k) is not None}
    if task.options.get("patch_size"):
        options["patch_size"] = tuple(int(v) for v in task.options["patch_size"])
    key_dir = task.options.get("key_dir") or None
    existed = key_dir is not None and Path(key_dir).exists()
    bank = generate_bank(key_dir, force=bool(task.options.get("force")), progress=task.progress, **options)
    if not existed and bank.directory is not None:
        task.wrote(Path(bank.directory))
    return {"key_dir": str(bank.directory), "patches": len(bank), "patch_size": list(bank.patch_size)}


def _mixup_segment(task: Task) -> dict[str, Any]:
    from .files import check_writable_folder
    from .mixup.bank import ReferenceBank
    from .mixup.io import check_labelmap_path, read_image, write_image, write_labelmap
    from .mixup.pipeline import segment_private

    labelmap_path = check_labelmap_path(task.path("outputs", "labelmap"))
    uploaded_path, rebuild_path = task.path("outputs", "uploaded", False), task.path("outputs", "rebuild", False)
    for extra in (uploaded_path, rebuild_path):
        if extra is not None:
            check_writable_folder(extra.parent, f"folder of {extra.name}")
    image = read_image(task.input_file("image"))
    bank = ReferenceBank.load(task.options.get("key_dir") or None)
    client = task.client()
    tta = task.options.get("tta")
    result = segment_private(image, client, bank, privacy=task.options.get("privacy"),
                             tta=None if tta is None else int(tta),
                             unmix=task.options.get("unmix", "learned"), seed=task.options.get("seed"),
                             keep_uploaded=uploaded_path is not None, progress=task.progress, cancel=task.cancelled)
    outputs: dict[str, Any] = {"stats": result.stats}
    if rebuild_path is not None:
        from .mixup.audit.attack import server_rebuild

        write_image(server_rebuild(result.session, bank, progress=task.progress), rebuild_path)
        task.wrote(rebuild_path)
        outputs["rebuild"] = str(rebuild_path)
    if uploaded_path is not None:
        write_image(result.uploaded, uploaded_path)
        task.wrote(uploaded_path)
        outputs["uploaded"] = str(uploaded_path)
    write_labelmap(result.labelmap, labelmap_path)
    task.wrote(labelmap_path)
    outputs["labelmap"] = str(labelmap_path)
    return outputs


def _watermark_folder(task: Task) -> dict[str, Any]:
    from .transport.watermark_client import WatermarkClient
    from .watermark import batch, blending

    passphrase = os.environ.get(PASSPHRASE_ENV) or None
    key_file = task.options.get("key_file") or None
    credentials = {"passphrase": passphrase} if passphrase else {"key_file": key_file} if key_file else None
    if passphrase and task.options.get("scrypt_log2_n") is not None:
        credentials["scrypt_log2_n"] = int(task.options["scrypt_log2_n"])
    logo_path = task.options.get("logo")
    if logo_path and str(logo_path).endswith(".npy"):  # a logo the app already holds as pixels
        import numpy as np

        logo = blending.as_rgba(np.load(logo_path, allow_pickle=False))
    else:
        logo = blending.load_logo(logo_path) if logo_path else blending.default_logo()
    settings = batch.SearchSettings(**(task.options.get("settings") or {}))
    client = task.client(WatermarkClient)
    try:
        done, reports = batch.protect_folder(
            task.path("inputs", "folder"), task.path("outputs", "folder"), task.path("outputs", "key"), client,
            credentials, logo, settings, task.options.get("lesions", "auto"), append=bool(task.options.get("append")),
            overwrite=bool(task.options.get("overwrite")), progress=task.progress)
    finally:
        client.close()
    return {"protected": done, "folder": str(task.outputs["folder"]), "key": str(task.outputs["key"]),
            "reports": reports}


def _obfuscation_keygen(task: Task) -> dict[str, Any]:
    from .obfuscation.keygen import create_site_key

    key_dir = task.options.get("key_dir")
    if not key_dir:
        raise InputError("choose a folder for the obfuscation key")
    existed = Path(key_dir).exists()
    key = create_site_key(key_dir, force=bool(task.options.get("force")), vae_from=task.options.get("vae_from") or None,
                          models_dir=task.options.get("models_dir") or None, progress=task.progress)
    if not existed:
        task.wrote(Path(key_dir))
    return {"key_dir": str(key_dir), "description": key.describe()}


def _load_frames(task: Task):
    import numpy as np

    path = task.input_file("frames")
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"input frames {path} are not a readable .npy array ({str(exc).splitlines()[0]}); "
                         "export them again") from None
    if frames.ndim != 3:
        raise InputError(f"input frames {path} hold a {frames.ndim}-D array; expected (frames, height, width)")
    return frames


def _obfuscate(frames, key_dir, progress):
    from .obfuscation.key import SiteKey
    from .obfuscation.transform import Obfuscator

    if not key_dir:
        raise InputError("choose the obfuscation key folder, or generate a key")
    key = SiteKey.load(key_dir)

    def report(done, total):
        progress(f"obfuscating frame {done}/{total}", done / max(1, total))

    return Obfuscator(key).obfuscate(frames, report), key.key_id


def _save_array(task: Task, name: str, array) -> str:
    import numpy as np

    from .files import write_atomically

    path = task.path("outputs", name)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: given a name, np.save would append ".npy" to it
            np.save(stream, np.ascontiguousarray(array), allow_pickle=False)

    write_atomically(path, write, temporary_suffix=".part")
    task.wrote(path)
    return str(path)


def _obfuscation_apply(task: Task) -> dict[str, Any]:
    codes, key_id = _obfuscate(_load_frames(task), task.options.get("key_dir"), task.progress)
    return {"codes": _save_array(task, "codes", codes), "key_id": key_id}


def _obfuscation_classify(task: Task) -> dict[str, Any]:
    from .transport.obfuscation_client import ObfuscationClient

    model = task.options.get("model")
    if not model:
        raise InputError("choose a model trained with this key (refresh the list from the server)")
    codes, key_id = _obfuscate(_load_frames(task), task.options.get("key_dir"), task.progress)
    task.progress("classifying on the server", 0.9)
    client = task.client(ObfuscationClient)
    try:
        answer = client.classify(codes, model, key_id)
    finally:
        client.close()
    return {"model": model, "classes": list(answer["classes"]), "probabilities": answer["probabilities"],
            "predicted": answer["predicted"], "key_id": key_id}


def _obfuscation_train(task: Task) -> dict[str, Any]:
    from .obfuscation.dataset import train_on_server
    from .obfuscation.key import SiteKey
    from .transport.obfuscation_client import ObfuscationClient

    dataset, key_dir = task.options.get("dataset"), task.options.get("key_dir")
    if not dataset:
        raise InputError("choose the dataset folder (one subfolder per class)")
    if not key_dir:
        raise InputError("choose the obfuscation key folder, or generate a key")
    key = SiteKey.load(key_dir)
    client = task.client(ObfuscationClient)
    _cooperative.set()  # a Cancel must reach the server's job: the core cancels it at its next check
    try:
        job = train_on_server(dataset, key, client, int(task.options.get("steps") or 1500),
                              task.options.get("name") or "", task.progress, task.cancelled)
    finally:
        client.close()
    return {"job": job}


TASKS: dict[str, Callable[[Task], dict[str, Any]]] = {
    "mixup-keygen": _mixup_keygen,
    "mixup-segment": _mixup_segment,
    "watermark-folder": _watermark_folder,
    "obfuscation-keygen": _obfuscation_keygen,
    "obfuscation-apply": _obfuscation_apply,
    "obfuscation-classify": _obfuscation_classify,
    "obfuscation-train": _obfuscation_train,
}
#: Tasks whose partial outputs stay on a stop, because they are complete and consistent by design.
KEEPS_PARTIAL_OUTPUTS = {"watermark-folder"}


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
    task = None
    try:
        request = read_request(argv, stdin if stdin is not None else sys.stdin)
        task = Task(request, reporter)
        outputs = TASKS[request["task"]](task)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # done: a late Cancel must not remove a finished result
        reporter.emit("result", outputs=outputs)
        return EXIT_OK
    except BaseException as exc:  # every outcome is reported, or the app waits for a line that never comes
        kind = _error_kind(exc)
        if task is not None and request["task"] not in KEEPS_PARTIAL_OUTPUTS:
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
