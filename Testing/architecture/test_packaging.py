"""The extension as the Slicer ExtensionsIndex and the Extensions Manager see it, checked without a Slicer SDK.

``MedPrivacy.json`` is the entry we submit to the ExtensionsIndex. Its CI (``scripts/check_description_files.py``)
validates the entry against Slicer's catalog-entry schema, checks the category, the scm url and repository name,
that the build dependencies are extensions of the index, and reads our top-level ``CMakeLists.txt`` for the project
name, the icon and the screenshot URLs. The same rules run here, offline: the schema's rules are written out below,
and a URL of ours must name a file of this repository (what raw.githubusercontent.com serves once it is pushed).

The CMake logic cannot run here, so its rules are read from ``CMakeLists.txt``: the core package is copied at build
time (``ctkMacroCompilePythonScript``, as Slicer copies module scripts) and the client never receives the server's
code or weights. The Slicer modules' reachable imports, lazy ones included, never reach ``medprivacy.server``.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from test_layering import import_graph

EXTENSION_NAME = "MedPrivacy"
DESCRIPTION_FILE = REPO_ROOT / f"{EXTENSION_NAME}.json"
SLICER_MODULES = ("MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy")
#: Folders of Slicer-side code: the modules (with their Libs) and the widget code they share.
SLICER_SIDE = (*SLICER_MODULES, "MedPrivacySlicerCommon")

# --- what the ExtensionsIndex accepts (read from Slicer/ExtensionsIndex scripts/check_description_files.py and
# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.*.json, August 2026) ---------------------------
SCHEMA_URL = re.compile(
    r"^https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
    r"slicer-extension-catalog-entry-schema-v1\.0\.[0-9]+\.json#?$"
)
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
#: Every property the schema allows (it forbids any other), with its JSON type.
SCHEMA_TYPES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
SCM_TYPES = {"git", "local"}
SCM_SCHEMES = {"git", "https"}
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
#: Categories of the index's accepted list that could describe this extension; add one from that list if needed.
INDEX_CATEGORIES = {"Segmentation", "Utilities", "Remote", "Informatics", "Analysis", "Quantification", "DICOM"}
#: Extensions of the index we may depend on (each has a description file there); add one only after checking.
INDEX_EXTENSIONS = {"PyTorch"}
REPOSITORY_SIZE_LIMIT = 100 * 1024 * 1024
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Manifest roles: what each means for the client extension.
CLIENT_ROLES, NOT_SHIPPED_ROLES = {"client"}, {"server", "attack"}


# --- a small reader of CMake commands (enough for our top-level file: commands, quoted and unquoted arguments,
# comments; no evaluation) ---------------------------------------------------------------------------------------


def cmake_commands(text: str) -> list[tuple[str, list[str]]]:
    """``[(command name in lower case, [arguments])]`` in file order; quoted arguments keep no quotes."""
    token = re.compile(r'\s+|#[^\n]*|"((?:\\.|[^"\\])*)"|\(|\)|[^\s()#"]+')
    commands, position, name, arguments, depth = [], 0, None, [], 0
    while position < len(text):
        match = token.match(text, position)
        if match is None:
            raise AssertionError(f"cannot read CMakeLists.txt at offset {position}: {text[position : position + 40]!r}")
        position, piece = match.end(), match.group(0)
        if piece.isspace() or piece.startswith("#"):
            continue
        if name is None:
            if piece in "()" or piece.startswith('"'):
                raise AssertionError(f"unexpected {piece!r} outside a command in CMakeLists.txt")
            name, arguments, depth = piece.lower(), [], 0
            continue
        if piece == "(":
            depth += 1
            if depth > 1:
                arguments.append(piece)
        elif piece == ")":
            depth -= 1
            if depth == 0:
                commands.append((name, arguments))
                name = None
            else:
                arguments.append(piece)
        else:
            arguments.append(match.group(1) if match.group(1) is not None else piece)
    assert name is None, f"unterminated {name}( in CMakeLists.txt"
    return commands


def keyword_values(arguments: list[str], keywords: set[str]) -> dict[str, list[str]]:
    """Split a command's arguments at its keywords, as cmake_parse_arguments does."""
    values: dict[str, list[str]] = {}
    current = None
    for argument in arguments:
        if argument in keywords:
            current = values.setdefault(argument, [])
        elif current is not None:
            current.append(argument)
    return values


def cmake_variables(commands) -> dict[str, list[str]]:
    """Values of plain ``set(NAME values...)`` commands (the last one wins) extended by ``list(APPEND NAME ...)``;
    nothing is expanded."""
    variables: dict = {}
    for name, arguments in commands:
        if name == "set" and arguments:
            variables[arguments[0]] = list(arguments[1:])
        elif name == "list" and len(arguments) >= 2 and arguments[0] == "APPEND":
            variables.setdefault(arguments[1], []).extend(arguments[2:])
    return variables


@pytest.fixture(scope="module")
def cmake() -> list[tuple[str, list[str]]]:
    return cmake_commands((REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def description() -> dict:
    return json.loads(DESCRIPTION_FILE.read_text(encoding="utf-8"))


def single_string(variables: dict[str, list[str]], name: str) -> str:
    assert name in variables, f"set({name} ...) is missing from CMakeLists.txt"
    assert len(variables[name]) == 1, f"{name} must be one quoted string (the index reads the first quoted value)"
    return variables[name][0]


def repository_file_of(url: str, homepage: str, revision: str) -> Path:
    """The file of this repository that a raw.githubusercontent.com URL of ours serves."""
    owner_repo = homepage.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{revision}/"
    assert url.startswith(prefix), f"{url} should start with {prefix} (the extension's repository and branch)"
    return REPO_ROOT / url[len(prefix) :]


# --- the description file ---------------------------------------------------------------------------------------


def test_description_file_follows_the_catalog_entry_schema(description):
    text = DESCRIPTION_FILE.read_bytes()
    assert b"\r" not in text, "MedPrivacy.json must use LF line endings only"
    # The index's pre-commit formats entries with prettier: two-space indent, one array item per line, final newline.
    assert text.decode("utf-8") == json.dumps(description, indent=2) + "\n", "format it as json.dumps(indent=2) writes"
    missing = SCHEMA_REQUIRED - set(description)
    unknown = set(description) - set(SCHEMA_TYPES)
    assert not missing and not unknown, f"missing keys {sorted(missing)}, keys the schema forbids {sorted(unknown)}"
    for key, value in description.items():
        assert type(value) is SCHEMA_TYPES[key], f"{key} must be of JSON type {SCHEMA_TYPES[key].__name__}"
    assert SCHEMA_URL.match(description["$schema"]), description["$schema"]
    assert all(isinstance(item, str) and item for item in description.get("build_dependencies", []))
    assert description.get("scm_type", "git") in SCM_TYPES
    assert 1 <= description.get("tier", 1) <= 5


def test_description_file_passes_the_index_name_category_and_url_checks(description):
    assert not EXTENSION_NAME.lower().startswith("slicer"), "the extension name should not start with 'Slicer'"
    assert description["category"] in INDEX_CATEGORIES
    url = description["scm_url"]
    assert "://" in url and url.split("://")[0] in SCM_SCHEMES, f"scm_url {url} must be git:// or https://"
    repository = url.strip().strip("/").split("/")[-1].removesuffix(".git")
    assert repository.startswith(REPOSITORY_PREFIXES), f"the repository name {repository!r} should start with 'Slicer'"
    unknown = set(description.get("build_dependencies", [])) - INDEX_EXTENSIONS
    assert not unknown, f"build dependencies not known to be in the ExtensionsIndex: {sorted(unknown)}"
    names = [p.name for p in REPO_ROOT.iterdir() if p.is_file()]
    assert any(name in names for name in LICENSE_NAMES), "the index requires a license file at the repository root"


def test_description_file_and_cmake_agree(description, cmake):
    variables = cmake_variables(cmake)
    project = [arguments for name, arguments in cmake if name == "project"]
    assert project and project[0][0] == EXTENSION_NAME == DESCRIPTION_FILE.stem, "project() must name the extension"
    homepage = single_string(variables, "EXTENSION_HOMEPAGE")
    assert description["scm_url"].removesuffix(".git") == homepage
    assert single_string(variables, "EXTENSION_CATEGORY") == description["category"]
    assert variables.get("EXTENSION_DEPENDS", []) == description.get("build_dependencies", [])
    assert description.get("build_subdirectory", ".") == "."  # not a superbuild


def test_icon_and_screenshots_are_files_of_this_repository(description, cmake):
    variables = cmake_variables(cmake)
    homepage, revision = single_string(variables, "EXTENSION_HOMEPAGE"), description.get("scm_revision", "main")
    icon = single_string(variables, "EXTENSION_ICONURL")
    screenshots = single_string(variables, "EXTENSION_SCREENSHOTURLS").split()
    # One screenshot per module, named after it, each made by bench/render_screenshots.py.
    assert [Path(url).stem for url in screenshots] == list(SLICER_MODULES)
    for url in [icon, *screenshots]:
        path = repository_file_of(url, homepage, revision)
        assert path.is_file(), f"{url} points at {path.relative_to(REPO_ROOT)}, which does not exist"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.relative_to(REPO_ROOT)} is not a PNG"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for url in screenshots:
        assert url.split(f"/{revision}/", 1)[1] in readme, f"README.md should show {url}"


def test_description_and_contributors_are_current(cmake):
    variables = cmake_variables(cmake)
    text = single_string(variables, "EXTENSION_DESCRIPTION")
    modules = [arguments[0] for name, arguments in cmake if name == "add_subdirectory"]
    assert modules == list(SLICER_MODULES)
    assert all(module in text for module in modules), "the description should name every module the extension ships"
    assert "later" not in text.lower()
    contributors = [entry.strip() for entry in single_string(variables, "EXTENSION_CONTRIBUTORS").split(",")]
    # Slicer's form: "Name (Organisation)" for each contributor, comma separated.
    assert all(re.fullmatch(r"[^(),]+ \([^(),]+\)", entry) for entry in contributors), contributors


def test_repository_stays_under_the_index_size_limit():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    paths = [REPO_ROOT / name for name in listed.decode().split("\0") if name]
    size = sum(path.stat().st_size for path in paths if path.is_file())
    assert size < REPOSITORY_SIZE_LIMIT, f"tracked files take {size / 2**20:.1f} MiB; the index refuses over 100 MB"


# --- what the build copies and installs -------------------------------------------------------------------------


def package_copy(cmake) -> dict[str, list[str]]:
    """The ctkMacroCompilePythonScript call that copies the core package, by keyword."""
    calls = [
        keyword_values(
            arguments,
            {
                "TARGET_NAME",
                "SCRIPTS",
                "RESOURCES",
                "SOURCE_DIR",
                "DESTINATION_DIR",
                "INSTALL_DIR",
                "NO_INSTALL_SUBDIR",
                "GLOBAL_TARGET",
            },
        )
        for name, arguments in cmake
        if name == "ctkmacrocompilepythonscript"
    ]
    assert len(calls) == 1, "CMakeLists.txt should copy the core package with one ctkMacroCompilePythonScript call"
    return calls[0]


def shipped_scripts(cmake) -> list[str]:
    """The .py files the build copies, as CMake computes them: the GLOB_RECURSE patterns, minus the FILTER EXCLUDEs."""
    call = package_copy(cmake)
    variable = re.fullmatch(r"\$\{(\w+)\}", call["SCRIPTS"][0])
    assert variable, "SCRIPTS should be the variable filled by file(GLOB_RECURSE)"
    globs = [
        arguments
        for name, arguments in cmake
        if name == "file" and arguments[:2] == ["GLOB_RECURSE", variable.group(1)]
    ]
    assert len(globs) == 1, f"{variable.group(1)} should come from one file(GLOB_RECURSE)"
    options = globs[0][2:]
    # RELATIVE to the source folder (the paths SOURCE_DIR resolves), and re-globbed on every build.
    assert options[:2] == ["RELATIVE", "${CMAKE_CURRENT_SOURCE_DIR}"] and "CONFIGURE_DEPENDS" in options
    assert call["SOURCE_DIR"] == ["${CMAKE_CURRENT_SOURCE_DIR}"]
    source = "${CMAKE_CURRENT_SOURCE_DIR}/"
    patterns = [option[len(source) :] for option in options if option.startswith(source)]
    assert patterns and all(p.endswith("/*.py") for p in patterns), patterns
    files = sorted(
        {
            path.relative_to(REPO_ROOT).as_posix()
            for pattern in patterns
            for path in (REPO_ROOT / pattern[: -len("/*.py")]).rglob("*.py")
        }
    )
    for name, arguments in cmake:
        if name == "list" and arguments[:2] == ["FILTER", variable.group(1)]:
            assert arguments[2:4] == ["EXCLUDE", "REGEX"], arguments
            files = [f for f in files if not re.search(arguments[4], f)]
    return files


def test_core_package_is_copied_at_build_time_not_configure_time(cmake):
    # file(COPY) runs once, when CMake configures: a rebuild after an edit would ship the old file.
    assert not [arguments for name, arguments in cmake if name == "file" and arguments[:1] == ["COPY"]]
    call = package_copy(cmake)
    # Beside the scripted modules in the build tree, installed from there like the modules' own scripts.
    assert call["DESTINATION_DIR"] == ["${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert call["INSTALL_DIR"] == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"] and "NO_INSTALL_SUBDIR" in call
    # No install rule of its own for the sources: everything shipped goes through the build tree.
    installs = [" ".join(arguments) for name, arguments in cmake if name == "install"]
    assert not installs, f"install() rules bypass the build-tree copy (and its exclusions): {installs}"


def test_client_gets_the_whole_core_but_no_server_code(cmake):
    shipped = shipped_scripts(cmake)
    server = "medprivacy/server/"
    assert not [f for f in shipped if f.startswith(server)], "the client must not install medprivacy/server"
    every = [
        p.relative_to(REPO_ROOT).as_posix()
        for folder in ("medprivacy", "MedPrivacySlicerCommon")
        for p in (REPO_ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert shipped == sorted(f for f in every if f.endswith(".py") and not f.startswith(server))
    # Only .py files are globbed: a data file added to the client's code would be silently left out.
    data = [f for f in every if not f.endswith(".py") and not f.startswith(server)]
    assert not data, f"add these files to the RESOURCES of the package copy in CMakeLists.txt: {data}"


def test_client_gets_only_the_client_weights(cmake):
    call = package_copy(cmake)
    variable = re.fullmatch(r"\$\{(\w+)\}", call["RESOURCES"][0])
    assert variable, "RESOURCES should be a variable set in CMakeLists.txt"
    resources = cmake_variables(cmake)[variable.group(1)]
    manifest = json.loads((REPO_ROOT / "Resources" / "Models" / "manifest.json").read_text(encoding="utf-8"))
    roles = {entry["file"]: entry.get("role") for entry in manifest["models"].values()}
    unknown = {f: r for f, r in roles.items() if r not in CLIENT_ROLES | NOT_SHIPPED_ROLES}
    assert not unknown, f"decide whether the client ships these weights (manifest roles): {unknown}"
    client = sorted(f"Resources/Models/{f}" for f, r in roles.items() if r in CLIENT_ROLES)
    weights = [path for path in resources if path.startswith("Resources/Models/")]
    assert sorted(weights) == sorted(["Resources/Models/manifest.json", *client])
    assert all((REPO_ROOT / path).is_file() for path in resources)
    # medprivacy.nets looks for the weights two folders above its registry, i.e. beside the package, in the source
    # tree as in the build tree (the RESOURCES keep their source-relative paths under DESTINATION_DIR).
    from medprivacy.nets.registry import DEFAULT_MODELS_DIR

    assert DEFAULT_MODELS_DIR == REPO_ROOT / "Resources" / "Models"


# --- what the Slicer modules can reach ----------------------------------------------------------------------------


def slicer_side_entry_points(root: Path, folders=SLICER_SIDE) -> dict[str, str]:
    """medprivacy modules the Slicer-side code imports or starts by name (``python -m medprivacy.x``), each with
    the first place that does."""
    entries: dict[str, str] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            where = path.relative_to(root).as_posix()
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names = [node.value] if re.fullmatch(r"medprivacy(\.\w+)+", node.value) else []
                for name in names:
                    if name == "medprivacy" or name.startswith("medprivacy."):
                        entries.setdefault(name, f"{where} (line {node.lineno})")
    return entries


def _modules_named_in(root: Path, module: str) -> list[str]:
    """medprivacy module names written as strings in ``module``'s file (loaded by name, e.g. ``importlib``)."""
    path = root.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"medprivacy(\.\w+)+", node.value)
    ]


def reachable_from_slicer(root: Path, folders=SLICER_SIDE) -> dict[str, str]:
    """Every medprivacy module the Slicer side can load (imports of imports, lazy ones and parent packages included),
    each with the Slicer-side file and line that leads to it."""
    graph = import_graph(root)
    reached: dict[str, str] = {}
    todo = [(name, where) for name, where in slicer_side_entry_points(root, folders).items() if name in graph]
    while todo:
        module, where = todo.pop()
        if module in reached:
            continue
        reached[module] = where
        parts = module.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts))]
        # Modules a reached module loads by name (the worker's task table, importlib) count like its imports.
        by_name = _modules_named_in(root, module)
        todo.extend(
            (other, where) for other in [*graph[module], *parents, *by_name] if other in graph and other not in reached
        )
    return reached


def test_client_gets_the_template_files_and_their_licence(cmake):
    call = package_copy(cmake)
    variable = re.fullmatch(r"\$\{(\w+)\}", call["RESOURCES"][0])
    resources = cmake_variables(cmake)[variable.group(1)]
    shipped = sorted(path for path in resources if path.startswith("Resources/Template/"))
    on_disk = sorted(f"Resources/Template/{p.name}" for p in (REPO_ROOT / "Resources" / "Template").iterdir())
    assert shipped == on_disk, "every template file and its licence must reach the client (load_template reads them)"
    from medprivacy.data.template import DEFAULT_TEMPLATE_DIR
    from medprivacy.nets.registry import DEFAULT_MODELS_DIR

    assert DEFAULT_TEMPLATE_DIR.parent == DEFAULT_MODELS_DIR.parent  # both under Resources/, beside the package


def test_slicer_modules_never_reach_the_server_code():
    reached = reachable_from_slicer(REPO_ROOT)
    # The walk sees the core (the Libs import these lazily, inside functions).
    assert "medprivacy.mixup.pipeline" in reached and "medprivacy.watermark.keyfile" in reached
    server = {
        module: where
        for module, where in reached.items()
        if module == "medprivacy.server" or module.startswith("medprivacy.server.")
    }
    assert not server, f"the client extension does not ship medprivacy/server, but the Slicer side reaches it: {server}"


def test_reachability_sees_lazy_imports_and_modules_started_by_name(tmp_path):
    package = tmp_path / "medprivacy"
    for folder in ("transport", "server", "worker"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "transport" / "client.py").write_text("def connect():\n    from ..server import app\n")
    (package / "server" / "app.py").write_text("")
    (package / "worker" / "main.py").write_text('TASKS = {"probe": "medprivacy.server.tasks"}\n')
    (package / "server" / "tasks.py").write_text("")
    module = tmp_path / "MixupPrivacy"
    module.mkdir()
    (module / "MixupPrivacy.py").write_text(
        'ARGS = ["-m", "medprivacy.worker.main"]\n\ndef apply():\n    import medprivacy.transport.client\n'
    )
    reached = reachable_from_slicer(tmp_path, folders=("MixupPrivacy",))
    assert reached["medprivacy.server.app"] == "MixupPrivacy/MixupPrivacy.py (line 4)"
    assert reached["medprivacy.worker.main"] == "MixupPrivacy/MixupPrivacy.py (line 1)"
    assert "medprivacy.server" in reached and "medprivacy.worker" in reached
    assert reached["medprivacy.server.tasks"] == "MixupPrivacy/MixupPrivacy.py (line 1)"  # loaded by name


def test_cmake_reader_sees_what_the_checks_rely_on():
    commands = cmake_commands('set(A "x (y) # z" b) # comment\nif(NOT (A AND B))\nlist(FILTER F EXCLUDE REGEX "^s/")\n')
    assert commands == [
        ("set", ["A", "x (y) # z", "b"]),
        ("if", ["NOT", "(", "A", "AND", "B", ")"]),
        ("list", ["FILTER", "F", "EXCLUDE", "REGEX", "^s/"]),
    ]
    with pytest.raises(AssertionError, match="unterminated"):
        cmake_commands("set(A b\n")
