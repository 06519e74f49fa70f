"""Synthetic lesions drawn into the anatomy: tumour-like MRI blobs and diabetic-retinopathy-like fundus spots.

Each returns the image with the lesion, the lesion's pixel mask (opacity at least 0.5, inside the anatomy) and
what was drawn.
"""

from __future__ import annotations

import numpy as np

#: Opacity below this is cut to zero, so a lesion changes no pixel further than ~3 edge widths from its outline.
ALPHA_CUTOFF = 0.05
MRI_LESION_TYPES = ("hyperintense", "hypointense", "ring-enhancing")
FUNDUS_LESION_TYPES = ("exudates", "haemorrhages", "cotton-wool")


def _blob(shape, centre, radius: float, softness: float, rng, core: float = 0.0):
    """Opacity in [0, 1] and outline (opacity >= 0.5) of an irregular, elongated blob with a soft edge; with
    ``core`` > 0 also the opacity of the same outline shrunk by that factor (a necrotic core), else None."""
    # Work in a window around the blob: the opacity is cut to zero well inside it.
    reach = radius * 1.7 + 4 * softness + 2
    r0, r1 = max(0, int(centre[0] - reach)), min(shape[0], int(np.ceil(centre[0] + reach)) + 1)
    c0, c1 = max(0, int(centre[1] - reach)), min(shape[1], int(np.ceil(centre[1] + reach)) + 1)
    inside_full = np.zeros(shape, dtype=bool)
    rows, cols = np.meshgrid(np.arange(r0, r1, dtype=np.float64), np.arange(c0, c1, dtype=np.float64), indexing="ij")
    dr, dc = rows - centre[0], cols - centre[1]
    tilt = rng.uniform(0, np.pi)
    elong = rng.uniform(0.7, 1.0)
    a = dr * np.cos(tilt) + dc * np.sin(tilt)
    b = (-dr * np.sin(tilt) + dc * np.cos(tilt)) / elong
    distance = np.hypot(a, b)
    theta = np.arctan2(b, a)
    edge = np.ones_like(theta)
    for k in range(2, 6):
        edge += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))

    def opacity(margin):
        alpha = 1.0 / (1.0 + np.exp(-np.clip(margin / softness, -50, 50)))
        alpha[alpha < ALPHA_CUTOFF] = 0.0
        full = np.zeros(shape, dtype=np.float64)
        full[r0:r1, c0:c1] = alpha
        return full

    margin = radius * edge - distance
    inside_full[r0:r1, c0:c1] = margin >= 0
    return opacity(margin), inside_full, (opacity(core * radius * edge - distance) if core > 0 else None)


def _texture(shape, rng, amount: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.normal(size=shape), rng.uniform(0.8, 2.0))
    noise /= noise.std() + 1e-8
    return 1.0 + amount * noise


def _pick_centre(allowed: np.ndarray, radius: float, rng) -> np.ndarray:
    """A random pixel of ``allowed`` at least ``radius`` from the image border (any pixel of it if none is)."""
    height, width = allowed.shape
    pad = int(np.ceil(radius)) + 1
    inner = np.zeros_like(allowed)
    inner[pad : height - pad, pad : width - pad] = allowed[pad : height - pad, pad : width - pad]
    candidates = np.argwhere(inner if inner.any() else allowed)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones_like(allowed))
    return candidates[int(rng.integers(len(candidates)))].astype(np.float64) + rng.uniform(-0.5, 0.5, size=2)


def mri_lesion(base, anatomy, parenchyma, rng):
    size = max(base.shape)
    kind = MRI_LESION_TYPES[int(rng.integers(len(MRI_LESION_TYPES)))]
    count = 1 if rng.random() < 0.7 else 2
    change = np.zeros_like(base, dtype=np.float64)
    mask = np.zeros(base.shape, dtype=bool)
    radii = []
    for _ in range(count):
        radius = rng.uniform(0.035, 0.10) * size
        centre = _pick_centre(parenchyma, radius, rng)
        softness = rng.uniform(0.5, 1.2) * max(size / 128, 0.25)
        core = rng.uniform(0.45, 0.65) if kind == "ring-enhancing" else 0.0
        alpha, inside, core_alpha = _blob(base.shape, centre, radius, softness, rng, core=core)
        texture = _texture(base.shape, rng, rng.uniform(0.1, 0.3))
        if core_alpha is not None:
            rim = np.clip(alpha - core_alpha, 0.0, 1.0)
            delta = rim * rng.uniform(0.3, 0.45) - core_alpha * rng.uniform(0.3, 0.45)
        else:
            sign = 1.0 if kind == "hyperintense" else -1.0
            delta = alpha * sign * rng.uniform(0.25, 0.45)
        delta = delta * texture * anatomy
        change = np.where(np.abs(delta) > np.abs(change), delta, change)
        mask |= inside
        radii.append(round(float(radius), 2))
    mask &= anatomy
    image = np.clip(base + change, 0.0, 1.0).astype(np.float32)
    return image, mask, {"lesion": kind, "lesions": count, "radius_px": radii}


def fundus_lesion(base, anatomy, allowed, rng):
    size = max(base.shape[:2])
    shape = base.shape[:2]
    kind = FUNDUS_LESION_TYPES[int(rng.integers(len(FUNDUS_LESION_TYPES)))]
    image = base.astype(np.float64).copy()
    mask = np.zeros(shape, dtype=bool)
    scale = max(size / 128, 0.25)
    if kind == "exudates":
        cluster = _pick_centre(allowed, 0.12 * size, rng)
        spread = rng.uniform(0.04, 0.12) * size
        spots = [
            (cluster + rng.normal(0, spread / 2, 2), rng.uniform(0.012, 0.03) * size)
            for _ in range(int(rng.integers(4, 15)))
        ]
        softness = (0.4, 0.8)
    elif kind == "haemorrhages":
        spots = [
            (_pick_centre(allowed, 0.06 * size, rng), rng.uniform(0.025, 0.06) * size)
            for _ in range(int(rng.integers(1, 5)))
        ]
        softness = (0.5, 1.0)
    else:
        spots = [
            (_pick_centre(allowed, 0.06 * size, rng), rng.uniform(0.03, 0.06) * size)
            for _ in range(int(rng.integers(1, 4)))
        ]
        softness = (0.8, 1.2)
    for centre, radius in spots:
        radius = max(radius, 1.2)
        alpha, inside, _ = _blob(shape, centre, radius, rng.uniform(*softness) * scale, rng)
        alpha = alpha * anatomy * np.clip(_texture(shape, rng, rng.uniform(0.05, 0.2)), 0.0, 1.0)
        if kind == "exudates":
            colour = np.array([1.0, 0.9, 0.5]) * rng.uniform(0.85, 1.0)
            image += (alpha * rng.uniform(0.75, 0.95))[..., None] * (colour - image)
        elif kind == "haemorrhages":
            darken = np.array([0.35, 0.75, 0.75]) * rng.uniform(0.7, 1.0)
            image *= 1.0 - alpha[..., None] * darken
        else:
            colour = np.array([0.95, 0.9, 0.82])
            image += (alpha * rng.uniform(0.55, 0.8))[..., None] * (colour - image)
        mask |= inside
    mask &= anatomy
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask, {"lesion": kind, "lesions": len(spots)}
