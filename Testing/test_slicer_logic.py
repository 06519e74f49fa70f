"""MixupPrivacy's Slicer logic on real MRML nodes (slicer-core, no Qt, nothing faked).

The test bodies live in ``MixupPrivacy.MixupPrivacyTestMixin`` so that the in-application self-test runs the same
code on ``slicer.mrmlScene``; here each one gets a fresh slicer-core scene (see ``slicer_support``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import unittest

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")

import slicer_support  # noqa: E402  (Testing/ is on sys.path: pytest's rootdir-relative import of this file)

MixupPrivacy = slicer_support.load_module()


class _Case(MixupPrivacy.MixupPrivacyTestMixin, unittest.TestCase):
    """Gives the mixin its assert* methods; not collected itself (its bodies need a scene argument)."""

    __test__ = False


@pytest.fixture
def case() -> _Case:
    return _Case()


@pytest.fixture
def scene():
    core_scene = slicer_support.make_scene()
    yield core_scene.scene
    core_scene.close()


def test_volume_node_round_trip_keeps_voxels_and_oblique_geometry(case, scene):
    case.check_volume_round_trip(scene)


def test_labelmap_to_segmentation_keeps_labels_names_colours_and_grid(case, scene):
    case.check_labelmap_to_segmentation(scene)


def test_unusable_volumes_give_one_line_input_errors(case, scene):
    case.check_rejects_unusable_volumes(scene)


def test_module_file_loads_without_qt_or_heavy_imports():
    # In a fresh interpreter: Slicer must be able to list the module before torch/MONAI are installed, and the
    # GUI classes must simply be absent (not stubbed) where there is no Qt.
    code = (
        "import sys, slicer_support\n"
        "m = slicer_support.load_module()\n"
        "assert not m._HAVE_APP and not hasattr(m, 'MixupPrivacyWidget') and hasattr(m, 'MixupPrivacyLogic')\n"
        "heavy = sorted({'qt', 'torch', 'monai', 'requests'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slicer_support.REPO_ROOT / "Testing"),
                                                         os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
