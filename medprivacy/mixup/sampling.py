"""Random patch sampling shared by training and the reference bank, so both see the same distribution."""

from __future__ import annotations

import numpy as np

#: A reference patch must be almost all brain: where the reference is empty the upload is just λ·x, i.e. the
#: patient's own image, scaled. 0.85 leaves room for sulci and ventricles.
MIN_REFERENCE_BRAIN_FRACTION = 0.85


def reference_starts(labels: np.ndarray, patch_size, min_fraction: float = MIN_REFERENCE_BRAIN_FRACTION) -> np.ndarray:
    """All patch start positions whose patch is at least ``min_fraction`` brain (labels > 0)."""
    from scipy.ndimage import uniform_filter

    fraction = uniform_filter((labels > 0).astype(np.float32), size=patch_size, mode="constant")
    half = np.array(patch_size) // 2
    limits = np.array(labels.shape) - np.array(patch_size)
    centers = np.argwhere(fraction >= min_fraction)
    starts = centers - half
    keep = np.all((starts >= 0) & (starts <= limits), axis=1)
    return starts[keep]


def crop(volume: np.ndarray, start, patch_size) -> np.ndarray:
    return volume[tuple(slice(int(s), int(s) + int(p)) for s, p in zip(start, patch_size))]


#: Keygen draws this many candidates per kept reference and keeps the most textured (highest standard deviation).
#: A flat reference (deep white matter) leaves the upload ≈ λ·x + constant, i.e. the patient's patch at lower
#: contrast; keeping the top quarter cut the median upload↔target correlation from 0.86 to 0.73 and the share
#: above 0.95 from 20 % to 0 (bench/mixup_bench.py). The kept patches are a subset of what training mixes with.
TEXTURE_OVERSAMPLING = 4


def reference_candidates(labels, patch_size) -> list:
    """Per subject, the start positions of mostly-brain patches (computed once, drawn from many times)."""
    candidates = [reference_starts(lab, patch_size) for lab in labels]
    if any(len(c) == 0 for c in candidates):
        raise ValueError("a reference subject has no location where a patch is mostly brain")
    return candidates


def draw_reference_patches(images, labels, candidates, count: int, patch_size, rng: np.random.Generator):
    """``count`` (image, label) patch pairs: a random subject, then a random one of its candidate positions."""
    out_images = np.empty((count,) + tuple(patch_size), dtype=np.float32)
    out_labels = np.empty((count,) + tuple(patch_size), dtype=np.uint8)
    for i in range(count):
        subject = int(rng.integers(len(images)))
        start = candidates[subject][rng.integers(len(candidates[subject]))]
        out_images[i] = crop(images[subject], start, patch_size)
        out_labels[i] = crop(labels[subject], start, patch_size)
    return out_images, out_labels


def keep_most_textured(images: np.ndarray, labels: np.ndarray, count: int):
    """The ``count`` patches with the highest intensity standard deviation, with their labels."""
    keep = np.argsort(images.reshape(len(images), -1).std(axis=1))[-count:]
    return images[keep], labels[keep]


def sample_reference_patches(images, labels, count: int, patch_size, rng: np.random.Generator, oversampling: int = 1):
    """``count`` (image, label) patch pairs from random subjects at random mostly-brain locations.

    With ``oversampling`` > 1, draws that many times more and keeps the ``count`` most textured patches.
    """
    if oversampling > 1:
        return keep_most_textured(
            *sample_reference_patches(images, labels, count * oversampling, patch_size, rng), count
        )
    return draw_reference_patches(images, labels, reference_candidates(labels, patch_size), count, patch_size, rng)
