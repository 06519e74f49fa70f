"""The training data of the Mixup-Privacy networks: synthetic subjects (cached on disk) or a user's nnU-Net/MSD
dataset brought to the model grid, and the random target and reference patches drawn from them (``PatchSampler``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .intensity import normalize_intensity
from .sampling import crop, draw_reference_patches, keep_most_textured, reference_candidates


def cache_dir() -> Path:
    return Path(os.environ.get("MEDPRIVACY_CACHE", Path.home() / ".cache" / "medprivacy"))


def synthetic_subject_normalized(seed: int, deformation: float = 1.0, use_cache: bool = True):
    """(normalised image float32, labels uint8) on the model grid for one synthetic subject, cached on disk."""
    from ..data.synth import synthesize_subject
    from .model_space import analysis_mask

    path = cache_dir() / "subjects" / f"subject-{seed}-d{deformation:g}.npz"
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["image"].astype(np.float32), data["labels"]
    subject = synthesize_subject(seed, deformation=deformation)
    image = normalize_intensity(subject.image, analysis_mask())
    if use_cache:
        from ..files import write_atomically

        path.parent.mkdir(parents=True, exist_ok=True)
        # A cache: no fsync, a copy lost to a power cut is made again.
        write_atomically(
            path, lambda tmp: np.savez(tmp, image=image.astype(np.float16), labels=subject.labels), sync=False
        )
    return image, subject.labels


def load_dataset_subjects(folder: str, limit: int | None = None):
    """nnU-Net / MSD layout: dataset.json + imagesTr/ + labelsTr/; every case is brought to the model grid."""
    import SimpleITK as sitk

    from ..errors import InputError
    from .geometry import to_model_grid
    from .model_space import analysis_mask

    root = Path(folder)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(
            f"{root} has no dataset.json; expected the nnU-Net/MSD layout (dataset.json, imagesTr/, labelsTr/)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    pairs = []
    for entry in meta.get("training", []):
        pairs.append((root / entry["image"], root / entry["label"]))
    if not pairs:  # nnU-Net v2: no "training" list; cases are imagesTr/<case>_0000.ext with labelsTr/<case>.ext
        for label_path in sorted((root / "labelsTr").glob("*")):
            case = label_path.name.split(".")[0]
            images = sorted((root / "imagesTr").glob(f"{case}_0000.*"))
            if images:
                pairs.append((images[0], label_path))
    if not pairs:
        raise InputError(f"no training cases found in {root}")
    subjects = []
    for image_path, label_path in pairs[:limit]:
        image = sitk.ReadImage(str(image_path))
        labels = sitk.ReadImage(str(label_path))
        resampled, transform = to_model_grid(image)
        model_labels = to_model_grid(labels, transform=transform, interpolator=sitk.sitkNearestNeighbor)[0]
        image_arr = normalize_intensity(sitk.GetArrayFromImage(resampled), analysis_mask())
        subjects.append((image_arr, sitk.GetArrayFromImage(model_labels).astype(np.uint8)))
    return subjects


class PatchSampler:
    """Random training patches: targets anywhere in the analysis box (as at inference), references mostly brain."""

    def __init__(
        self,
        subjects,
        patch_size: int,
        rng: np.random.Generator,
        reference_oversampling: int = 1,
        sampling: str = "box",
        fill_probability: float = 0.0,
        warp_rms: float = 0.0,
    ):
        from .model_space import analysis_mask
        from .patches import brain_bounding_box

        if sampling not in ("box", "private"):
            raise ValueError(f"unknown target sampling {sampling!r}; use box or private")
        self.sampling, self.fill_probability, self.warp_rms = sampling, float(fill_probability), float(warp_rms)
        self.mask = analysis_mask()
        self.mask_values = self.mask.astype(np.float32)  # interpolated through the deformation like the scan
        self.box = box = brain_bounding_box(self.mask, margin=0)
        self.subjects = subjects
        self.patch = (patch_size,) * 3
        self.rng = rng
        box = brain_bounding_box(analysis_mask(), margin=0)
        shape = subjects[0][0].shape
        self.low = np.array([b[0] for b in box])
        self.high = np.array([min(b[1], n) - patch_size for b, n in zip(box, shape)])
        self.images = [image for image, _ in subjects]
        self.labels = [labels for _, labels in subjects]
        self.reference_candidates = reference_candidates(self.labels, self.patch)
        self.reference_oversampling = max(1, int(reference_oversampling))

    def _crop(self, subject: int, start):
        return crop(self.images[subject], start, self.patch), crop(self.labels[subject], start, self.patch)

    def targets(self, count: int):
        if self.sampling == "private":
            return self._private_targets(count)
        return self.baseline_targets(count)

    def baseline_targets(self, count: int):
        """Targets inside the analysis box, left-right flipped half the time: what the plain baseline segments."""
        images, labels = [], []
        for _ in range(count):
            start = self.rng.integers(self.low, self.high + 1)
            image, label = self._crop(int(self.rng.integers(len(self.subjects))), start)
            if self.rng.random() < 0.5:  # left-right: the only flip that keeps brains looking like brains
                image, label = image[..., ::-1], label[..., ::-1]
            images.append(image)
            labels.append(label)
        return np.stack(images).astype(np.float32), np.stack(labels)

    def references(self, count: int):
        from .mixing import ORIENTATIONS, flip_patches, orient_rows

        images, labels = draw_reference_patches(
            self.images,
            self.labels,
            self.reference_candidates,
            count * self.reference_oversampling,
            self.patch,
            self.rng,
        )
        if self.reference_oversampling > 1:
            images, labels = keep_most_textured(images, labels, count)
        if self.sampling == "private":
            codes = self.rng.integers(0, len(ORIENTATIONS), size=count)
            return orient_rows(images, codes), orient_rows(labels, codes)
        flips = self.rng.random((count, 3)) < 0.5
        return flip_patches(images, flips), flip_patches(labels, flips)

    def _private_targets(self, count: int):
        """Targets cut as privacy levels cut them (see TrainConfig.target_sampling)."""
        from scipy.ndimage import map_coordinates

        from .mixing import ORIENTATIONS, orient

        size = self.patch[0]
        fills, fill_labels = self.references(count)
        images, labels = [], []
        for n in range(count):
            while True:  # anywhere a patch still holds some of the analysis region, as a lattice at any offset can
                start = np.array([self.rng.integers(lo - size + 1, hi) for lo, hi in self.box])
                coords = np.indices(self.patch, dtype=np.float32) + start.reshape(3, 1, 1, 1).astype(np.float32)
                if self.warp_rms > 0:
                    coords += _smooth_displacement(self.patch, self.rng.uniform(0, self.warp_rms), self.rng)
                region = map_coordinates(self.mask_values, coords, order=1, mode="constant", cval=0.0) > 0.5
                if region.any():
                    break
            subject = int(self.rng.integers(len(self.subjects)))
            image = map_coordinates(self.images[subject], coords, order=1, mode="constant", cval=0.0)
            label = map_coordinates(self.labels[subject], coords, order=0, mode="constant", cval=0).astype(np.uint8)
            if self.rng.random() < self.fill_probability:  # as pipeline.make_uploads: wherever the scan has no signal
                scan = image != 0
                image, label = np.where(scan, image, fills[n]), np.where(scan, label, fill_labels[n])
            code = int(self.rng.integers(len(ORIENTATIONS)))
            images.append(orient(image, code))
            labels.append(orient(label, code))
        return np.stack(images).astype(np.float32), np.stack(labels)


def _smooth_displacement(shape, rms: float, rng: np.random.Generator) -> np.ndarray:
    """(3, *shape) displacement of ``rms`` voxels RMS, smooth on the scale of warp.CONTROL_SPACING_MM: a patch of a scan
    under the secret deformation of privacy level 'strong'. Gaussian-blurred noise rather than warp.py's B-spline:
    the same smoothness for a 48-voxel patch at a fraction of the cost (a cubic zoom took 1.2 s per batch)."""
    import torch
    from scipy.ndimage import gaussian_filter

    from .warp import CONTROL_SPACING_MM

    step = 4  # blur on a 4-voxel grid, then interpolate: the field has nothing finer than that
    noise = rng.standard_normal((3,) + tuple(n // step + 2 for n in shape))
    coarse = np.stack([gaussian_filter(c, CONTROL_SPACING_MM / 4 / step, mode="nearest") for c in noise]).astype(
        np.float32
    )
    field = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], size=tuple(shape), mode="trilinear", align_corners=True
    )[0].numpy()
    current = float(np.sqrt(np.mean(np.sum(field**2, axis=0))))
    return (field * (rms / max(current, 1e-9))).astype(np.float32)
