"""The one install step for the Python packages the MedPrivacy modules need beyond what Slicer ships.

Each module's ``<Module>Lib/dependencies.py`` lists its ``Package``s; ``ensure_installed`` (called by the widgets
before any action that needs them) asks once for everything missing, installs only that, and never lets pip
replace what Slicer's own features are built against: the packages Slicer ships are pinned to their installed
versions through a pip constraints file, and MONAI, whose releases cap torch, is installed without its
dependencies (they are torch and numpy, both already there). torch itself comes from the PyTorch extension.

``slicer.util.pip_install`` is called with a list of pip arguments: Slicer 5.6 and 5.8 pass such a list after
``pip install`` unchanged, and later versions (``slicer.packaging``) do the same before adding their own options.

Everything but ``ensure_installed`` runs without the application (tested under slicer-core).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

#: Distributions Slicer ships (its SuperBuild's python requirements) or the PyTorch extension installs. pip must
#: never replace them: scripted modules and Slicer's own features are built against these exact versions.
SLICER_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "SimpleITK",
    "requests",
    "scipy",
    "pydicom",
    "Pillow",
    "packaging",
    "urllib3",
    "certifi",
    "idna",
    "charset-normalizer",
    "cryptography",
    "cffi",
    "six",
    "typing-extensions",
)
#: Top-level import names that come with Slicer or the PyTorch extension (PyTorchUtils, imported only to install
#: torch, under ImportError); a module may import them without listing them. (qt, ctk, vtk, slicer, mrml and
#: sitkUtils are the application's own.)
SLICER_IMPORTS = frozenset(
    {
        "torch",
        "numpy",
        "SimpleITK",
        "sitkUtils",
        "requests",
        "scipy",
        "pydicom",
        "PIL",
        "packaging",
        "urllib3",
        "certifi",
        "idna",
        "charset_normalizer",
        "six",
        "typing_extensions",
        "vtk",
        "qt",
        "ctk",
        "slicer",
        "mrml",
        "PythonQt",
        "PyTorchUtils",
    }
)


@dataclass(frozen=True)
class Package:
    """One distribution to install with pip: its name, version specifier and import name."""

    name: str
    specifier: str = ""
    import_name: str = ""
    #: Install without its declared dependencies (for packages whose releases pin torch or numpy).
    no_deps: bool = False
    #: The specifier depends on the installed torch (``monai_specifier``), read when the package is checked.
    follows_torch: bool = False

    @property
    def module(self) -> str:
        return self.import_name or self.name

    @property
    def version_specifier(self) -> str:
        return monai_specifier(installed_versions(("torch",)).get("torch")) if self.follows_torch else self.specifier

    @property
    def requirement(self) -> str:
        return self.name + self.version_specifier

    def is_satisfied(self) -> bool:
        """Installed (and importable) at a version the specifier allows."""
        try:
            installed = importlib.metadata.version(self.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if importlib.util.find_spec(self.module) is None:
            return False
        specifier = self.version_specifier
        if not specifier:
            return True
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(installed, prereleases=True)


def monai_specifier(torch_version: str | None) -> str:
    """The MONAI releases that run on ``torch_version``: 1.6 (what the core package is tested with) needs torch
    2.8 or later; older torch builds get 1.4 or 1.5, which support torch 1.9 and later."""
    from packaging.version import Version

    if torch_version is None or Version(torch_version).release >= (2, 8):
        return ">=1.6,<1.7"
    return ">=1.4,<1.6"


#: MONAI's releases cap torch, so it is installed with ``--no-deps``, at a release that suits the installed torch
#: (its dependencies, torch and numpy, are Slicer's).
MONAI = Package("monai", no_deps=True, follows_torch=True)


def missing_packages(packages: Iterable[Package]) -> list[Package]:
    importlib.invalidate_caches()  # a pip run in another process may have added packages since the last look
    seen, missing = set(), []
    for package in packages:
        if package.name.lower() not in seen and not package.is_satisfied():
            missing.append(package)
        seen.add(package.name.lower())
    return missing


def torch_missing() -> bool:
    return importlib.util.find_spec("torch") is None


def installed_versions(names: Iterable[str] = SLICER_DISTRIBUTIONS) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def constraints_text(versions: dict[str, str]) -> str:
    """A pip constraints file that keeps each of ``versions`` exactly as installed."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))


def pip_argument_lists(missing: Sequence[Package], constraints_path: str) -> list[list[str]]:
    """The ``pip install`` argument lists (one per pip run) that install ``missing`` and nothing of Slicer's."""
    runs = []
    plain = [package.requirement for package in missing if not package.no_deps]
    if plain:
        runs.append(["-c", constraints_path, *plain])
    no_deps = [package.requirement for package in missing if package.no_deps]
    if no_deps:
        runs.append(["--no-deps", "-c", constraints_path, *no_deps])
    return runs


# -- in the application ------------------------------------------------------------------------------------

_install_running = False


def install_running() -> bool:
    """True while ``ensure_installed`` runs pip: every MedPrivacy widget keeps its actions disabled meanwhile."""
    return _install_running


def ensure_installed(
    module_title: str, packages: Sequence[Package], needs_torch: bool, busy_changed: Callable[[], None] = lambda: None
) -> bool:
    """Install what ``packages`` (and torch, if ``needs_torch``) lack, after one confirmation.

    Returns False when the user declines. Raises ``MedPrivacyError`` (one line) when an install fails, and
    ``InputError`` when another install is still running. ``busy_changed`` is called when pip starts and ends,
    so that the caller disables and re-enables its actions.
    """
    import slicer

    from medprivacy.errors import InputError, MedPrivacyError

    global _install_running
    if _install_running:
        raise InputError("Python packages are being installed; wait for that to finish")
    wantTorch = needs_torch and torch_missing()
    missing = missing_packages(packages)
    if not wantTorch and not missing:
        return True
    names = (["torch (PyTorch extension)"] if wantTorch else []) + [package.name for package in missing]
    if not slicer.util.confirmYesNoDisplay(
        f"{module_title} needs Python packages that are not installed yet: {', '.join(names)}.\n\n"
        "Download and install them now? This can take several minutes."
    ):
        return False
    _install_running = True
    busy_changed()
    try:
        if wantTorch:
            _install_torch()
        if missing:
            _pip_install(missing)
    finally:
        _install_running = False
        busy_changed()
    importlib.invalidate_caches()
    still = [package.name for package in missing_packages(missing)]
    if still:
        raise MedPrivacyError(
            f"{', '.join(still)} still cannot be imported after installing; restart Slicer and try again"
        )
    return True


def _install_torch() -> None:
    from medprivacy.errors import MedPrivacyError

    try:
        import PyTorchUtils
    except ImportError:
        raise MedPrivacyError(
            "the PyTorch extension is missing: install 'PyTorch' from the Extensions Manager and restart Slicer"
        ) from None
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
        raise MedPrivacyError("PyTorch could not be installed; the Python console shows why")


def _pip_install(missing: Sequence[Package]) -> None:
    import subprocess

    import slicer

    from medprivacy.errors import MedPrivacyError

    # Slicer 5.12 and later (``slicer.packaging``) show their own progress dialog (and an error dialog) around
    # pip; earlier ones only block, so a wait cursor says that something runs. Either way the cursor is back
    # before our error dialog.
    ownDialog = importlib.util.find_spec("slicer.packaging") is not None
    importlib.invalidate_caches()  # the PyTorch extension may just have installed torch (MONAI follows it)
    handle, constraintsPath = tempfile.mkstemp(prefix="medprivacy-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as constraints:
            constraints.write(constraints_text(installed_versions()))
        with slicer.util.WaitCursor(show=not ownDialog):
            for arguments in pip_argument_lists(missing, constraintsPath):
                slicer.util.pip_install(arguments)
    except subprocess.CalledProcessError as error:
        raise MedPrivacyError(
            f"installing {', '.join(package.name for package in missing)} failed (pip exit status "
            f"{error.returncode}); the Python console shows pip's output"
        ) from None
    finally:
        os.unlink(constraintsPath)
