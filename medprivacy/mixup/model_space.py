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


#: Where each TTA copy's patch grid starts, as a fraction of the patch size along (z, y, x): copy c uses entry
#: c mod 16. A voxel near a patch border is segmented with little context, and so it would be in every copy if all
#: copies used one grid; shifted grids put it near the centre of some copy's patch. The first eight shifts are
#: the corners of a half-patch cube, ordered so that any first few copies shift every axis; the next eight do the
#: same at a quarter patch.
_CUBE_CORNERS = ((0, 0, 0), (1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 1, 0), (1, 0, 1), (0, 0, 1), (1, 1, 0))
TTA_GRID_SHIFTS = tuple(tuple(c / 2 for c in corner) for corner in _CUBE_CORNERS) + tuple(
    tuple(0.25 + c / 2 for c in corner) for corner in _CUBE_CORNERS
)


@functools.lru_cache(maxsize=64)
def patch_grid(patch_size: tuple[int, int, int], shift: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> PatchGrid:
    """Patches tiling the analysis region, the first one ``shift`` patch sizes before the region's corner; patches
    that hold no analysis voxel are left out."""
    mask = analysis_mask()
    offset = [int(round(f * p)) for f, p in zip(shift, patch_size)]
    return PatchGrid.tiling(mask.shape, brain_bounding_box(mask, margin=0), tuple(patch_size), offset).touching(mask)


def copy_grid(patch_size: tuple[int, int, int], copy: int) -> PatchGrid:
    """The patch grid of TTA copy ``copy`` (copy 0 is the unshifted grid)."""
    return patch_grid(tuple(patch_size), TTA_GRID_SHIFTS[copy % len(TTA_GRID_SHIFTS)])


def secret_copy_grids(
    mask: np.ndarray, patch_size: tuple[int, int, int], copies: int, rng: np.random.Generator
) -> list[PatchGrid]:
    """One lattice per TTA copy at its own secret offset (distinct for every copy, uniform within a patch), covering
    ``mask`` over a padded volume: no public lattice, no patch moved back inside at the edges, so no two uploads cover
    the same voxels. Patches holding none of ``mask`` are left out."""
    cells = int(np.prod(patch_size))
    if copies > cells:
        raise ValueError(f"at most {cells} copies have distinct offsets")
    chosen = rng.choice(cells, size=copies, replace=False)
    box = brain_bounding_box(mask, margin=0)
    return [
        PatchGrid.lattice(mask.shape, box, tuple(patch_size), np.unravel_index(int(code), tuple(patch_size)), mask)
        for code in chosen
    ]
