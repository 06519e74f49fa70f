"""Robust intensity normalisation shared by training and inference (they must match exactly)."""

from __future__ import annotations

import numpy as np

#: Upper percentile mapped to 1.0: robust to a few hot voxels (vessels, artefacts) that a max would chase.
UPPER_PERCENTILE = 99.5


def normalize_intensity(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale so the brain's 99.5th percentile is 1, clip to [0, 1] and zero everything outside ``mask``.

    MR intensities have no absolute unit but background is near zero, so a single scale (no offset) keeps CSF
    dark and separable from background. Raises ValueError for an empty or constant image.
    """
    inside = volume[mask & (volume > 0)]
    if inside.size == 0:
        raise ValueError("the image has no positive intensities inside the brain region")
    upper = float(np.percentile(inside, UPPER_PERCENTILE))
    if not np.isfinite(upper) or upper <= 0:
        raise ValueError("the image intensities are constant or not finite inside the brain region")
    return (np.clip(volume / upper, 0.0, 1.0) * mask).astype(np.float32)


def quantize_uint8(values: np.ndarray) -> np.ndarray:
    """What the wire's uint8 encoding does to values in [0, 1]; training applies it so it sees what the server sees."""
    return np.round(np.clip(values, 0.0, 1.0) * 255.0) / 255.0
