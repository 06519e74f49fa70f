"""The model grid: the MNI152 template grid (1 mm isotropic, template orientation) and its analysis region."""
from __future__ import annotations

import functools

import numpy as np

from ..data.template import load_template
from .patches import PatchGrid, brain_bounding_box

#: Voxels of dilation around the template brain: affine registration leaves a few mm of misfit at the cortex.
MASK_DILATION_VOXELS = 4


@functools.lru_cache(maxsize=1)
def analysis_mask() -> np.ndarray:
    """Where segmentation happens on the model grid; everything outside is background (skull, neck, air)."""
    from scipy.ndimage import binary_dilation

    mask = binary_dilation(load_template().brain_mask, iterations=MASK_DILATION_VOXELS)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=4)
def patch_grid(patch_size: tuple[int, int, int]) -> PatchGrid:
    mask = analysis_mask()
    return PatchGrid.over_box(mask.shape, brain_bounding_box(mask, margin=0), tuple(patch_size))
