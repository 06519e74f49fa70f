"""Reloading the modules' helper packages for Slicer's "Reload" button (developer mode).

``slicer.util.reloadScriptedModule`` executes the module file again, but the packages it imports (``<Module>Lib``
and this one) stay cached in ``sys.modules``, so an edit to a widget or logic file would not show. Each module
widget's ``onReload`` calls ``reload_packages`` first, lower packages first, as SlicerNNUnet's does.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

#: This package's files, in the order they import each other (later ones import earlier ones).
COMMON_ORDER = ("dependencies", "reloading", "mrml_geometry", "worker", "widgets", "testing")
#: A module Lib's files in the same order; files a Lib does not have are skipped.
LIB_ORDER = ("dependencies", "protocols", "geometry", "worker", "logic", "testing", "widget")


def reload_package(package: str, order: Sequence[str]) -> list[str]:
    """Reload the already imported submodules of ``package`` (``order`` first, any others after), then the
    package itself. Submodules never imported stay unimported: the Qt ones must not load under slicer-core.
    Returns the reloaded names, in order."""
    if package not in sys.modules:
        return []
    prefix = package + "."
    loaded = [name[len(prefix) :] for name in list(sys.modules) if name.startswith(prefix)]
    ordered = [name for name in order if name in loaded] + sorted(name for name in loaded if name not in order)
    reloaded = []
    for name in ordered:
        importlib.reload(sys.modules[prefix + name])
        reloaded.append(prefix + name)
    importlib.reload(sys.modules[package])
    return [*reloaded, package]


def reload_packages(lib_package: str) -> list[str]:
    """Reload this shared package, then the module's Lib (which imports it)."""
    return reload_package(__package__, COMMON_ORDER) + reload_package(lib_package, LIB_ORDER)
