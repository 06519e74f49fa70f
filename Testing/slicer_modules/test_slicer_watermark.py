"""MedLockerWatermark's Slicer logic on real MRML nodes (slicer-core, no Qt) against a real local server.

The server runs the tiny untrained MedLocker models (``tiny_watermark_models_dir``): these tests check mechanics
(pixels, geometry, keys, placement, MRML outputs), not watermark strength. The test bodies live in
``MedLockerWatermarkLib.MedLockerWatermarkTestMixin`` so that the in-application self-test runs the same code.
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

MedLockerWatermark = slicer_support.load_module(slicer_support.WATERMARK_MODULE_DIR)


class _Case(MedLockerWatermark.MedLockerWatermarkTestMixin, unittest.TestCase):
    """Gives the mixin its assert* methods; not collected itself (its bodies need a scene argument)."""

    __test__ = False


@pytest.fixture
def case() -> _Case:
    return _Case()


@pytest.fixture(scope="module")
def server(tiny_watermark_models_dir):
    handle = start_server([], models_dir=tiny_watermark_models_dir)
    yield handle
    handle.stop()


def test_volume_slices_round_trip_exactly_with_geometry(case, scene):
    case.check_slices_round_trip(scene)


def test_unusable_inputs_and_unreachable_server_give_one_line_errors(case, scene):
    case.check_rejects_unusable_inputs(scene, f"http://127.0.0.1:{free_port()}")


def test_protect_changes_only_the_logo_region_and_unlocks_bit_exactly(case, scene, server, tmp_path):
    case.check_protect_unlock_bit_exact(scene, server.url, tmp_path)


def test_slice_of_a_3d_volume_is_protected_as_a_single_slice_in_place(case, scene, server):
    case.check_volume_slice(scene, server.url)


def test_keep_out_and_keep_in_follow_the_lesions_of_a_segmentation_node(case, scene, server):
    case.check_keep_out_respects_segmentation(scene, server.url)


def test_server_lesion_mask_is_shown_as_used(case, scene, server):
    case.check_server_lesions(scene, server.url)


def test_dataset_folder_round_trip_and_cancel(case, scene, server, tmp_path):
    case.check_dataset_folder(scene, server.url, tmp_path)


def test_connection_line_names_the_watermark_models(scene, server):
    logic = MedLockerWatermark.MedLockerWatermarkLogic(scene)
    line = logic.test_connection(server.url)
    assert line.startswith(f"connected to {server.url}") and "4 watermark classifier(s), 1 lesion segmenter(s)" in line
    classifiers, segmenters = logic.list_models(server.url)
    assert sorted(classifiers) == ["wm-cls-densenet121", "wm-cls-efficientnet-b0", "wm-cls-resnet18", "wm-cls-vit"]
    assert list(segmenters) == ["wm-lesion-seg"]


def test_module_file_loads_without_qt_or_heavy_imports():
    # In a fresh interpreter: Slicer must list the module before its dependencies are installed, the GUI classes
    # are absent (not stubbed) without Qt, and the module file hands out the Lib's own objects.
    code = (
        "import sys, slicer_support\n"
        "sys.path.insert(0, str(slicer_support.WATERMARK_MODULE_DIR))\n"
        "import MedLockerWatermarkLib\n"
        "m = slicer_support.load_module(slicer_support.WATERMARK_MODULE_DIR)\n"
        "assert not m._HAVE_APP and not hasattr(m, 'MedLockerWatermarkWidget')\n"
        "for name in MedLockerWatermarkLib.__all__:\n"
        "    assert getattr(m, name) is getattr(MedLockerWatermarkLib, name), name\n"
        "import medprivacy.jobs\n"
        "assert m.BackgroundJob is medprivacy.jobs.BackgroundJob\n"
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
