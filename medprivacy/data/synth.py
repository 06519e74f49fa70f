"""Synthetic T1 subjects with known tissue labels, made from the real MNI152 template.

No labelled brain MRI can be downloaded here, so every subject is the template warped by a random affine +
smooth elastic field (the anatomy varies), with a random bias field, gamma contrast and noise (the scanner
varies). Seeds fix every draw, so training, held-out evaluation and the private reference bank never overlap:
training uses seeds from TRAIN_SEED_BASE, evaluation from HELD_OUT_SEED_BASE, keygen a CSPRNG seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .template import BRAIN_THRESHOLD, load_template, tissue_labels

#: Where each use of synthetic subjects draws its seeds (base + 0, 1, 2, ...): all defined here, so no two uses
#: overlap and a new one can see which ranges are taken.
#: Training subjects:
TRAIN_SEED_BASE = 1_000
#: The privacy audit's attacker: its own synthetic patients, and the subjects of its reference bank:
ATTACKER_SUBJECT_SEED_BASE = 700_000
ATTACKER_BANK_SEED_BASE = 720_000
#: Validation subjects: training's validation patches use the first few, calibration scans start 100 further on
#: (``mixup.calibrate.CALIBRATION_SEED_OFFSET``), the attack separator's validation 200 further on:
VALIDATION_SEED_BASE = 800_000
#: Reference subjects of the calibration key (drawn the way keygen draws from a site's scans):
CALIBRATION_REFERENCE_SEED_BASE = 860_000
#: Held-out subjects of every evaluation:
HELD_OUT_SEED_BASE = 900_000
#: Re-identification subjects of the privacy audit (used nowhere else):
REID_SEED_BASE = 950_000


@dataclass
class Subject:
    """A subject on the template (model) grid: image in [0, ~1], labels 0..3, arrays in (z, y, x) order."""

    image: np.ndarray
    labels: np.ndarray
    seed: int


def synthesize_subject(seed: int, deformation: float = 1.0, scan_seed: int | None = None) -> Subject:
    """Subject ``seed``: its anatomy (affine + elastic warp of the template) and, unless ``scan_seed`` is given, its
    scan (contrast, bias field, noise, gain). ``scan_seed`` draws another scan of the same anatomy: the second visit of
    a subject, for re-identification."""
    import torch
    from monai.transforms import RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise, RandSmoothDeform

    template = load_template()
    brain = (template.t1 > BRAIN_THRESHOLD).astype(np.float32)
    stack = torch.from_numpy(np.stack([template.t1, template.gm, template.wm, brain]))
    rng = _legacy_state(seed)

    affine = RandAffine(
        prob=1.0,
        rotate_range=(0.12 * deformation,) * 3,
        scale_range=(0.08 * deformation,) * 3,
        translate_range=(4 * deformation,) * 3,
        padding_mode="zeros",
    )
    elastic = RandSmoothDeform(
        spatial_size=template.shape, rand_size=(7, 7, 7), prob=1.0, def_range=0.04 * deformation, grid_mode="bilinear"
    )
    for transform in (affine, elastic):
        transform.set_random_state(state=rng)
        stack = transform(stack)
    t1, gm, wm, brain_prob = (np.asarray(channel, dtype=np.float32) for channel in stack)
    labels = tissue_labels(brain_prob, gm, wm)

    image = torch.from_numpy(t1[None])
    if scan_seed is not None:
        rng = _legacy_state(scan_seed)
    for transform in (
        RandAdjustContrast(prob=1.0, gamma=(0.7, 1.5)),
        RandBiasField(prob=1.0, coeff_range=(0.05, 0.3), degree=3),
        RandGaussianNoise(prob=1.0, mean=0.0, std=0.03),
    ):
        transform.set_random_state(state=rng)
        image = transform(image)
    scanner_gain = rng.uniform(0.6, 1.6) * 1000.0  # arbitrary scanner units: normalisation must cope
    image_arr = np.clip(np.asarray(image[0], dtype=np.float32), 0, None) * (brain_prob > 0.05) * scanner_gain
    return Subject(image=image_arr.astype(np.float32), labels=labels, seed=seed)


def _legacy_state(seed: int) -> np.random.RandomState:
    """MONAI transforms take a RandomState, which seeds from 32 bits; keygen's 128-bit CSPRNG seeds are
    expanded through SeedSequence so the reference anatomy cannot be enumerated from a 2^32 seed space."""
    if 0 <= seed < 2**32:
        return np.random.RandomState(seed)
    return np.random.RandomState(np.random.SeedSequence(seed).generate_state(8))


def to_scanner_space(subject: Subject, seed: int, spacing=(1.0, 1.0, 1.3)):
    """Put a template-space subject into an oblique, anisotropic "scanner" grid with the head moved and rotated.

    Returns ``(image, labels)`` as SimpleITK images; the labels are the ground truth on the scanner grid, so
    Dice is computed where the user's data lives, after the full register → segment → resample-back path.
    """
    import SimpleITK as sitk

    template = load_template()
    rng = np.random.RandomState(seed)
    image = sitk.GetImageFromArray(subject.image)
    image.CopyInformation(template.image)
    labels = sitk.GetImageFromArray(subject.labels)
    labels.CopyInformation(template.image)

    center = np.array(
        template.image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in template.image.GetSize()])
    )
    head_motion = sitk.Euler3DTransform()
    head_motion.SetCenter(center.tolist())
    head_motion.SetRotation(*rng.uniform(-0.17, 0.17, size=3).tolist())
    head_motion.SetTranslation(rng.uniform(-12, 12, size=3).tolist())

    grid_rotation = sitk.Euler3DTransform()
    grid_rotation.SetRotation(*rng.uniform(-0.3, 0.3, size=3).tolist())
    direction = np.array(grid_rotation.GetMatrix()).reshape(3, 3) @ np.array(template.image.GetDirection()).reshape(
        3, 3
    )
    extent = np.array(template.image.GetSize()) * np.array(template.image.GetSpacing()) * 1.1
    size = np.ceil(extent / np.array(spacing)).astype(int)
    origin = center - direction @ ((size - 1) * np.array(spacing) / 2)

    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetDirection(direction.flatten().tolist())
    reference.SetOrigin(origin.tolist())
    moved_image = sitk.Resample(image, reference, head_motion, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_labels = sitk.Resample(labels, reference, head_motion, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return moved_image, moved_labels
