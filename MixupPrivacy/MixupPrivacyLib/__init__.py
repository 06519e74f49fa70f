"""MixupPrivacy's logic and test bodies (and the core's worker helper, re-exported): everything of the module that
runs without Qt.

Only ``slicer`` (MRML) and ``vtk`` are needed, so this package imports and runs under PyPI's ``slicer-core`` as well
as in the application. Heavy parts of the core package (torch, MONAI, the HTTP client) are imported inside
functions, so that Slicer can list and open the module before those dependencies are installed.
"""

from __future__ import annotations

import os
import sys

# In a source checkout added to Slicer's module paths, the core package (and MedPrivacySlicerCommon, the widgets'
# shared code) sits two folders above this one; built and installed extensions copy both next to the scripted
# modules (already on sys.path), where this is never needed.
try:
    import medprivacy  # noqa: F401
    import MedPrivacySlicerCommon  # noqa: F401  (its package file imports nothing; widgets.py, the Qt part, is not)
except ImportError:
    _source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(_source_root, "medprivacy", "__init__.py")):
        sys.path.insert(0, _source_root)

from medprivacy.jobs import BackgroundJob  # noqa: E402  (shared with MedLockerWatermark; qt-free, so in the core)

from .dependencies import NEEDS_TORCH, PACKAGES  # noqa: E402
from .logic import DEFAULT_SERVER_URL, PRIVACY_LEVELS, UNMIX_MODES, MixupPrivacyLogic, normalized_server_url  # noqa: E402
from .testing import MixupPrivacyTestMixin  # noqa: E402

__all__ = [
    "BackgroundJob",
    "DEFAULT_SERVER_URL",
    "MixupPrivacyLogic",
    "MixupPrivacyTestMixin",
    "NEEDS_TORCH",
    "PACKAGES",
    "PRIVACY_LEVELS",
    "UNMIX_MODES",
    "normalized_server_url",
]
