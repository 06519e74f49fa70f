"""Seeded 2D "lesion / no lesion" images for the MedLocker classifiers and lesion segmenter.

No labelled lesion data ships offline, so the anatomy is real and the lesions are synthetic:

``mni152``      axial, coronal and sagittal slices of the MNI152 2009 T1 template (the file shipped in
                Resources/Template, read by :mod:`medprivacy.data.template`), random rotation/scale/shift, smooth
                elastic warp, bias field, gamma, Rician noise and blur. Lesions are tumour-like: hyperintense,
                hypointense or ring-enhancing (bright rim, dark necrotic core) blobs with irregular soft edges and
                texture, centred in brain parenchyma.
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

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..quantization import to_codes
from .anatomy import fundus_acquisition, fundus_base, mri_acquisition, mri_base
from .lesions import fundus_lesion, mri_lesion

SOURCES = ("mni152", "retina", "pydicom-mr")
DEFAULT_SOURCES = ("mni152", "retina")
MRI_SOURCES = ("mni152", "pydicom-mr")
SPLITS = ("train", "validation", "test")
#: Sample seeds per split: [base, base + SPLIT_CAPACITY). Disjoint ranges, so no image is in two splits.
SPLIT_SEED_BASES = {"train": 1_000, "validation": 500_000, "test": 900_000}
SPLIT_CAPACITY = 99_000
DEFAULT_SIZE = (128, 128)


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


def make_split(
    split: str,
    count: int,
    config: DataConfig | None = None,
    *,
    start: int = 0,
    dtype=np.float32,
    progress: bool = False,
) -> LesionDataset:
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
        images[i] = to_codes(sample.image) if np.dtype(dtype) == np.uint8 else sample.image
        masks[i] = sample.mask
        labels[i] = sample.label
        sources.append(sample.source)
    return LesionDataset(images, masks, labels, sources, seeds, split, config)


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
        base, anatomy, placement, info = mri_base(source, anatomy_rng, (height, width))
        lesion = mri_lesion if label else None
        finish = mri_acquisition
    else:
        base, anatomy, placement, info = fundus_base(anatomy_rng, (height, width))
        lesion = fundus_lesion if label else None
        finish = fundus_acquisition

    mask = np.zeros((height, width), dtype=bool)
    drawn = base
    if lesion is not None:
        drawn, mask, lesion_info = lesion(base, anatomy, placement, lesion_rng)
        info.update(lesion_info)
    image = finish(drawn, anatomy, np.random.default_rng([config.seed, seed, 3]))
    clean = finish(base, anatomy, np.random.default_rng([config.seed, seed, 3])) if with_clean else None
    return Sample(image=image, mask=mask, label=label, source=source, seed=seed, info=info, clean=clean)
