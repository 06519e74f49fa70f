"""Averaging placed uploads into a volume, and how close a volume is to the patient.

A server that knows where copies of one region lie averages them: each copy's reference differs, so the references
average towards their mean while the patient's part adds up (λ·x + (1 − λ)·r averages to λ̄·x + (1 − λ̄)·r̄).
"""

from __future__ import annotations

import functools

import numpy as np

from ..mixing import unorient


@functools.lru_cache(maxsize=1)
def template_guess() -> np.ndarray:
    """What a server knows without any upload: the public template, normalised as scans are."""
    from ...data.template import load_template
    from ..intensity import normalize_intensity
    from ..model_space import analysis_mask

    guess = normalize_intensity(np.array(load_template().t1), analysis_mask())
    guess.setflags(write=False)
    return guess


def average_placed(
    patches: np.ndarray, starts: np.ndarray, codes: np.ndarray, shape, weights=None
) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the turned-back patches per voxel, summed weight per voxel); parts past the volume's edge dropped."""
    total = np.zeros(shape, dtype=np.float64)
    weight = np.zeros(shape, dtype=np.float64)
    size = patches.shape[-1]
    for n, (patch, start, code) in enumerate(zip(patches, starts, codes)):
        w = 1.0 if weights is None else float(weights[n])
        if w <= 0:
            continue
        region, part = [], []
        for s, length in zip(start, shape):
            low, high = max(int(s), 0), min(int(s) + size, length)
            if high <= low:
                break
            region.append(slice(low, high))
            part.append(slice(low - int(s), high - int(s)))
        else:
            total[tuple(region)] += w * unorient(patch, int(code))[tuple(part)]
            weight[tuple(region)] += w
    mean = np.divide(total, weight, out=np.zeros(shape, dtype=np.float64), where=weight > 0)
    return mean.astype(np.float32), weight.astype(np.float32)


def with_template(estimate: np.ndarray, coverage: np.ndarray, trust: float = 1.0) -> np.ndarray:
    """The estimate where uploads were placed, its intensities matched to the template's (mean and spread over the
    covered analysis region: the server knows how a normalised scan's intensities are spread) and moved towards the
    template by ``1 − trust``; the template elsewhere."""
    from ..model_space import analysis_mask

    guess = template_guess()
    covered = (coverage > 0) & analysis_mask()
    if covered.sum() > 100:
        values, wanted = estimate[covered], guess[covered]
        estimate = (estimate - values.mean()) * (wanted.std() / max(float(values.std()), 1e-6)) + wanted.mean()
    blended = guess + trust * (np.clip(estimate, 0.0, 1.0) - guess)
    return np.where(coverage > 0, blended, guess).astype(np.float32)


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def psnr(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    error = np.mean((np.clip(estimate[mask], 0.0, 1.0) - truth[mask]) ** 2)
    return float(10 * np.log10(1.0 / max(error, 1e-12)))


def ms_ssim_3d(estimate: np.ndarray, truth: np.ndarray, box) -> float:
    """3D multi-scale SSIM (MONAI) over the analysis box, intensities clipped to [0, 1]; 7-voxel windows so that
    five scales fit the box."""
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    region = tuple(slice(a, b) for a, b in box)
    a = torch.from_numpy(np.ascontiguousarray(np.clip(estimate[region], 0.0, 1.0), dtype=np.float32))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(np.clip(truth[region], 0.0, 1.0), dtype=np.float32))[None, None]
    return float(MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=7)(a, b).item())


def image_measures(estimate: np.ndarray, truth: np.ndarray) -> dict:
    """r, PSNR and 3D MS-SSIM of ``estimate`` against ``truth`` within the analysis region (its box for MS-SSIM)."""
    from ..model_space import analysis_mask
    from ..patches import brain_bounding_box

    mask = analysis_mask()
    return {
        "r": round(pearson(estimate, truth, mask), 4),
        "psnr_db": round(psnr(estimate, truth, mask), 2),
        "ms_ssim": round(ms_ssim_3d(estimate, truth, brain_bounding_box(mask, margin=0)), 4),
    }
