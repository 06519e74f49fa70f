"""Python packages the module needs beyond what Slicer ships; the widget installs them after the user agrees."""
from __future__ import annotations

#: Core dependencies Slicer does not ship (keep in sync with pyproject.toml). torch comes from the PyTorch
#: extension instead, and SimpleITK/requests/numpy must not be replaced because Slicer's own builds are used.
PIP_REQUIREMENTS = "monai>=1.3 safetensors>=0.4 cryptography>=41 tqdm>=4.60"
#: Import names of ``PIP_REQUIREMENTS``, to tell without importing them whether they are installed.
PIP_IMPORT_NAMES = ("monai", "safetensors", "cryptography", "tqdm")
