"""Python packages MixupPrivacy needs beyond what Slicer ships; ``MedPrivacySlicerCommon.dependencies`` installs
them after the user agrees (keep in sync with pyproject.toml). torch comes from the PyTorch extension."""

from __future__ import annotations

from MedPrivacySlicerCommon.dependencies import MONAI, Package

PACKAGES = (
    MONAI,
    Package("safetensors", ">=0.4"),
    Package("tqdm", ">=4.60"),
)
NEEDS_TORCH = True
