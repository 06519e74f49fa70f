"""MixupPrivacy's Slicer logic on real MRML nodes (slicer-core, no Qt, nothing faked).

The test bodies live in ``MixupPrivacyLib.MixupPrivacyTestMixin`` so that the in-application self-test runs the same
code on ``slicer.mrmlScene``; here each one gets a fresh slicer-core scene (see ``slicer_support``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")

import slicer_support  # noqa: E402  (Testing/ is on sys.path: pytest's rootdir-relative import of this file)

from medprivacy.jobs import BackgroundJob  # noqa: E402

MixupPrivacy = slicer_support.load_module()


class _Case(MixupPrivacy.MixupPrivacyTestMixin, unittest.TestCase):
    """Gives the mixin its assert* methods; not collected itself (its bodies need a scene argument)."""

    __test__ = False


@pytest.fixture
def case() -> _Case:
    return _Case()


def test_volume_node_round_trip_keeps_voxels_and_oblique_geometry(case, scene):
    case.check_volume_round_trip(scene)


def test_labelmap_to_segmentation_keeps_labels_names_colours_and_grid(case, scene):
    case.check_labelmap_to_segmentation(scene)


def test_unusable_volumes_give_one_line_input_errors(case, scene):
    case.check_rejects_unusable_volumes(scene)


def test_module_file_loads_without_qt_or_heavy_imports():
    # In a fresh interpreter: Slicer must be able to list the module before torch/MONAI are installed, and the
    # GUI classes must simply be absent (not stubbed) where there is no Qt. The Lib must import on its own, and the
    # module file must hand out the Lib's own objects, not copies, since scripts reach them through it.
    code = (
        "import sys, slicer_support\n"
        "sys.path.insert(0, str(slicer_support.MODULE_DIR))\n"
        "import MixupPrivacyLib\n"
        "m = slicer_support.load_module()\n"
        "assert not m._HAVE_APP and not hasattr(m, 'MixupPrivacyWidget')\n"
        "for name in MixupPrivacyLib.__all__:\n"
        "    assert getattr(m, name) is getattr(MixupPrivacyLib, name), name\n"
        "heavy = sorted({'qt', 'torch', 'monai', 'requests', 'SimpleITK'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(slicer_support.REPO_ROOT / "Testing"), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_worker_helper_is_the_core_one():
    # Both Slicer modules share the core's qt-free BackgroundJob instead of each keeping a copy.
    assert MixupPrivacy.BackgroundJob is BackgroundJob


def _drain(job, timeout=10.0):
    """All messages of a finished job, waiting for its final one."""
    messages = []
    while True:
        message = job.messages.get(timeout=timeout)
        messages.append(message)
        if message[0] != "progress":
            return messages


def test_background_job_reports_progress_then_exactly_one_outcome():
    def work(progress, cancel):
        progress("loading")  # the core may report a stage without a fraction
        progress("half way", 0.5)
        return "result"

    messages = _drain(BackgroundJob("demo", work).start())
    assert messages == [("progress", "loading", None), ("progress", "half way", 0.5), ("done", "result", None)]

    def failing(progress, cancel):
        raise MixupPrivacy.InputError("bad input")

    kind, error, detail = _drain(BackgroundJob("demo", failing).start())[-1]
    assert kind == "error" and isinstance(error, MixupPrivacy.InputError) and "bad input" in detail


def test_background_job_cancel_reaches_the_worker():
    import threading

    started = threading.Event()

    def work(progress, cancel):
        started.set()
        while not cancel():
            started.wait(0.01)
        raise MixupPrivacy.CancelledError("cancelled by the user")

    job = BackgroundJob("demo", work).start()
    assert started.wait(10)
    job.cancel()
    kind, error, _detail = _drain(job)[-1]
    assert kind == "error" and isinstance(error, MixupPrivacy.CancelledError)


def test_consent_is_remembered_per_normalised_server_url():
    normalized = MixupPrivacy.normalized_server_url
    assert normalized(" HTTPS://Server.Example:8443/ ") == normalized("https://server.example:8443")
    assert normalized("https://server.example:8443") != normalized("https://server.example:8444")


@pytest.fixture
def private_server(request, tmp_path):
    """(server, unmix mode): the shipped models when Resources/Models has them, else conftest's tiny models.

    Untrained tiny models make meaningless segmentations, so only the naive unmixing (no client network) fits them.
    """
    import json

    # The same override as conftest's shipped_models: a copy avoids racing a training run that rewrites the weights.
    models_dir = os.environ.get("MEDPRIVACY_MODELS_DIR", slicer_support.REPO_ROOT / "Resources" / "Models")
    manifest = Path(models_dir) / "manifest.json"
    if manifest.is_file():
        models = json.loads(manifest.read_text(encoding="utf-8")).get("models", {})
        if "mixup-seg" in models:
            server = request.getfixturevalue("server_factory")(
                ["--audit-dir", str(tmp_path / "audit")], models_dir=manifest.parent
            )
            return server, "learned" if "mixup-unmix" in models else "naive"
    return request.getfixturevalue("live_server"), "naive"


def test_private_segmentation_end_to_end_on_a_real_server(case, scene, private_server, tmp_path):
    server, unmix = private_server
    case.check_private_segmentation_end_to_end(
        scene,
        server.url,
        tmp_path / "key",
        audit_dir=server.audit_dir,
        token=server.token,
        ca_bundle=server.ca_bundle,
        unmix=unmix,
    )
