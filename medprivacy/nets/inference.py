"""Running a segmentation network on patches as they travel (uint8 codes or float16, ``medprivacy.quantization``):
the one code path behind the server's endpoints and the in-process calibration that fits decision weights during
training (so both see identical answers)."""

from __future__ import annotations

import numpy as np


def segment_patches(
    net, raw: np.ndarray, device: str = "cpu", batch: int = 32, response_dtype: str = "uint8"
) -> np.ndarray:
    """Class probabilities for (N, 1, D, H, W) patches in their wire dtype (uint8 codes or float16), returned as
    the wire carries them back: uint8 codes (round(p · 255)) or float16."""
    import torch

    from ..quantization import LEVELS, to_float32

    count = raw.shape[0]
    out = None
    with torch.inference_mode():
        for start in range(0, count, batch):
            x = torch.from_numpy(to_float32(raw[start : start + batch])).to(device)
            probs = torch.softmax(net(x).float(), dim=1)
            if probs.shape[2:] != x.shape[2:]:
                raise RuntimeError(f"the network produced {tuple(probs.shape)} for input {tuple(x.shape)}")
            if out is None:
                out = np.empty(
                    (count,) + tuple(probs.shape[1:]), dtype=np.uint8 if response_dtype == "uint8" else np.float16
                )
            if response_dtype == "uint8":
                probs = torch.round(probs * float(LEVELS)).to(torch.uint8)
            else:
                probs = probs.to(torch.float16)
            out[start : start + batch] = probs.cpu().numpy()
    return out
