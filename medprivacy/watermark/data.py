"""Seeded 2D "lesion / no lesion" images for the MedLocker classifiers and lesion segmenter.

No labelled lesion data ships offline, so the anatomy is real and the lesions are synthetic:

``mni152``      axial, coronal and sagittal slices of the MNI152 2009 T1 template (the file shipped in
                Resources/Template, read by :mod:`medprivacy.data.template`), random rotation/scale/shift, smooth elastic
                warp, bias field, gamma, Rician noise and blur. Lesions are tumour-like: hyperintense, hypointense
                or ring-enhancing (bright rim, dark necrotic core) blobs with irregular soft edges and texture,
                centred in brain parenchyma.
``retina``      scikit-image's ``data.retina()`` fundus photograph (CC0), random field-of-view crops and zooms,
                any rotation, left/right flips, colour jitter, blur and noise. Lesions are diabetic-retinopathy
                like: clusters of yellow hard exudates, dark red blot haemorrhages or pale cotton-wool spots,
                inside the field of view.
``pydicom-mr``  (optional, off by default) the head MR test slice that ships inside pydicom, same MRI pipeline.

Every image comes from one integer seed; the label is the seed's parity (odd: lesion), so any contiguous seed
range is exactly half positive. Train, validation and held-out test draw from disjoint seed ranges
(:data:`SPLIT_SEED_BASES`), and the data seed (``DataConfig.seed``) re-draws every image without moving them.
Anatomy is one template brain and one fundus photograph: the splits differ in pose, warp, contrast, crop,
noise and lesions, not in patient.

The pixel mask of a positive image is exactly where the lesion opacity is at least 0.5 (inside the drawn outline,
clipped to the anatomy); outside a few pixels around it the image equals the lesion-free rendering of the
same seed (``render_sample(..., with_clean=True)`` returns both). Negative images have an empty mask.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

SOURCES = ("mni152", "retina", "pydicom-mr")
DEFAULT_SOURCES = ("mni152", "retina")
MRI_SOURCES = ("mni152", "pydicom-mr")
SPLITS = ("train", "validation", "test")
#: Sample seeds per split: [base, base + SPLIT_CAPACITY). Disjoint ranges, so no image is in two splits.
SPLIT_SEED_BASES = {"train": 1_000, "validation": 500_000, "test": 900_000}
SPLIT_CAPACITY = 99_000
DEFAULT_SIZE = (128, 128)
#: Opacity below this is cut to zero, so a lesion changes no pixel further than ~3 edge widths from its outline.
ALPHA_CUTOFF = 0.05
MRI_LESION_TYPES = ("hyperintense", "hypointense", "ring-enhancing")
FUNDUS_LESION_TYPES = ("exudates", "haemorrhages", "cotton-wool")


@dataclass(frozen=True)
class DataConfig:
    """What images look like. ``size`` is (H, W) of the output; ``seed`` re-draws every image of every split."""

    size: tuple = DEFAULT_SIZE
    sources: tuple = DEFAULT_SOURCES
    seed: int = 0

    def __post_init__(self):
        size = tuple(int(s) for s in (self.size if isinstance(self.size, (tuple, list)) else (self.size, self.size)))
        if len(size) != 2 or min(size) < 16:
            raise InputError(f"image size {self.size!r} must be (H, W) with both at least 16 pixels")
        object.__setattr__(self, "size", size)
        sources = tuple(self.sources)
        unknown = [s for s in sources if s not in SOURCES]
        if not sources or unknown:
            raise InputError(f"unknown image source(s) {unknown or sources!r}; choose from {', '.join(SOURCES)}")
        object.__setattr__(self, "sources", sources)

    def describe(self) -> str:
        names = {
            "mni152": "MNI152 2009 T1 slices (Resources/Template; axial/coronal/sagittal, affine + elastic warp, "
            "bias field, gamma, Rician noise, blur) with tumour-like hyper-/hypointense/ring-enhancing lesions",
            "retina": "scikit-image retina() fundus photograph (random FOV crops/zooms, rotation, flips, colour "
            "jitter, blur, noise) with exudate/haemorrhage/cotton-wool-like lesions",
            "pydicom-mr": "pydicom's MR_small.dcm head slice (same MRI pipeline)",
        }
        parts = "; ".join(names[s] for s in self.sources)
        return (
            f"synthetic-lesion 2D dataset, {self.size[0]}x{self.size[1]} RGB float [0,1], data seed {self.seed}, "
            f"odd sample seeds carry lesions (exactly half per contiguous range); sources: {parts}; "
            f"seed ranges train {SPLIT_SEED_BASES['train']}+, validation {SPLIT_SEED_BASES['validation']}+, "
            f"held-out test {SPLIT_SEED_BASES['test']}+"
        )

    def to_json(self) -> dict:
        return {"size": list(self.size), "sources": list(self.sources), "seed": self.seed}


@dataclass
class Sample:
    """One rendered image: ``image`` (H, W, 3) float32 in [0, 1], ``mask`` (H, W) bool lesion pixels."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    source: str
    seed: int
    info: dict = field(default_factory=dict)
    clean: np.ndarray | None = None  # same seed without the lesion (only with ``with_clean=True``)


@dataclass
class LesionDataset:
    """A split as arrays: images (N, H, W, 3), masks (N, H, W) bool, labels (N,) int64 (1: lesion)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    sources: list
    seeds: np.ndarray
    split: str
    config: DataConfig

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, index=slice(None)) -> np.ndarray:
        """Images as float32 in [0, 1] whatever the storage dtype (uint8 storage is divided by 255)."""
        images = self.images[index]
        if images.dtype == np.uint8:
            return images.astype(np.float32) / 255.0
        return images.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- seeds and splits

def split_seeds(split: str, count: int, start: int = 0) -> np.ndarray:
    """Sample seeds of ``split``: ``base + start ... base + start + count - 1``."""
    if split not in SPLIT_SEED_BASES:
        raise InputError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    if count < 0 or start < 0 or start + count > SPLIT_CAPACITY:
        raise InputError(f"split {split!r} holds at most {SPLIT_CAPACITY} images; asked for {start}..{start + count}")
    return SPLIT_SEED_BASES[split] + start + np.arange(count, dtype=np.int64)


def label_of(seed: int) -> int:
    return int(seed) % 2


def make_split(split: str, count: int, config: DataConfig | None = None, *, start: int = 0, dtype=np.float32,
               progress: bool = False) -> LesionDataset:
    """Render ``count`` images of ``split``. ``dtype`` uint8 stores images rounded to 8 bits (a quarter the memory)."""
    config = config or DataConfig()
    seeds = split_seeds(split, count, start)
    height, width = config.size
    images = np.zeros((count, height, width, 3), dtype=dtype)
    masks = np.zeros((count, height, width), dtype=bool)
    labels = np.zeros(count, dtype=np.int64)
    sources = []
    iterator = seeds
    if progress:
        from tqdm import tqdm

        iterator = tqdm(seeds, desc=f"rendering {split} images", leave=False)
    for i, seed in enumerate(iterator):
        sample = render_sample(int(seed), config)
        images[i] = _quantize(sample.image) if np.dtype(dtype) == np.uint8 else sample.image
        masks[i] = sample.mask
        labels[i] = sample.label
        sources.append(sample.source)
    return LesionDataset(images, masks, labels, sources, seeds, split, config)


def _quantize(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------- rendering

def render_sample(seed: int, config: DataConfig | None = None, with_clean: bool = False) -> Sample:
    """Render the image of ``seed``. Independent random streams for the anatomy, the lesion and the acquisition
    (contrast, noise) keep the lesion-free rendering identical outside the lesion."""
    config = config or DataConfig()
    seed = int(seed)
    label = label_of(seed)
    pick = np.random.default_rng([config.seed, seed, 0])
    source = config.sources[int(pick.integers(len(config.sources)))]
    anatomy_rng = np.random.default_rng([config.seed, seed, 1])
    lesion_rng = np.random.default_rng([config.seed, seed, 2])
    height, width = config.size
    if source in MRI_SOURCES:
        base, anatomy, placement, info = _mri_base(source, anatomy_rng, (height, width))
        lesion = _mri_lesion if label else None
        finish = _mri_acquisition
    else:
        base, anatomy, placement, info = _fundus_base(anatomy_rng, (height, width))
        lesion = _fundus_lesion if label else None
        finish = _fundus_acquisition

    mask = np.zeros((height, width), dtype=bool)
    drawn = base
    if lesion is not None:
        drawn, mask, lesion_info = lesion(base, anatomy, placement, lesion_rng)
        info.update(lesion_info)
    image = finish(drawn, anatomy, np.random.default_rng([config.seed, seed, 3]))
    clean = finish(base, anatomy, np.random.default_rng([config.seed, seed, 3])) if with_clean else None
    return Sample(image=image, mask=mask, label=label, source=source, seed=seed, info=info, clean=clean)


def _grid(shape) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij")
    return rows, cols


def _sampling_coords(shape, centre, side: float, angle: float, flip: bool, elastic: float, rng) -> np.ndarray:
    """Source (row, col) for every output pixel: a square of ``side`` source pixels centred at ``centre``, rotated by
    ``angle``, optionally mirrored, plus a smooth random displacement of about ``elastic`` output pixels."""
    height, width = shape
    rows, cols = _grid(shape)
    if elastic > 0:
        coarse = rng.normal(0.0, elastic, size=(2, 5, 5))
        rows = rows + _upsample(coarse[0], shape)
        cols = cols + _upsample(coarse[1], shape)
    scale = side / max(height, width)
    v = (rows + 0.5 - height / 2) * scale
    u = (cols + 0.5 - width / 2) * scale
    if flip:
        u = -u
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + cos * v - sin * u, centre[1] + sin * v + cos * u])


def _sample(plane: np.ndarray, coords: np.ndarray, factor: float, order: int = 1) -> np.ndarray:
    """Resample ``plane`` at ``coords`` after anti-alias smoothing for a ``factor``-fold reduction."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    if factor > 1.05:
        plane = gaussian_filter(plane, sigma=0.5 * (factor - 1.0) + 0.3)
    return map_coordinates(plane, coords, order=order, mode="constant", cval=0.0)


@functools.lru_cache(maxsize=16)
def _cubic_matrix(knots: int, length: int) -> np.ndarray:
    """(length, knots) matrix M with M @ v == scipy.ndimage.zoom(v, length / knots, order=3, mode="nearest")."""
    from scipy.ndimage import zoom

    eye = np.eye(knots)
    return np.stack([zoom(eye[j], length / knots, order=3, mode="nearest")[:length] for j in range(knots)], axis=1)


def _upsample(coarse: np.ndarray, shape) -> np.ndarray:
    """Smooth cubic-spline upsampling of a small grid to ``shape`` (separable, so two small matrix products)."""
    return _cubic_matrix(coarse.shape[0], shape[0]) @ coarse @ _cubic_matrix(coarse.shape[1], shape[1]).T


def _smooth_field(shape, rng, amplitude: float, knots: int = 4) -> np.ndarray:
    return _upsample(rng.normal(0.0, amplitude, size=(knots, knots)), shape)


# ------------------------------------------------------------------------------------------------- MRI slices

@functools.lru_cache(maxsize=1)
def _mni_views() -> dict:
    """For each view, (slices (n, rows, cols), brain masks) in display orientation (superior/anterior up), keeping
    slices whose brain area is at least 35 % of the view's largest."""
    from ..data.template import BRAIN_THRESHOLD, load_template

    t1 = load_template().t1  # (z, y, x): z inferior->superior, y posterior->anterior, x left->right
    views = {
        "axial": t1[:, ::-1, :],  # rows: anterior at the top
        "coronal": np.transpose(t1, (1, 0, 2))[:, ::-1, :],  # rows: superior at the top
        "sagittal": np.transpose(t1, (2, 0, 1))[:, ::-1, ::-1],  # rows: superior at the top, anterior on the left
    }
    out = {}
    for name, stack in views.items():
        masks = stack > BRAIN_THRESHOLD
        area = masks.sum(axis=(1, 2))
        keep = np.nonzero(area >= 0.35 * area.max())[0]
        out[name] = (np.ascontiguousarray(stack[keep], dtype=np.float32), masks[keep])
    return out


@functools.lru_cache(maxsize=1)
def _pydicom_mr() -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import binary_fill_holes, gaussian_filter, label

    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        raise InputError("image source 'pydicom-mr' needs pydicom; run 'pip install pydicom' or drop that source") from None
    path = get_testdata_file("MR_small.dcm")
    if path is None:
        raise InputError("pydicom's MR_small.dcm test file is missing; reinstall pydicom or drop the 'pydicom-mr' source")
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    pixels /= np.percentile(pixels, 99.5)
    head = binary_fill_holes(gaussian_filter(pixels, 1.0) > 0.15)
    labels, count = label(head)
    if count > 1:
        head = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return np.clip(pixels, 0, 1.2), head


def _mri_base(source: str, rng, shape):
    """A warped MRI slice (H, W) in [0, ~0.85], its anatomy mask, and where lesions may be centred."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    if source == "mni152":
        views = _mni_views()
        view = ("axial", "coronal", "sagittal")[int(rng.integers(3))]
        stack, masks = views[view]
        index = int(rng.integers(len(stack)))
        plane, brain = stack[index], masks[index]
        info = {"view": view, "slice": index}
    else:
        plane, brain = _pydicom_mr()
        info = {"view": "axial"}
    rows, cols = np.nonzero(brain)
    centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    side = extent * rng.uniform(1.08, 1.3)
    centre = centre + rng.uniform(-0.05, 0.05, size=2) * extent
    angle = np.deg2rad(rng.uniform(-15, 15))
    flip = bool(rng.random() < 0.5)
    coords = _sampling_coords(shape, centre, side, angle, flip, elastic=0.015 * max(shape), rng=rng)
    factor = side / max(shape)
    brain_p99 = np.percentile(plane[brain], 99)
    image = _sample(plane / brain_p99, coords, factor) * rng.uniform(0.7, 0.85)
    anatomy = _sample(brain.astype(np.float32), coords, factor) > 0.5
    # Tumours sit in parenchyma: eroded brain where the (smoothed) tissue is not CSF-dark.
    parenchyma = binary_erosion(anatomy, iterations=max(1, round(0.03 * max(shape)))) & (gaussian_filter(image, 1.5) > 0.35)
    if not parenchyma.any():
        parenchyma = anatomy
    info.update({"angle_deg": round(float(np.rad2deg(angle)), 2), "flip": flip, "fov": round(float(side), 1)})
    return image.astype(np.float32), anatomy, parenchyma, info


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
    inner[pad:height - pad, pad:width - pad] = allowed[pad:height - pad, pad:width - pad]
    candidates = np.argwhere(inner if inner.any() else allowed)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones_like(allowed))
    return candidates[int(rng.integers(len(candidates)))].astype(np.float64) + rng.uniform(-0.5, 0.5, size=2)


def _mri_lesion(base, anatomy, parenchyma, rng):
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


def _mri_acquisition(image, anatomy, rng):
    """Scanner effects, applied after the lesion so that it goes through them too; returns RGB (H, W, 3)."""
    from scipy.ndimage import gaussian_filter

    out = image * np.exp(_smooth_field(image.shape, rng, 0.12))
    out = np.clip(out, 0.0, None) ** rng.uniform(0.75, 1.35)
    sigma = rng.uniform(0.005, 0.03)
    out = np.sqrt((out + rng.normal(0, sigma, out.shape)) ** 2 + rng.normal(0, sigma, out.shape) ** 2)
    if rng.random() < 0.3:
        out = gaussian_filter(out, rng.uniform(0.3, 0.7))
    gray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=2)


# ------------------------------------------------------------------------------------------------------ fundus

@functools.lru_cache(maxsize=1)
def _retina_pyramid() -> tuple[list, np.ndarray, float]:
    """The fundus photograph as float32 RGB at 1, 1/2, 1/4, ... resolution, its FOV centre and radius (level 0)."""
    from scipy.ndimage import gaussian_filter

    try:
        from skimage import data
    except ImportError:
        raise InputError("image source 'retina' needs scikit-image (its data.retina() photograph); run 'pip install scikit-image'") from None
    try:
        photo = data.retina()
    except (OSError, ValueError, RuntimeError, ImportError) as exc:  # a build without the bundled file would download it
        raise InputError(f"scikit-image could not load its bundled retina image ({exc}); reinstall scikit-image") from None
    level = photo.astype(np.float32) / 255.0
    fov = level.mean(axis=2) > 0.06
    rows, cols = np.nonzero(fov)
    centre = np.array([rows.mean(), cols.mean()])
    radius = float(np.sqrt(fov.sum() / np.pi))
    levels = [level]
    while min(levels[-1].shape[:2]) > 96:
        smoothed = gaussian_filter(levels[-1], sigma=(1.0, 1.0, 0))
        levels.append(np.ascontiguousarray(smoothed[::2, ::2]))
    return levels, centre, radius


def _fundus_base(rng, shape):
    levels, centre, radius = _retina_pyramid()
    zoom = rng.uniform(0.95, 1.1) if rng.random() < 0.5 else rng.uniform(1.3, 2.5)
    side = 2 * radius * 1.04 / zoom
    offset_r = radius * max(0.0, 1 - 1 / zoom) * 0.9 * np.sqrt(rng.random())
    offset_a = rng.uniform(0, 2 * np.pi)
    view_centre = centre + offset_r * np.array([np.sin(offset_a), np.cos(offset_a)])
    angle = rng.uniform(0, 2 * np.pi)
    flip = bool(rng.random() < 0.5)
    coords = _sampling_coords(shape, view_centre, side, angle, flip, elastic=0.008 * max(shape), rng=rng)
    factor = side / max(shape)
    level = 0
    while level + 1 < len(levels) and factor / 2 ** (level + 1) >= 1.0:
        level += 1
    scaled = coords / 2**level
    residual = factor / 2**level
    image = np.stack([_sample(levels[level][..., c], scaled, residual) for c in range(3)], axis=-1)
    distance = np.hypot(coords[0] - centre[0], coords[1] - centre[1])
    anatomy = distance < radius * 0.98
    allowed = distance < radius * 0.85
    info = {"view": "fundus", "zoom": round(float(zoom), 3), "angle_deg": round(float(np.rad2deg(angle)), 1), "flip": flip}
    return np.clip(image, 0.0, 1.0).astype(np.float32), anatomy, allowed, info


def _fundus_lesion(base, anatomy, allowed, rng):
    size = max(base.shape[:2])
    shape = base.shape[:2]
    kind = FUNDUS_LESION_TYPES[int(rng.integers(len(FUNDUS_LESION_TYPES)))]
    image = base.astype(np.float64).copy()
    mask = np.zeros(shape, dtype=bool)
    scale = max(size / 128, 0.25)
    if kind == "exudates":
        cluster = _pick_centre(allowed, 0.12 * size, rng)
        spread = rng.uniform(0.04, 0.12) * size
        spots = [(cluster + rng.normal(0, spread / 2, 2), rng.uniform(0.012, 0.03) * size) for _ in range(int(rng.integers(4, 15)))]
        softness = (0.4, 0.8)
    elif kind == "haemorrhages":
        spots = [(_pick_centre(allowed, 0.06 * size, rng), rng.uniform(0.025, 0.06) * size) for _ in range(int(rng.integers(1, 5)))]
        softness = (0.5, 1.0)
    else:
        spots = [(_pick_centre(allowed, 0.06 * size, rng), rng.uniform(0.03, 0.06) * size) for _ in range(int(rng.integers(1, 4)))]
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


def _fundus_acquisition(image, anatomy, rng):
    from scipy.ndimage import gaussian_filter

    out = image.astype(np.float64)
    gains = rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.8, 1.2)
    out = out * gains
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.8, 1.2)  # saturation
    mean = out[anatomy].mean() if anatomy.any() else out.mean()
    out = mean + (out - mean) * rng.uniform(0.8, 1.2)  # contrast
    out = np.clip(out, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    out *= np.exp(_smooth_field(image.shape[:2], rng, 0.08))[..., None]  # uneven illumination
    if rng.random() < 0.5:
        out = gaussian_filter(out, sigma=(rng.uniform(0.3, 0.6),) * 2 + (0,))
    out += rng.normal(0, rng.uniform(0.0, 0.02), out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ export

def export_examples(out_dir: str | os.PathLike, config: DataConfig | None = None, per_source: int = 2,
                    split: str = "test") -> dict:
    """Write a few held-out images as real files for CLI tests; returns (and writes as index.json) what each is.

    MRI images: 8-bit PNG, 16-bit PNG, 16-bit TIFF, DICOM (MR, 16-bit, via pydicom) and 2D NIfTI; fundus
    images: 8-bit RGB PNG and RGB TIFF. Every image also gets its lesion mask as an 8-bit PNG (255 = lesion).
    ``per_source`` images of each source are written, alternating no-lesion / lesion."""
    import SimpleITK as sitk

    config = config or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {source: per_source for source in config.sources}
    entries = []
    for seed in split_seeds(split, SPLIT_CAPACITY):
        if not any(wanted.values()):
            break
        seed = int(seed)
        source = config.sources[int(np.random.default_rng([config.seed, seed, 0]).integers(len(config.sources)))]
        # Alternate labels within each source: the k-th image written has label k % 2.
        if not wanted[source] or label_of(seed) != (per_source - wanted[source]) % 2:
            continue
        sample = render_sample(seed, config)
        wanted[source] -= 1
        stem = f"{split}-{seed}-{source}-{'lesion' if sample.label else 'normal'}"
        files = {}
        mask_path = out / f"{stem}_mask.png"
        sitk.WriteImage(sitk.GetImageFromArray(sample.mask.astype(np.uint8) * 255), str(mask_path))
        files["mask_png"] = mask_path.name
        if source in MRI_SOURCES:
            gray = sample.image[..., 0]
            gray8 = np.round(gray * 255).astype(np.uint8)
            gray16 = np.round(gray * 65535).astype(np.uint16)
            for key, name, array in (("png8", f"{stem}_gray8.png", gray8), ("png16", f"{stem}_gray16.png", gray16),
                                     ("tiff16", f"{stem}_gray16.tif", gray16)):
                sitk.WriteImage(sitk.GetImageFromArray(array), str(out / name))
                files[key] = name
            nifti = sitk.GetImageFromArray(gray.astype(np.float32))
            nifti.SetSpacing((1.0, 1.0))
            sitk.WriteImage(nifti, str(out / f"{stem}.nii.gz"))
            files["nifti"] = f"{stem}.nii.gz"
            _write_dicom(out / f"{stem}.dcm", np.round(gray * 4095).astype(np.uint16), seed, config)
            files["dicom"] = f"{stem}.dcm"
        else:
            rgb8 = _quantize(sample.image)
            for key, name in (("rgb_png", f"{stem}_rgb.png"), ("rgb_tiff", f"{stem}_rgb.tif")):
                sitk.WriteImage(sitk.GetImageFromArray(rgb8, isVector=True), str(out / name))
                files[key] = name
        entries.append({"seed": seed, "split": split, "source": source, "label": sample.label,
                        "lesion_pixels": int(sample.mask.sum()), "info": sample.info, "files": files})
    index = {"data": config.describe(), "config": config.to_json(), "images": entries}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _write_dicom(path: Path, pixels: np.ndarray, seed: int, config: DataConfig) -> None:
    """A minimal, valid MR image (explicit VR little endian, 12 bits stored), with UIDs derived from the seed."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    except ImportError:
        raise InputError("writing DICOM examples needs pydicom; run 'pip install pydicom'") from None

    def uid(kind: str) -> str:
        # The entropy string fixes the examples' UIDs; it keeps the method's old name so they stay the same.
        return generate_uid(entropy_srcs=["medprivacy-medlocker-example", kind, str(config.seed), str(seed)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "MR"
    ds.PatientName = "Synthetic^Example"
    ds.PatientID = f"SYNTH{seed}"
    ds.SeriesDescription = "MedPrivacy synthetic lesion example (not a patient)"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    try:
        ds.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2.x (Python 3.9)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)

