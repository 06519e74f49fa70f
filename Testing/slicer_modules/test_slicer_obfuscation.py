"""ObfuscationPrivacy's Slicer logic on real MRML nodes (slicer-core, no Qt) against a real local server.

The VAE is the tiny untrained one (``tiny_obfuscation_models_dir``) and training runs a few steps: these tests check
mechanics (frames, geometry, sequences, keys, jobs, tables), not privacy. The test bodies live in
``ObfuscationPrivacyLib.ObfuscationPrivacyTestMixin`` so that the in-application self-test runs the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unittest

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")

import slicer_support  # noqa: E402  (Testing/ is on sys.path: pytest's rootdir-relative import of this file)
from conftest import start_server  # noqa: E402

from medprivacy.server.local import free_port  # noqa: E402

ObfuscationPrivacy = slicer_support.load_module(slicer_support.OBFUSCATION_MODULE_DIR)


class _Case(ObfuscationPrivacy.ObfuscationPrivacyTestMixin, unittest.TestCase):
    """Gives the mixin its assert* methods; not collected itself (its bodies need a scene argument)."""

    __test__ = False


@pytest.fixture
def case() -> _Case:
    return _Case()


@pytest.fixture(scope="module")
def server(tiny_obfuscation_models_dir):
    handle = start_server([], models_dir=tiny_obfuscation_models_dir)
    yield handle
    handle.stop()


def test_volumes_and_sequences_round_trip_with_geometry(case, scene, tmp_path, tiny_obfuscation_models_dir):
    case.check_frames_round_trip_with_geometry(scene, tmp_path, tiny_obfuscation_models_dir)


def test_unusable_inputs_missing_key_and_unreachable_server_give_one_line_errors(
    case, scene, tmp_path, tiny_obfuscation_models_dir
):
    case.check_rejects_unusable_inputs(scene, f"http://127.0.0.1:{free_port()}", tmp_path, tiny_obfuscation_models_dir)


def test_train_from_folder_classify_to_table_and_cancel_on_the_server(
    case, scene, server, tmp_path, tiny_obfuscation_models_dir
):
    case.check_train_classify_and_cancel(scene, server.url, tmp_path, tiny_obfuscation_models_dir)


def test_connection_line_counts_the_obfuscation_models(scene, server, tiny_obfuscation_models_dir):
    logic = ObfuscationPrivacy.ObfuscationPrivacyLogic(scene, tiny_obfuscation_models_dir)
    line = logic.test_connection(server.url)
    assert line.startswith(f"connected to {server.url}") and "obfuscation model(s)" in line


def test_module_file_loads_without_qt_or_heavy_imports():
    # In a fresh interpreter: Slicer must list the module before its dependencies are installed, the GUI classes
    # are absent (not stubbed) without Qt, and the module file hands out the Lib's own objects.
    code = (
        "import sys, slicer_support\n"
        "sys.path.insert(0, str(slicer_support.OBFUSCATION_MODULE_DIR))\n"
        "import ObfuscationPrivacyLib\n"
        "m = slicer_support.load_module(slicer_support.OBFUSCATION_MODULE_DIR)\n"
        "assert not m._HAVE_APP and not hasattr(m, 'ObfuscationPrivacyWidget')\n"
        "for name in ObfuscationPrivacyLib.__all__:\n"
        "    assert getattr(m, name) is getattr(ObfuscationPrivacyLib, name), name\n"
        "heavy = {'qt', 'torch', 'monai', 'requests', 'SimpleITK', 'scipy', 'cryptography'}\n"
        "heavy = sorted(heavy & set(sys.modules))\n"
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
