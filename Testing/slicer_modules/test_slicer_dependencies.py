"""The shared dependency install step of the Slicer modules (``MedPrivacySlicerCommon/dependencies.py``).

The first test reads, with ``ast``, every import reachable from what the Slicer actions run: the modules' Lib files
(panel, logic, worker...) and, transitively, the ``medprivacy`` modules they import, lazy imports inside functions
included. A worker task a module starts by name (a string such as ``"watermark-folder"`` in its Lib) leads to
``medprivacy/worker.py`` and to that task's own module only (``medprivacy.worker.TASK_MODULES``), as in the worker
process, which imports nothing else. A third-party package found there must be in the module's dependency list or
come with Slicer; else a fresh Slicer fails on the first click (as Apply once did for nilearn).
``importlib.util.find_spec("name")`` is a look-up, not an import, and is not counted. The rest checks the install
step's decisions on this environment's real installed packages.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest
import slicer_support

ROOT = slicer_support.REPO_ROOT
sys.path.insert(0, str(ROOT))

from medprivacy.worker import TASK_MODULES  # noqa: E402
from MedPrivacySlicerCommon import dependencies  # noqa: E402

MODULES = ("MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy")
#: Our own top-level packages (the modules' Libs find each other and the shared package beside them).
OURS = {"medprivacy", "MedPrivacySlicerCommon", *MODULES, *(f"{name}Lib" for name in MODULES)}
#: Where the walk starts besides the panel and logic: not the test bodies (the Libs import them when loaded, so
#: their module-level imports count, but what their test functions import runs only in a test).
NOT_ACTIONS = {"testing.py"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``; relative ones resolved against its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if path.name in NOT_ACTIONS else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path)
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            # "from package import submodule" imports the submodule too.
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _package_of(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] in MODULES:  # <Module>/<Module>Lib/x.py is the package <Module>Lib on Slicer's path
        parts = parts[1:]
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def _file_of(module: str) -> Path | None:
    parts = module.split(".")
    top = parts[0]
    base = ROOT / top.replace("Lib", "") / top if top.endswith("Lib") else ROOT / top
    candidate = base.joinpath(*parts[1:])
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None  # a name imported from a module, not a module


def _is_stdlib(top: str) -> bool:
    if top in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return spec is not None
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    origin = Path(spec.origin).resolve()
    return stdlib in origin.parents and "site-packages" not in origin.parts


def _dependency_list(name: str):
    """``<name>Lib/dependencies.py``, loaded on its own (the Lib package itself needs slicer)."""
    path = ROOT / name / f"{name}Lib" / "dependencies.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_dependencies", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_tasks_started(path: Path) -> set[str]:
    """The worker tasks ``path`` names (string constants equal to a task name): the tasks it can start."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in TASK_MODULES}


def reached_files(module_name: str) -> dict[Path, list[tuple[str, str]]]:
    """Every file ``module_name``'s actions load, in Slicer or in the worker processes they start, with the
    third-party imports of each as (top-level package, "file:line")."""
    lib = ROOT / module_name / f"{module_name}Lib"
    pending = [path for path in sorted(lib.glob("*.py")) if path.name not in NOT_ACTIONS]
    pending += [path for path in sorted((ROOT / "MedPrivacySlicerCommon").glob("*.py")) if path.name not in NOT_ACTIONS]
    reached: dict[Path, list[tuple[str, str]]] = {}
    while pending:
        path = pending.pop()
        if path in reached:
            continue
        reached[path] = []
        # The worker's own table names every task; a request picks one, which only a Slicer-side file decides.
        sends_requests = path != ROOT / "medprivacy" / "worker.py"
        started = [TASK_MODULES[task] for task in worker_tasks_started(path)] if sends_requests else []
        if started:  # the worker process: its protocol module, then the task's module, loaded by name
            started.append("medprivacy.worker")
        for module, line in [*_imports(path), *((name, 0) for name in started)]:
            top = module.split(".")[0]
            if top in OURS:
                target = _file_of(module)
                if target is not None:
                    pending.append(target)
                    # importing a.b.c runs a/__init__ and a/b/__init__ first
                    for depth in range(1, len(module.split("."))):
                        parent = _file_of(".".join(module.split(".")[:depth]))
                        if parent is not None:
                            pending.append(parent)
            elif top != "__future__" and not _is_stdlib(top):
                reached[path].append((top, f"{path.relative_to(ROOT)}:{line}"))
    return reached


def third_party_imports(module_name: str) -> dict[str, list[str]]:
    """Top-level third-party package -> the places ("file:line") that import it, from ``module_name``'s actions."""
    found: dict[str, list[str]] = {}
    for imports in reached_files(module_name).values():
        for top, place in imports:
            found.setdefault(top, []).append(place)
    return found


@pytest.mark.parametrize("name", MODULES)
def test_every_third_party_import_of_the_actions_is_installed_or_comes_with_slicer(name):
    lib = _dependency_list(name)
    listed = {package.module for package in lib.PACKAGES}
    if lib.NEEDS_TORCH:
        listed.add("torch")
    found = third_party_imports(name)
    assert found, "the walk found no third-party import at all: it is not reading the files"
    unlisted = {
        top: places[:3] for top, places in found.items() if top not in listed and top not in dependencies.SLICER_IMPORTS
    }
    assert not unlisted, (
        f"{name}'s actions import packages that neither {name}Lib/dependencies.py lists nor Slicer ships: {unlisted}"
    )
    if not lib.NEEDS_TORCH:
        assert "torch" not in found, found["torch"][:3]


def test_each_module_reaches_the_worker_tasks_it_starts_and_no_other():
    # MedLocker's worker runs only the watermark task; were the walk to reach every task it would list torch for
    # MedLocker, and were it to miss the worker a package only the worker imports would go unlisted.
    worker_modules = {
        name: {
            path.relative_to(ROOT).as_posix()
            for path in reached_files(name)
            if path.name == "worker_tasks.py" or path.name == "worker.py" and path.parent.name == "medprivacy"
        }
        for name in MODULES
    }
    assert worker_modules["MedLockerWatermark"] == {"medprivacy/worker.py", "medprivacy/watermark/worker_tasks.py"}
    assert worker_modules["MixupPrivacy"] == {"medprivacy/worker.py", "medprivacy/mixup/worker_tasks.py"}
    assert worker_modules["ObfuscationPrivacy"] == {"medprivacy/worker.py", "medprivacy/obfuscation/worker_tasks.py"}


def test_the_walk_sees_lazy_imports_and_skips_find_spec(tmp_path):
    # The walk must count an import inside a function (how the core defers heavy packages) and must not count a
    # package name that is only looked up.
    source = tmp_path / "probe.py"
    source.write_text(
        "import importlib.util\n\n\ndef f():\n    import einops\n\n    return importlib.util.find_spec('nilearn')\n"
    )
    names = {module for module, _line in _imports(source)}
    assert "einops" in names and "nilearn" not in names


@pytest.mark.parametrize("name", MODULES)
def test_dependency_lists_name_nothing_the_actions_do_not_import(name):
    # A stale entry makes every user download a package for nothing.
    lib = _dependency_list(name)
    found = third_party_imports(name)
    unused = sorted(package.name for package in lib.PACKAGES if package.module not in found)
    assert not unused, f"{name}Lib/dependencies.py lists packages its actions never import: {unused}"
    assert lib.NEEDS_TORCH == ("torch" in found)


# -- the install step's decisions, on this environment's installed packages ---------------------------------------


def test_installed_packages_count_as_present_only_at_an_allowed_version():
    tqdm = importlib.metadata.version("tqdm")
    assert not dependencies.missing_packages([dependencies.Package("tqdm", ">=4.60")])
    assert [p.name for p in dependencies.missing_packages([dependencies.Package("tqdm", f">{tqdm}")])] == ["tqdm"]
    absent = dependencies.Package("medprivacy-no-such-package", import_name="medprivacy_no_such_package")
    assert dependencies.missing_packages([absent]) == [absent]


def test_monai_is_pinned_to_what_the_installed_torch_runs():
    # The tested pair (this environment) satisfies the pin; an older torch gets an older MONAI line.
    assert dependencies.MONAI.is_satisfied(), (importlib.metadata.version("monai"), dependencies.MONAI.requirement)
    assert dependencies.monai_specifier("2.4.1") == ">=1.4,<1.6"
    assert dependencies.monai_specifier("2.13.0+cpu") == ">=1.6,<1.7"


def test_pip_never_gets_a_slicer_package_and_monai_comes_without_its_dependencies(tmp_path):
    constraints = tmp_path / "constraints.txt"
    versions = dependencies.installed_versions()
    assert {"torch", "numpy", "SimpleITK", "requests"} <= set(versions)
    constraints.write_text(dependencies.constraints_text(versions))
    pinned = dict(line.split("==") for line in constraints.read_text().splitlines())
    assert pinned["torch"] == importlib.metadata.version("torch")
    assert pinned["numpy"] == importlib.metadata.version("numpy")
    assert pinned["SimpleITK"] == importlib.metadata.version("SimpleITK")
    assert pinned["requests"] == importlib.metadata.version("requests")

    missing = [dependencies.MONAI, dependencies.Package("safetensors", ">=0.4")]
    runs = dependencies.pip_argument_lists(missing, str(constraints))
    assert runs == [
        ["-c", str(constraints), "safetensors>=0.4"],
        ["--no-deps", "-c", str(constraints), "monai" + dependencies.MONAI.version_specifier],
    ]
    requested = {
        argument.split(">")[0].split("=")[0].split("<")[0].lower()
        for run in runs
        for argument in run
        if not argument.startswith("-") and argument != str(constraints)
    }
    assert not requested & {name.lower() for name in dependencies.SLICER_DISTRIBUTIONS}
    assert dependencies.pip_argument_lists([], str(constraints)) == []


def test_nothing_missing_means_no_prompt_and_no_pip():
    # Everything the Mixup module needs is installed here (torch too), so the step returns before any dialog: on
    # slicer-core a dialog or pip call would fail, there being no application.
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")
    lib = _dependency_list("MixupPrivacy")
    calls = []
    assert dependencies.ensure_installed("Mixup Privacy", lib.PACKAGES, lib.NEEDS_TORCH, lambda: calls.append(1))
    assert not calls and not dependencies.install_running()


def test_a_second_install_while_one_runs_is_refused_in_one_line(monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")
    from medprivacy.errors import InputError

    monkeypatch.setattr(dependencies, "_install_running", True)
    assert dependencies.install_running()
    with pytest.raises(InputError) as raised:
        dependencies.ensure_installed("Mixup Privacy", [dependencies.Package("medprivacy-no-such-package")], False)
    assert "being installed" in str(raised.value) and "\n" not in str(raised.value)
