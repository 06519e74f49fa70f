"""Networks for Mixup-Privacy and a small registry that stores them as safetensors plus a JSON manifest.

The manifest (``manifest.json`` beside the weights) is the single source of truth for what a weight file is:
architecture arguments, patch size, labels, sha256, and how it was trained. Loading verifies the sha256 so a
corrupted or swapped file is refused instead of silently producing garbage segmentations.
"""

from __future__ import annotations

from .registry import (
    DEFAULT_MODELS_DIR,
    ModelSpec,
    build_network,
    file_sha256,
    load_manifest,
    load_model,
    models_dir,
    resolve_device,
    save_model,
)
from .unmix import AdaptiveInstanceNorm3d, UnmixNet

__all__ = [
    "DEFAULT_MODELS_DIR",
    "AdaptiveInstanceNorm3d",
    "ModelSpec",
    "UnmixNet",
    "build_network",
    "file_sha256",
    "load_manifest",
    "load_model",
    "models_dir",
    "resolve_device",
    "save_model",
]
