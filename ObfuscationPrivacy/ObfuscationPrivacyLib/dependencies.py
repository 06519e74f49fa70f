"""Python packages the module needs beyond what Slicer ships; the widget installs them after the user agrees.

The transform runs here, next to the frames (the VAE needs torch, from the PyTorch extension, and MONAI; the keyed
noise needs cryptography), and the obfuscated frames go to the server. numpy, scipy, requests, SimpleITK and
pydicom come with Slicer and must not be replaced by pip, since Slicer's own builds are used.
"""
from __future__ import annotations

#: Keep in sync with pyproject.toml.
PIP_REQUIREMENTS = "monai>=1.3 safetensors>=0.4 cryptography>=41 tqdm>=4.60"
#: Import names of ``PIP_REQUIREMENTS``, to tell without importing them whether they are installed.
PIP_IMPORT_NAMES = ("monai", "safetensors", "cryptography", "tqdm")
