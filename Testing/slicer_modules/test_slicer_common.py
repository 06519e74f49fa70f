"""MedPrivacySlicerCommon, the code the Slicer modules share (panel base, dependency step, reloading), and the
shape every module follows (issue 13): the module file only declares the module, the panel lives in the Lib on the
shared ``ServerJobPanel``, takes its logic as an argument (typed by the Lib's ``Protocol``), keeps its state in a
parameter node, and ``onReload`` reloads the Libs.

The panels run only in the application, so here they are checked as source (``ast``) against the real ``.ui`` files,
logic classes and fakes; the qt-free parts (reloading) run for real. The package file itself must import without
Qt, since the modules' Libs look for it on ``sys.path`` under slicer-core too.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import slicer_support

COMMON_DIR = slicer_support.REPO_ROOT / "MedPrivacySlicerCommon"
#: What the shared panel does for every module; a panel that defines one of these again has started a second copy.
SHARED_METHODS = {
    "initializeParameterNode",
    "setParameterNode",
    "_restoreServerSettings",
    "_saveServerSettings",
    "_connection",
    "_confirmUpload",
    "_ensureDependencies",
    "_installDependencies",
    "onCancel",
    "_guarded",
    "_startJob",
    "_stopJob",
    "_pollJob",
    "_showUserError",
    "_setStatus",
    "userSetting",
    "setUserSetting",
    "cleanup",
    "onTestConnection",
    "resourceDir",
    "_defaultKeyDir",
    "_restoreKeyDirectory",
    "_startKeyGeneration",
}
MODULES = ("MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy")
#: The only things a panel keeps in QSettings: per-user, not per-scene.
USER_SETTINGS = {"ServerUrl", "CaBundle", "ConsentedServers", "KeyDirectory"}
MAX_MODULE_FILE_LINES = 120


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _class(tree: ast.AST, name: str) -> ast.ClassDef:
    found = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == name]
    assert len(found) == 1, name
    return found[0]


def _methods(cls: ast.ClassDef) -> set[str]:
    return {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}


def _lib(name: str) -> Path:
    return slicer_support.REPO_ROOT / name / f"{name}Lib"


def test_shared_panel_defines_what_the_panels_leave_out():
    panel = _class(_tree(COMMON_DIR / "widgets.py"), "ServerJobPanel")
    assert SHARED_METHODS <= _methods(panel), sorted(SHARED_METHODS - _methods(panel))


def test_package_file_imports_nothing():
    tree = ast.parse((COMMON_DIR / "__init__.py").read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("name", MODULES)
def test_module_file_only_declares_the_module(name):
    path = slicer_support.REPO_ROOT / name / f"{name}.py"
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_FILE_LINES, f"{path.name} has {lines} lines"
    tree = _tree(path)
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert set(classes) == {name, f"{name}Widget", f"{name}Test"}
    widget = classes[f"{name}Widget"]
    assert _methods(widget) <= {"__init__", "setup", "cleanup", "onReload"}, sorted(_methods(widget))
    setup = ast.unparse(next(node for node in widget.body if getattr(node, "name", "") == "setup"))
    assert f"{name}Panel(self.logic)" in setup, "the module widget must hand its logic (None: the real one) in"
    reload = ast.unparse(next(node for node in widget.body if getattr(node, "name", "") == "onReload"))
    assert f"reload_packages('{name}Lib')" in reload and "ScriptedLoadableModuleWidget.onReload(self)" in reload


@pytest.mark.parametrize("name", MODULES)
def test_panel_lives_in_the_lib_on_the_shared_base_with_an_injected_logic(name):
    source = (_lib(name) / "widget.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    assert "from MedPrivacySlicerCommon.widgets import ServerJobPanel" in source
    assert "_HAVE_APP" not in source
    panel = _class(tree, f"{name}Panel")
    assert [ast.unparse(base) for base in panel.bases] == ["ServerJobPanel"]
    redefined = _methods(panel) & SHARED_METHODS - {"initializeParameterNode"}  # Mixup extends it (level -> count)
    assert not redefined, sorted(redefined)
    init = next(node for node in panel.body if getattr(node, "name", "") == "__init__")
    assert [argument.arg for argument in init.args.args][:2] == ["self", "logic"]
    assert ast.unparse(init.args.args[1].annotation) == f"{name}LogicProtocol | None"
    assert "qt.QSettings" not in source, "per-user settings go through userSetting; panel state is the parameter node"


#: Controls the shared panel (ServerJobPanel) reaches on every module's UI; the key folder is only for modules
#: that have one, so each module's own panel names it.
SHARED_CONTROLS = {
    "statusLabel",
    "progressBar",
    "cancelButton",
    "serverUrlLineEdit",
    "tokenLineEdit",
    "caBundlePathLineEdit",
    "testConnectionButton",
}


@pytest.mark.parametrize("name", MODULES)
def test_every_lib_file_and_resource_is_packaged(name):
    # A Lib file missing from MODULE_PYTHON_SCRIPTS still works from a source checkout, and only fails once built.
    module_dir = slicer_support.REPO_ROOT / name
    cmake = (module_dir / "CMakeLists.txt").read_text(encoding="utf-8")
    lib_files = sorted(path.name for path in _lib(name).glob("*.py"))
    assert lib_files and all(f"${{MODULE_NAME}}Lib/{lib_file}" in cmake for lib_file in lib_files), lib_files
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in cmake
    assert (module_dir / "Resources" / "Icons" / f"{name}.png").is_file()
    assert (module_dir / "Resources" / "UI" / f"{name}.ui").is_file()
    top_level = (slicer_support.REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f"add_subdirectory({name})" in top_level


@pytest.mark.parametrize("name", MODULES)
def test_ui_file_names_every_widget_the_module_uses(name):
    # The panel reaches its controls as self.ui.<objectName>; a renamed control only fails inside Slicer.
    ui = slicer_support.REPO_ROOT / name / "Resources" / "UI" / f"{name}.ui"
    names = {element.get("name") for element in ElementTree.parse(ui).iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", (_lib(name) / "widget.py").read_text(encoding="utf-8")))
    assert used, "the panel reaches no control: the pattern no longer matches the panel's source"
    missing = (used | SHARED_CONTROLS) - names
    assert not missing, sorted(missing)


def _parameter_fields(tree: ast.Module) -> tuple[str, dict[str, str]]:
    """The parameterNodeWrapper class's name and its fields' annotations."""
    wrapped = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(decorator) == "parameterNodeWrapper" for decorator in node.decorator_list)
    ]
    assert len(wrapped) == 1, "one parameterNodeWrapper class per panel"
    return wrapped[0].name, {
        node.target.id: ast.unparse(node.annotation) for node in wrapped[0].body if isinstance(node, ast.AnnAssign)
    }


@pytest.mark.parametrize("name", MODULES)
def test_parameter_node_fields_each_bind_a_real_control(name):
    tree = _tree(_lib(name) / "widget.py")
    wrapper, fields = _parameter_fields(tree)
    panel = _class(tree, f"{name}Panel")
    assigned = {
        ast.unparse(node.targets[0]): ast.unparse(node.value) for node in panel.body if isinstance(node, ast.Assign)
    }
    assert assigned["parameterNodeClass"] == wrapper
    mapping_function = next(node for node in panel.body if getattr(node, "name", "") == "parameterNodeGuiMapping")
    mapping = next(node for node in ast.walk(mapping_function) if isinstance(node, ast.Dict))
    bound = {key.value: ast.unparse(value).split(".")[-1] for key, value in zip(mapping.keys, mapping.values)}
    assert set(bound) == set(fields), (sorted(set(fields) - set(bound)), sorted(set(bound) - set(fields)))
    ui = slicer_support.REPO_ROOT / name / "Resources" / "UI" / f"{name}.ui"
    widgets = {element.get("name"): element for element in ElementTree.parse(ui).iter("widget")}
    assert set(bound.values()) <= set(widgets), sorted(set(bound.values()) - set(widgets))
    # A node parameter sets its combo box's nodeTypes from its type: they must stay what the .ui offers.
    for field, annotation in fields.items():
        node_types = set(re.findall(r"slicer\.(vtkMRML\w+)", annotation))
        if node_types:
            combo = widgets[bound[field]]
            offered = {
                string.text
                for prop in combo.findall("property")
                if prop.get("name") == "nodeTypes"
                for string in prop.iter("string")
            }
            assert node_types == offered, (field, sorted(node_types), sorted(offered))


@pytest.mark.parametrize("name", MODULES)
def test_only_per_user_things_go_to_qsettings(name):
    sources = [path.read_text(encoding="utf-8") for path in (_lib(name) / "widget.py", COMMON_DIR / "widgets.py")]
    keys = set()
    for source in sources:
        for call in (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)):
            if ast.unparse(call.func).endswith(("userSetting", "setUserSetting")):
                assert isinstance(call.args[0], ast.Constant), ast.unparse(call)  # a fixed key, to be checked here
                keys.add(call.args[0].value)
    assert keys and keys <= USER_SETTINGS, sorted(keys - USER_SETTINGS)


def _members(cls: ast.ClassDef) -> set[str]:
    """Methods, class attributes and attributes ``__init__`` assigns on self."""
    members = _methods(cls) | {node.target.id for node in cls.body if isinstance(node, ast.AnnAssign)}
    for node in ast.walk(cls):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(element, ast.Attribute) and ast.unparse(element.value) == "self":
                        members.add(element.attr)
    return members


@pytest.mark.parametrize("name", MODULES)
def test_logic_protocol_covers_what_the_panel_calls_and_real_and_fake_logic_provide_it(name):
    protocol = _class(_tree(_lib(name) / "protocols.py"), f"{name}LogicProtocol")
    declared = _members(protocol)
    assert [ast.unparse(base) for base in protocol.bases] == ["Protocol"]
    widget = (_lib(name) / "widget.py").read_text(encoding="utf-8")
    used = {
        node.attr
        for node in ast.walk(ast.parse(widget))
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in ("self.logic", "logic")
    }
    assert used and used <= declared, f"the panel calls logic members its Protocol lacks: {sorted(used - declared)}"
    real = _members(_class(_tree(_lib(name) / "logic.py"), f"{name}Logic"))
    assert declared <= real, f"{name}Logic lacks {sorted(declared - real)}"
    fake = _members(_class(_tree(_lib(name) / "testing.py"), f"Fake{name}Logic"))
    assert declared <= fake, f"Fake{name}Logic lacks {sorted(declared - fake)}"


@pytest.mark.parametrize("name", MODULES)
def test_in_app_test_runs_the_panel_on_the_fake_logic(name):
    test = _class(_tree(slicer_support.REPO_ROOT / name / f"{name}.py"), f"{name}Test")
    run = next(node for node in test.body if getattr(node, "name", "") == "runTest")
    assert "self.test_panel_on_fake_logic" in ast.unparse(run)
    mixin = _class(_tree(_lib(name) / "testing.py"), f"{name}TestMixin")
    check = next(node for node in mixin.body if getattr(node, "name", "") == "check_panel_on_fake_logic")
    body = ast.unparse(check)
    assert f"Fake{name}Logic(scene)" in body and f"self.panel_on_fake_logic({name}Panel, logic)" in body


def test_libs_make_the_shared_package_importable_without_its_qt_part():
    # The modules' own no-Qt load tests (test_slicer_logic.py, test_slicer_watermark.py) cover the Libs importing it.
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")
    slicer_support.load_module()
    import MedPrivacySlicerCommon

    assert Path(MedPrivacySlicerCommon.__file__).resolve().parent == COMMON_DIR
    assert "MedPrivacySlicerCommon.widgets" not in sys.modules


RELOAD_PROBE = """
import sys
sys.path[:0] = [{root!r}, {module_dir!r}]
import MixupPrivacyLib, MedPrivacySlicerCommon.dependencies
from MedPrivacySlicerCommon.reloading import reload_packages
before = MixupPrivacyLib.logic.MixupPrivacyLogic
reloaded = reload_packages("MixupPrivacyLib")
assert "MixupPrivacyLib.logic" in reloaded and "MedPrivacySlicerCommon.dependencies" in reloaded, reloaded
assert reloaded.index("MedPrivacySlicerCommon.dependencies") < reloaded.index("MixupPrivacyLib.dependencies")
assert MixupPrivacyLib.MixupPrivacyLogic is MixupPrivacyLib.logic.MixupPrivacyLogic is not before
assert "MixupPrivacyLib.widget" not in sys.modules and "qt" not in sys.modules, "reloading imported the Qt part"
"""


def test_reload_picks_up_an_edited_file_and_imports_nothing_new(tmp_path, monkeypatch):
    from MedPrivacySlicerCommon.reloading import reload_package

    package = tmp_path / "probe_lib"
    package.mkdir()
    (package / "__init__.py").write_text("from .logic import VALUE\n")
    (package / "logic.py").write_text("VALUE = 1\n")
    (package / "widget.py").write_text("raise ImportError('the Qt part must not be imported by a reload')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import probe_lib

    try:
        assert probe_lib.VALUE == 1
        (package / "logic.py").write_text("VALUE = 2  # edited\n")
        assert reload_package("probe_lib", ("logic", "widget")) == ["probe_lib.logic", "probe_lib"]
        assert probe_lib.VALUE == 2 and sys.modules["probe_lib.logic"].VALUE == 2
        assert "probe_lib.widget" not in sys.modules
    finally:
        for module in [name for name in sys.modules if name.split(".")[0] == "probe_lib"]:
            del sys.modules[module]


def test_a_module_reload_reloads_the_shared_package_then_the_lib():
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")
    # In a fresh interpreter: reloading replaces classes, which would confuse the other tests of this process.
    code = RELOAD_PROBE.format(root=str(slicer_support.REPO_ROOT), module_dir=str(slicer_support.MODULE_DIR))
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        env=dict(os.environ),
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
