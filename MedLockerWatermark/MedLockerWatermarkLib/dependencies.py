"""Python packages the module needs beyond what Slicer ships; the widget installs them after the user agrees.

The MedLocker client needs no torch: the models run on the server. numpy, scipy, requests, SimpleITK and pydicom
come with Slicer and must not be replaced by pip, since Slicer's own builds are used.
"""
from __future__ import annotations

#: Keep in sync with pyproject.toml.
PIP_REQUIREMENTS = "cryptography>=41"
#: Import names of ``PIP_REQUIREMENTS``, to tell without importing them whether they are installed.
PIP_IMPORT_NAMES = ("cryptography",)
