"""The MNI152 2009 template (T1 + grey/white matter probability maps) that defines the model grid.

The files ship inside the nilearn wheel; we read them with SimpleITK from nilearn's package folder rather than
importing nilearn (slow import, heavy dependencies) so the client inside Slicer stays light.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: nilearn's own definition of the whole-brain mask: T1 template above 20 % of its range.
BRAIN_THRESHOLD = 0.2


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise InputError("the MNI152 template ships with nilearn, which is not installed; run 'pip install nilearn'")
    return Path(spec.origin).parent / "datasets" / "data"


@dataclass(frozen=True)
class Template:
    """Template arrays in SimpleITK/numpy (z, y, x) order, intensities and probabilities scaled to [0, 1]."""

    image: "object"  # SimpleITK.Image of the T1, carries the model grid geometry
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
    for key, name in _FILES.items():
        path = directory / name
        if not path.is_file():
            raise InputError(f"MNI152 template file {path} is missing; reinstall nilearn (pip install --force-reinstall nilearn)")
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
