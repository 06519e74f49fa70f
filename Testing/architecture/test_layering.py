"""The core package's layers, checked by reading every import of ``medprivacy/`` (``ast``, nothing is imported).

Layers, and what each may import besides itself (ARCHITECTURE.md draws the same picture):

    applications     CLI commands, the demo                           everything below
    server           FastAPI endpoints around the models              core, data, networks, transport, foundation
    core             algorithms: ``mixup``, ``watermark``, ``obfuscation``  data, networks, foundation
    transport        wire format, HTTP contract, clients              foundation
    data, networks   synthetic subjects, templates; nets, weights     foundation
    foundation       errors, files, labels, quantisation, ...         nothing of ours

The core never imports the transport (a client is passed in), so the algorithms run the same in process, behind
the server and in the Slicer logic; the transport knows the wire and the HTTP contract only. The two features,
``mixup`` and ``watermark``, do not import each other. Lazy imports inside functions count like the others: they
hide a dependency, they do not remove it. No module imports another's private (underscored) names, and no import
loop exists among the package's modules. No module imports Slicer, Qt or VTK.
No file of the package is longer than ``MAX_LINES`` (issue 13): a longer one mixes concerns.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = "medprivacy"
#: The longest a file of the core package may be (issue 13): past it, a file holds more than one concern.
MAX_LINES = 500

#: Module (or package prefix) -> layer; the longest matching prefix wins.
LAYER_OF = {
    "medprivacy": "foundation",  # the package's __init__: version numbers only
    "medprivacy.errors": "foundation",
    "medprivacy.files": "foundation",
    "medprivacy.labels": "foundation",
    "medprivacy.quantization": "foundation",
    "medprivacy.cancellation": "foundation",
    "medprivacy.consent": "foundation",
    "medprivacy.jobs": "foundation",
    "medprivacy.imageio": "foundation",
    "medprivacy.data": "data",
    "medprivacy.nets": "networks",
    "medprivacy.transport": "transport",
    "medprivacy.mixup": "core",
    "medprivacy.watermark": "core",
    "medprivacy.obfuscation": "core",
    "medprivacy.server": "server",
    "medprivacy.cli": "applications",
    "medprivacy.demo": "applications",
    "medprivacy.mixup.cli": "applications",
    "medprivacy.mixup.commands": "applications",
    "medprivacy.watermark.cli": "applications",
    "medprivacy.watermark.commands": "applications",
    "medprivacy.watermark.demo": "applications",
    "medprivacy.obfuscation.cli": "applications",
    "medprivacy.obfuscation.demo": "applications",
    "medprivacy.worker": "applications",
    # The worker's task bodies: applications that live beside their feature (they build its clients).
    "medprivacy.mixup.worker_tasks": "applications",
    "medprivacy.watermark.worker_tasks": "applications",
    "medprivacy.obfuscation.worker_tasks": "applications",
}

#: Layer -> the layers it may import (its own included).
ALLOWED = {
    "foundation": {"foundation"},
    "data": {"data", "foundation"},
    "networks": {"networks", "foundation"},
    "transport": {"transport", "foundation"},
    "core": {"core", "data", "networks", "foundation"},
    "server": {"server", "core", "data", "networks", "transport", "foundation"},
    "applications": {"applications", "server", "core", "data", "networks", "transport", "foundation"},
}

#: Feature packages that stay independent of each other (shared helpers live in the foundation).
FEATURES = ("medprivacy.mixup", "medprivacy.watermark", "medprivacy.obfuscation")
FORBIDDEN_TOP_LEVEL = {"slicer", "qt", "ctk", "vtk", "PythonQt", "SlicerCustomAppUtilities"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported medprivacy module (a package means its __init__)
    names: tuple[str, ...]  # names taken from ``target`` (empty for ``import x``)
    line: int

    def where(self) -> str:
        return f"{self.source} (line {self.line})"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    return {
        name: (path, is_package)
        for path in sorted((root / PACKAGE).rglob("*.py"))
        for name, is_package in [_module_name(path, root)]
    }


def _under_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(root: Path) -> tuple[list[Import], list[str]]:
    """Every import between modules of the package, and every import of a forbidden top-level package."""
    modules = _modules(root)
    found, forbidden = [], []
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _under_type_checking(node, parents):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in FORBIDDEN_TOP_LEVEL:
                        forbidden.append(f"{name} (line {node.lineno}) imports {alias.name}")
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        found.append(Import(name, alias.name, (), node.lineno))
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
                if target.split(".")[0] in FORBIDDEN_TOP_LEVEL:
                    forbidden.append(f"{name} (line {node.lineno}) imports {target}")
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                continue
            plain = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:  # ``from . import blending``: the submodule itself
                    found.append(Import(name, submodule, (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(name, target, tuple(plain), node.lineno))
    return found, forbidden


def layer_of(module: str) -> str:
    best = max((prefix for prefix in LAYER_OF if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYER_OF[best]


def layering_violations(root: Path) -> list[str]:
    imports, forbidden = _imports(root)
    problems = list(forbidden)
    for imp in imports:
        source, target = layer_of(imp.source), layer_of(imp.target)
        if target not in ALLOWED[source]:
            problems.append(f"{imp.where()}, in layer {source}, imports {imp.target} from layer {target}")
        for feature in FEATURES:
            other = [f for f in FEATURES if f != feature]
            if (
                imp.source.startswith(feature + ".")
                and source == "core"
                and any(imp.target == o or imp.target.startswith(o + ".") for o in other)
            ):
                problems.append(
                    f"{imp.where()} imports {imp.target}: the features {' and '.join(FEATURES)} stay independent"
                )
    return problems


def private_imports(root: Path) -> list[str]:
    imports, _ = _imports(root)
    return [
        f"{imp.where()} imports private {name} from {imp.target}"
        for imp in imports
        for name in imp.names
        if name.startswith("_") and not name.startswith("__") and imp.target != imp.source
    ]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (lazy imports included); every module of the package is a key."""
    imports, _ = _imports(root)
    graph: dict[str, set[str]] = {name: set() for name in _modules(root)}
    for imp in imports:
        if imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def import_loops(root: Path) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted; lazy imports included."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:  # recursion depth is bounded by the number of modules (about a hundred)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(loops)


# --- the checks ------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer():
    unknown = [
        name
        for name in _modules(REPO_ROOT)
        if not any(name == prefix or name.startswith(prefix + ".") for prefix in LAYER_OF if prefix != PACKAGE)
        and name != PACKAGE
    ]
    assert not unknown, f"give these modules a layer in LAYER_OF (and ARCHITECTURE.md): {unknown}"


def test_no_lower_layer_imports_an_upper_one():
    problems = layering_violations(REPO_ROOT)
    assert not problems, "layering broken:\n  " + "\n  ".join(problems)


def test_no_import_loops_among_the_package_modules():
    loops = import_loops(REPO_ROOT)
    assert not loops, "import loops:\n  " + "\n  ".join(" <-> ".join(group) for group in loops)


def test_no_module_imports_another_modules_private_names():
    problems = private_imports(REPO_ROOT)
    assert not problems, "private names used across modules (make them public or move them):\n  " + "\n  ".join(
        problems
    )


def files_over_the_line_limit(root: Path, limit: int = MAX_LINES) -> list[str]:
    return [
        f"{path.relative_to(root).as_posix()}: {count} lines"
        for path in sorted((root / PACKAGE).rglob("*.py"))
        for count in [len(path.read_text(encoding="utf-8").splitlines())]
        if count > limit
    ]


def test_no_package_file_is_over_the_line_limit():
    long_files = files_over_the_line_limit(REPO_ROOT)
    assert not long_files, f"split these along their concerns (at most {MAX_LINES} lines a file):\n  " + "\n  ".join(
        long_files
    )


def test_the_checks_see_what_they_guard_against(tmp_path):
    """Each check fails on a tiny package that breaks its rule, so a passing run means something."""
    package = tmp_path / PACKAGE
    for folder in ("mixup", "transport", "watermark", "server"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "mixup" / "pipeline.py").write_text("from ..transport.client import cancel_check\n")
    (package / "transport" / "client.py").write_text(
        "def cancel_check():\n    from ..watermark.blending import _luma8\n"
    )
    (package / "watermark" / "blending.py").write_text(
        "import slicer\n\ndef _luma8():\n    from ..mixup import pipeline\n"
    )
    (package / "server" / "app.py").write_text("def create_app():\n    from .watermark import routes\n")
    (package / "server" / "watermark.py").write_text("from .app import create_app\n")
    problems = "\n".join(layering_violations(tmp_path))
    assert "medprivacy.mixup.pipeline (line 1), in layer core, imports medprivacy.transport.client" in problems
    assert "medprivacy.transport.client (line 2), in layer transport, imports medprivacy.watermark.blending" in problems
    assert "features" in problems and "imports slicer" in problems
    assert private_imports(tmp_path) == [
        "medprivacy.transport.client (line 2) imports private _luma8 from medprivacy.watermark.blending"
    ]
    assert import_loops(tmp_path) == [
        ["medprivacy.mixup.pipeline", "medprivacy.transport.client", "medprivacy.watermark.blending"],
        ["medprivacy.server.app", "medprivacy.server.watermark"],
    ]
    (package / "mixup" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (package / "mixup" / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert files_over_the_line_limit(tmp_path) == [f"medprivacy/mixup/long.py: {MAX_LINES + 1} lines"]
