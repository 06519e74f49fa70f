"""uint8 codes for values in [0, 1], code k meaning k/255: how patches and probabilities travel, defined once.

The wire format (``transport.wire``) carries these codes, the segmentation networks answer in them
(``nets.inference``), and training rounds through them so it sees what the server sees. Dividing (rather than
multiplying by 1/255) maps every code back to the float nearest k/255.
"""

from __future__ import annotations

import numpy as np

#: The largest code: value 1.0.
LEVELS = 255


def to_float32(raw: np.ndarray, dtype_name: str | None = None) -> np.ndarray:
    """Map an array as it travelled to float32: uint8 codes become values in [0, 1], float16/float32 are widened.

    ``dtype_name`` is the travelling dtype when ``raw`` was already converted (default: ``raw``'s own).
    """
    out = raw.astype(np.float32)
    if (dtype_name or raw.dtype.name) == "uint8":
        out /= np.float32(LEVELS)
    return out


def to_codes(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) to uint8 codes round(v * 255)."""
    scaled = np.rint(np.clip(np.asarray(values).astype(np.float32, copy=False), 0.0, 1.0) * float(LEVELS))
    return scaled.astype(np.uint8)
