"""The worker process protocol for real: a real uvicorn server on 127.0.0.1, real ``python -m medprivacy.worker``
subprocesses, real signals and files.

What the Slicer modules rely on: progress lines arrive before the result; Cancel (SIGTERM) stops the worker promptly
and leaves no output; a user's mistake is one JSON error line and no traceback; the result files are valid; and a
main thread that holds the GIL between its ticks (as Slicer's does) still ticks on time and still gets the progress.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from medprivacy.server.local import free_port

sys.path.insert(0, str(REPO_ROOT))  # MedPrivacySlicerCommon, as a source checkout added to Slicer has it
from medprivacy.errors import CancelledError, InputError, ServerError  # noqa: E402
from medprivacy.labels import TISSUE_SEGMENTS  # noqa: E402
from MedPrivacySlicerCommon.worker import SubprocessWorker, WorkerProtocol, run_worker, worker_environment  # noqa: E402


class Recorder:
    """Every callback of one worker, in order, with the time it was delivered."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, object]] = []

    def progress(self, message, fraction):
        self.events.append(("progress", time.monotonic(), (message, fraction)))

    def result(self, outputs):
        self.events.append(("result", time.monotonic(), outputs))

    def error(self, message, kind):
        self.events.append(("error", time.monotonic(), (message, kind)))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    def outcome(self):
        return self.events[-1]

    def start(self, request, env=None) -> SubprocessWorker:
        return SubprocessWorker(
            request, self.progress, self.result, self.error, env=worker_environment(extra=env)
        ).start()


@pytest.fixture(scope="module")
def key_dir(live_server, tmp_path_factory) -> Path:
    """A small Mixup key for the tiny server's patch size, made by the worker's own keygen task."""
    patch_size = live_server.client().info()["models"]["mixup-seg"]["patch_size"]
    folder = tmp_path_factory.mktemp("worker-key") / "key"
    outputs = run_worker(
        {
            "task": "mixup-keygen",
            "options": {"key_dir": str(folder), "subjects": 1, "patches": 64, "patch_size": patch_size},
        }
    )
    assert outputs == {"key_dir": str(folder), "patches": 64, "patch_size": list(patch_size)}
    return folder


@pytest.fixture(scope="module")
def brain_file(tmp_path_factory) -> Path:
    """The MNI152 T1 (on the model grid, so no registration slows the tests), as the Slicer logic exports it."""
    import SimpleITK as sitk

    from medprivacy.data.template import load_template

    path = tmp_path_factory.mktemp("worker-input") / "brain.nrrd"
    sitk.WriteImage(load_template().image, str(path))
    return path


def segment_request(server, key_dir, brain_file, out: Path, tta: int = 2, **extra) -> dict:
    return {
        "task": "mixup-segment",
        "inputs": {"image": str(brain_file)},
        "outputs": {"labelmap": str(out / "labelmap.nrrd"), **extra},
        "server": {"url": server.url},
        "options": {"key_dir": str(key_dir), "tta": tta, "unmix": "naive", "seed": 0},
    }


def test_progress_arrives_before_a_valid_result(live_server, key_dir, brain_file, tmp_path):
    import SimpleITK as sitk

    recorder = Recorder()
    worker = recorder.start(
        segment_request(live_server, key_dir, brain_file, tmp_path, uploaded=str(tmp_path / "uploaded.nrrd"))
    )
    worker.wait()
    kinds = recorder.kinds()
    assert worker.process.returncode == 0, recorder.events
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "error" not in kinds
    progress = [payload for kind, _, payload in recorder.events if kind == "progress"]
    assert len(progress) >= 3, progress
    fractions = [fraction for _, fraction in progress if fraction is not None]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions

    outputs = recorder.outcome()[2]
    assert outputs["labelmap"] == str(tmp_path / "labelmap.nrrd") and outputs["stats"]["patches_sent"] > 0
    labels, brain = sitk.ReadImage(outputs["labelmap"]), sitk.ReadImage(str(brain_file))
    assert labels.GetSize() == brain.GetSize()
    assert np.allclose(labels.GetOrigin(), brain.GetOrigin())
    assert np.allclose(labels.GetDirection(), brain.GetDirection())
    values = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    assert values <= {0} | set(TISSUE_SEGMENTS) and len(values) > 1
    uploaded = sitk.ReadImage(outputs["uploaded"])
    assert uploaded.GetSize() == brain.GetSize()
    # Exactly the outputs asked for: no temporary file left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelmap.nrrd", "uploaded.nrrd"]


def test_sigterm_mid_run_exits_promptly_and_leaves_no_output(live_server, key_dir, brain_file, tmp_path):
    recorder = Recorder()
    worker = recorder.start(
        segment_request(live_server, key_dir, brain_file, tmp_path, tta=16, uploaded=str(tmp_path / "uploaded.nrrd"))
    )
    # Cancel once the server is working: the worker is deep in the pipeline, between two requests.
    deadline = time.monotonic() + 120
    while not any(kind == "progress" and "server" in payload[0] for kind, _, payload in recorder.events):
        assert worker.poll(0.02) and time.monotonic() < deadline, recorder.events
    cancelled_at = time.monotonic()
    worker.cancel()
    worker.wait()
    assert time.monotonic() - cancelled_at < 5.0
    assert worker.process.returncode == 2
    kind, _, (message, error_kind) = recorder.outcome()
    assert (kind, error_kind) == ("error", "cancelled"), recorder.events
    assert "result" not in recorder.kinds()
    assert list(tmp_path.iterdir()) == [], "a cancelled worker left files behind"


def _run_cli(request: dict, tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    import os

    return subprocess.run(
        [sys.executable, "-m", "medprivacy.worker", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **worker_environment(extra=env)},
    )


def _one_error_line(completed: subprocess.CompletedProcess) -> dict:
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, completed.stdout
    event = json.loads(lines[0])
    assert event["event"] == "error" and "\n" not in event["message"], event
    assert "Traceback" not in completed.stderr, completed.stderr
    assert completed.returncode == 1
    return event


def test_unreachable_server_is_one_error_line(key_dir, brain_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    request = segment_request(type("Server", (), {"url": f"http://127.0.0.1:{free_port()}"}), key_dir, brain_file, out)
    event = _one_error_line(_run_cli(request, tmp_path))
    assert event["kind"] == "server" and "127.0.0.1" in event["message"], event
    assert list(out.iterdir()) == []


def test_wrong_token_is_one_error_line(live_server_with_token, key_dir, brain_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    request = segment_request(live_server_with_token, key_dir, brain_file, out)
    request["server"]["token_file"] = str(token_file)
    event = _one_error_line(_run_cli(request, tmp_path))
    assert event["kind"] == "server" and "token" in event["message"].lower(), event
    assert list(out.iterdir()) == []


def test_corrupt_input_file_is_one_error_line(live_server, key_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    corrupt = tmp_path / "scan.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream, nor a NIfTI image")
    event = _one_error_line(_run_cli(segment_request(live_server, key_dir, corrupt, out), tmp_path))
    assert event["kind"] == "input" and "scan.nii.gz" in event["message"], event
    assert list(out.iterdir()) == []


def test_bad_requests_are_one_error_line(tmp_path):
    event = _one_error_line(_run_cli({"task": "format-disk"}, tmp_path))
    assert "unknown task 'format-disk'" in event["message"]
    event = _one_error_line(_run_cli({"task": "mixup-segment", "inputs": {}}, tmp_path))
    assert "labelmap" in event["message"] and "outputs" in event["message"]


def test_run_worker_raises_the_in_process_errors(live_server_with_token, key_dir, brain_file, tmp_path):
    # What a BackgroundJob or script sees: the same one-line exception classes as the in-process calls.
    with pytest.raises(ServerError) as raised:
        run_worker(segment_request(live_server_with_token, key_dir, brain_file, tmp_path), token="wrong")
    assert "\n" not in str(raised.value)
    with pytest.raises(InputError):
        run_worker(
            {
                "task": "mixup-segment",
                "inputs": {"image": str(tmp_path / "missing.nrrd")},
                "outputs": {"labelmap": str(tmp_path / "l.nrrd")},
            }
        )
    started = time.monotonic()
    with pytest.raises(CancelledError):
        run_worker(
            segment_request(live_server_with_token, key_dir, brain_file, tmp_path, tta=16),
            token=live_server_with_token.token,
            cancel=lambda: time.monotonic() - started > 1.0,
        )
    assert list(tmp_path.iterdir()) == []


def test_protocol_parser_handles_split_lines_noise_and_a_silent_death():
    recorder = Recorder()
    protocol = WorkerProtocol(recorder.progress, recorder.result, recorder.error)
    stream = (
        b'{"event": "progress", "fraction": 0.5, "message": "half"}\nstray library output\n'
        b'{"event": "result", "outputs": {"labelmap": "/x.nrrd"}}\n'
    )
    for start in range(0, len(stream), 7):  # pipes deliver arbitrary chunks
        protocol.feed(stream[start : start + 7])
    protocol.finish(0)
    assert [(kind, payload) for kind, _, payload in recorder.events] == [
        ("progress", ("half", 0.5)),
        ("result", {"labelmap": "/x.nrrd"}),
    ]
    assert protocol.stderr_tail == ["stray library output"]

    recorder = Recorder()
    protocol = WorkerProtocol(recorder.progress, recorder.result, recorder.error)
    protocol.feed_stderr(b"Fatal Python error: Segmentation fault\n")
    protocol.finish(-11)
    kind, _, (message, error_kind) = recorder.outcome()
    assert (kind, error_kind) == ("error", "internal")
    assert "exit code -11" in message and "Segmentation fault" in message


def _gil_holding_loop(poll, running, limit_s: float, tick_s: float = 0.010) -> tuple[int, float, float]:
    """Slicer's main thread in miniature: it holds the GIL between event-loop ticks (a huge switch interval, a
    Python busy loop), ticks every ``tick_s`` and hands the GIL over only at a tick. Returns (ticks, seconds, longest
    ``poll``)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        started = time.monotonic()
        ticks, longest_poll, next_tick = 0, 0.0, started + tick_s
        while running() and time.monotonic() - started < limit_s:
            while time.monotonic() < next_tick:  # the event loop busy with its own work, holding the GIL
                pass
            next_tick += tick_s
            ticks += 1
            before = time.monotonic()
            poll()
            longest_poll = max(longest_poll, time.monotonic() - before)
            time.sleep(0)  # the only GIL hand-over: what the app's Python tick allows
        return ticks, time.monotonic() - started, longest_poll
    finally:
        sys.setswitchinterval(previous)


def test_a_gil_holding_main_loop_keeps_ticking_and_gets_progress(live_server, key_dir, brain_file, tmp_path):
    """While the worker segments, a main thread that holds the GIL between 10 ms ticks (as Slicer's does) keeps its
    tick rate, never waits in ``poll``, and receives the progress as it happens, long before the result."""
    tick_s = 0.010
    recorder = Recorder()
    worker = recorder.start(segment_request(live_server, key_dir, brain_file, tmp_path))
    ticks, elapsed, longest_poll = _gil_holding_loop(worker.poll, lambda: worker.running, 120, tick_s)
    assert recorder.kinds()[-1] == "result", recorder.events
    assert ticks >= 0.8 * elapsed / tick_s, (ticks, elapsed)
    assert longest_poll < 0.25, longest_poll  # polling never waits for the worker
    progress_times = [at for kind, at, _ in recorder.events if kind == "progress"]
    assert len(progress_times) >= 3 and progress_times[0] < recorder.outcome()[1] - 0.5, recorder.events
