"""Python packages MedLockerWatermark needs beyond what Slicer ships; ``MedPrivacySlicerCommon.dependencies``
installs them after the user agrees (keep in sync with pyproject.toml).

The MedLocker client needs no torch: the models run on the server."""

from __future__ import annotations

from MedPrivacySlicerCommon.dependencies import Package

PACKAGES = (Package("cryptography", ">=41"),)
NEEDS_TORCH = False
