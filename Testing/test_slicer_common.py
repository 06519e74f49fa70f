"""MedPrivacySlicerCommon, the widget code both Slicer modules share (job polling, server box, consent).

Its Qt part (``widgets.py``) runs only in the application, so here it is checked as source: it parses, both module
widgets use it instead of keeping their own copy, and the extension installs it. The package file itself must import
without Qt, since the modules' Libs look for it on ``sys.path`` under slicer-core too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import slicer_support

COMMON_DIR = slicer_support.REPO_ROOT / "MedPrivacySlicerCommon"
#: What the mixin does for both widgets; a widget that defines one of these again has started a second copy.
SHARED_METHODS = {
    "_initJobState", "_setupJobTimer", "_stopJob", "_restoreServerSettings", "_saveServerSettings", "_connection",
    "_confirmUpload", "onCancel", "_guarded", "_startJob", "_pollJob", "_showUserError", "_setStatus",
}
MODULES = ("MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy")


def _class(tree: ast.AST, name: str) -> ast.ClassDef:
    found = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == name]
    assert len(found) == 1, name
    return found[0]


def test_shared_widget_code_parses_and_defines_what_the_widgets_leave_out():
    tree = ast.parse((COMMON_DIR / "widgets.py").read_text(encoding="utf-8"))
    mixin = _class(tree, "ServerJobWidgetMixin")
    defined = {node.name for node in mixin.body if isinstance(node, ast.FunctionDef)}
    assert SHARED_METHODS <= defined, sorted(SHARED_METHODS - defined)


def test_package_file_imports_nothing():
    tree = ast.parse((COMMON_DIR / "__init__.py").read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("name", MODULES)
def test_both_widgets_use_the_shared_mixin_instead_of_a_copy(name):
    source = (slicer_support.REPO_ROOT / name / f"{name}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert "from MedPrivacySlicerCommon.widgets import ServerJobWidgetMixin" in source
    widget = _class(tree, f"{name}Widget")
    assert [ast.unparse(base) for base in widget.bases][0] == "ServerJobWidgetMixin"
    redefined = {node.name for node in widget.body if isinstance(node, ast.FunctionDef)} & SHARED_METHODS
    assert not redefined, sorted(redefined)
    # The import sits inside the app guard: at module level it would need Qt where Slicer lists the module.
    guarded = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "_HAVE_APP"]
    assert guarded and any(isinstance(node, ast.ImportFrom) and node.module == "MedPrivacySlicerCommon.widgets"
                           for node in ast.walk(guarded[0]))


def test_libs_make_the_shared_package_importable_without_its_qt_part():
    # The modules' own no-Qt load tests (test_slicer_logic.py, test_slicer_watermark.py) cover the Libs importing it.
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")
    slicer_support.load_module()
    import MedPrivacySlicerCommon

    assert Path(MedPrivacySlicerCommon.__file__).resolve().parent == COMMON_DIR
    assert "MedPrivacySlicerCommon.widgets" not in sys.modules
