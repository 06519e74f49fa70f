"""Python packages ObfuscationPrivacy needs beyond what Slicer ships; ``MedPrivacySlicerCommon.dependencies``
installs them after the user agrees (keep in sync with pyproject.toml).

The transform runs here, next to the frames: the VAE needs torch (from the PyTorch extension) and MONAI, the keyed
noise needs cryptography; the obfuscated frames go to the server."""

from __future__ import annotations

from MedPrivacySlicerCommon.dependencies import MONAI, Package

PACKAGES = (
    MONAI,
    Package("safetensors", ">=0.4"),
    Package("cryptography", ">=41"),
)
NEEDS_TORCH = True
