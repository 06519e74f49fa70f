"""The MNI152 2009 template (T1 + grey/white matter probability maps) that defines the model grid.

The three files ship in ``Resources/Template`` (5 MB, copied unchanged from the nilearn wheel's package data; licence
in ``Resources/Template/LICENSE.txt``), so neither the client in Slicer nor the server needs nilearn at run time:
key generation and every Apply read them from there. Their checksums are pinned below because the model grid, the
synthetic subjects and the shipped weights are all defined on these exact voxels.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: file role -> (file name, sha256 of the shipped file)
_FILES = {
    "t1": (
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    ),
    "gm": (
        "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    ),
    "wm": (
        "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    ),
}
#: nilearn's own definition of the whole-brain mask: T1 template above 20 % of its range.
BRAIN_THRESHOLD = 0.2
#: Beside Resources/Models, in the source tree and in the installed extension alike; MEDPRIVACY_TEMPLATE_DIR overrides.
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Template"


def template_dir() -> Path:
    return Path(os.environ.get("MEDPRIVACY_TEMPLATE_DIR", DEFAULT_TEMPLATE_DIR))


@dataclass(frozen=True)
class Template:
    """Template arrays in SimpleITK/numpy (z, y, x) order, intensities and probabilities scaled to [0, 1]."""

    image: object  # SimpleITK.Image of the T1, carries the model grid geometry
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray

    @property
    def brain_mask(self) -> np.ndarray:
        return self.t1 > BRAIN_THRESHOLD

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    import SimpleITK as sitk

    directory = template_dir()
    arrays = {}
    image = None
    for key, (name, expected_sha256) in _FILES.items():
        path = directory / name
        if not path.is_file():
            raise InputError(
                f"MNI152 template file {path} is missing; reinstall the MedPrivacy extension "
                "(or restore Resources/Template from git)"
            )
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected_sha256:
            raise InputError(
                f"MNI152 template file {path} is not the shipped file (checksum differs); "
                "restore it from git or reinstall the extension"
            )
        img = sitk.ReadImage(str(path))
        if key == "t1":
            image = sitk.Cast(sitk.Cast(img, sitk.sitkFloat32) / 255.0, sitk.sitkFloat32)
        arrays[key] = sitk.GetArrayFromImage(img).astype(np.float32) / 255.0
    for array in arrays.values():
        array.setflags(write=False)
    return Template(image=image, **arrays)


def tissue_labels(brain_probability: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Hard labels (0 bg, 1 CSF, 2 GM, 3 WM) from probability maps; CSF = brain − GM − WM as in DESIGN.md."""
    csf = np.clip(brain_probability - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(brain_probability > 0.5, tissue, 0).astype(np.uint8)
