"""Decision weights: per-class factors on the averaged class scores, fitted on validation scans after training.

Networks trained with cross-entropy + Dice give calibrated-looking probabilities, but the argmax of an average is
not the Dice-best labelling: averaging k TTA copies (or overlapping patches) spreads a thin class such as sulcal
CSF over its neighbours, and the argmax then under-segments it. One factor per class, fitted on validation
subjects (never the held-out ones) and stored beside the weights in the manifest, moves the decision boundary back.
The plain baseline gets its own factors through its own path, so comparisons between the two stay fair.

The networks run in this process through the same function the server uses (``nets.inference``), on the same
wire quantisation, and the private path is the real one (``pipeline.private_scores``).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..data.synth import CALIBRATION_REFERENCE_SEED_BASE, VALIDATION_SEED_BASE
from ..labels import NUM_CLASSES
from .bank import DEFAULT_PATCHES as CALIBRATION_REFERENCE_PATCHES  # as many as keygen keeps
from .evaluate import CLASS_NAMES
from .privacy import DEFAULT_LEVEL, privacy_settings

#: Calibration scans: validation-split synthetic subjects (data.synth.VALIDATION_SEED_BASE + 100 + i; training's
#: own validation patches come from the first few seeds of that range, evaluation uses HELD_OUT_SEED_BASE).
#: The calibration key's references come from data.synth.CALIBRATION_REFERENCE_SEED_BASE.
CALIBRATION_SEED_OFFSET = 100
CALIBRATION_REFERENCE_SUBJECTS = 4
#: Factors tried for each class (background stays 1): 0.5 … 4, geometric.
CANDIDATE_FACTORS = np.exp(np.linspace(np.log(0.5), np.log(4.0), 25))
#: Eight: with four, the white-matter factor of the private path moved a whole candidate step (0.7071 ↔ 0.6484)
#: between two fits that differed only in the number of copies.
DEFAULT_SUBJECTS = 8


class LocalSegmenter:
    """The server's two segmentation models run in this process, answering exactly as ``/v1/*/segment`` would:
    patches are quantised as the wire quantises them and probabilities come back as uint8 codes."""

    request_patches = 64
    bytes_sent = 0
    bytes_received = 0

    def __init__(self, models_dir, device: str = "cpu"):
        from ..nets import load_model

        self.device = device
        self.nets, self.specs = {}, {}
        for endpoint, name in (("mixup", "mixup-seg"), ("baseline", "plain-seg")):
            self.nets[endpoint], self.specs[name] = load_model(name, models_dir, device)

    def info(self) -> dict:
        return {
            "baseline_enabled": True,
            "models": {
                name: {
                    "patch_size": list(spec.patch_size),
                    "sha256": spec.sha256,
                    **{k: spec.extra[k] for k in ("lambda_range",) if k in spec.extra},
                }
                for name, spec in self.specs.items()
            },
        }

    def segment(self, patches: np.ndarray, endpoint: str = "mixup", cancel=None, progress=None) -> np.ndarray:
        from ..nets.inference import segment_patches
        from ..quantization import to_codes, to_float32

        # The uint8 codes the client uploads (mixtures lie in [0, 1]), answered in the codes the server returns.
        return to_float32(segment_patches(self.nets[endpoint], to_codes(patches), self.device))


def calibration_bank(patch_size, reference_subjects: int = CALIBRATION_REFERENCE_SUBJECTS, progress=None):
    """A reproducible key for calibration: seeded synthetic reference subjects, patches kept as keygen keeps them."""
    from ..data.synth import synthesize_subject
    from .bank import ReferenceBank
    from .intensity import normalize_intensity
    from .model_space import analysis_mask
    from .sampling import TEXTURE_OVERSAMPLING, sample_reference_patches

    images, labels = [], []
    for i in range(reference_subjects):
        if progress:
            progress(f"calibration key: reference subject {i + 1}/{reference_subjects}")
        subject = synthesize_subject(CALIBRATION_REFERENCE_SEED_BASE + i)
        images.append(normalize_intensity(subject.image, analysis_mask()))
        labels.append(subject.labels)
    rng = np.random.default_rng(CALIBRATION_REFERENCE_SEED_BASE)
    patch_images, patch_labels = sample_reference_patches(
        images, labels, CALIBRATION_REFERENCE_PATCHES, tuple(patch_size), rng, TEXTURE_OVERSAMPLING
    )
    return ReferenceBank(Path(), patch_images.astype(np.float16), patch_labels, {"source": "calibration"})


def calibration_seeds(count: int) -> list[int]:
    return [VALIDATION_SEED_BASE + CALIBRATION_SEED_OFFSET + i for i in range(count)]


def _dice_means(labels_per_subject, truths) -> float:
    means = []
    for labels, truth in zip(labels_per_subject, truths):
        dice = []
        for value in range(1, NUM_CLASSES):
            p, t = labels == value, truth == value
            denominator = int(p.sum()) + int(t.sum())
            dice.append(2 * int(np.logical_and(p, t).sum()) / denominator if denominator else 1.0)
        means.append(np.mean(dice))
    return float(np.mean(means))


def fit_decision_weights(
    scores: list[np.ndarray], truths: list[np.ndarray], passes: int = 3
) -> tuple[list[float], float, float]:
    """Per-class factors maximising mean Dice of argmax(factor · score) over the given (C, M) scores and (M,) truths.

    Coordinate ascent over ``CANDIDATE_FACTORS`` (background fixed at 1). Returns (factors, Dice before, after).
    """
    logs = [np.log(np.maximum(s, 1e-6)) for s in scores]

    def dice_with(log_factors):
        return _dice_means([np.argmax(logit + log_factors[:, None], axis=0) for logit in logs], truths)

    log_factors = np.zeros(NUM_CLASSES)
    before = best = dice_with(log_factors)
    for _ in range(passes):
        improved = False
        for cls in range(1, NUM_CLASSES):
            for factor in CANDIDATE_FACTORS:
                trial = log_factors.copy()
                trial[cls] = np.log(factor)
                value = dice_with(trial)
                if value > best + 1e-6:
                    best, log_factors, improved = value, trial, True
        if not improved:
            break
    return [round(float(f), 4) for f in np.exp(log_factors)], before, best


def calibrate(
    models_dir,
    subjects: int = DEFAULT_SUBJECTS,
    tta: int | None = None,
    device: str = "cpu",
    progress=None,
    command: str | None = None,
    reference_subjects: int = CALIBRATION_REFERENCE_SUBJECTS,
    cases: list | None = None,
    cases_description: str | None = None,
    privacy: str | None = None,
) -> dict:
    """Fit decision weights for ``plain-seg`` (its own path) and the learned unmixing (at privacy level ``privacy``,
    default the default level, with ``tta`` copies if given), record them in ``models_dir``'s manifest, and return
    what was measured. The private path's scores depend on the level (orientations, deformation), so the weights
    are fitted at the level users get unless they choose another.

    ``cases``: (normalised image, labels) arrays on the model grid, e.g. a user dataset's validation cases;
    default: ``subjects`` synthetic validation subjects.
    """
    import SimpleITK as sitk

    from ..data.synth import synthesize_subject, to_scanner_space
    from ..data.template import load_template
    from ..nets import load_manifest
    from ..nets.registry import write_manifest
    from .geometry import scores_to_input_grid
    from .pipeline import Unmixer, background_outside_analysis, plain_scores, prepare_scan, private_scores

    started = time.time()
    settings = privacy_settings(privacy or DEFAULT_LEVEL, tta)
    say = progress or (lambda message: None)
    segmenter = LocalSegmenter(models_dir, device)
    info = segmenter.info()
    patch_size = tuple(info["models"]["mixup-seg"]["patch_size"])
    unmixer = Unmixer("learned", info, patch_size, models_dir=models_dir)
    bank = calibration_bank(patch_size, reference_subjects, say)
    rng = np.random.default_rng(CALIBRATION_REFERENCE_SEED_BASE + 1)
    if cases is None:
        seeds = calibration_seeds(subjects)
        cases_description = (
            f"validation synthetic subjects, seeds {seeds[0]}..{seeds[-1]}, on scanner grids (registered to the "
            "template and resampled back, as a user's scan is)"
        )
        count = len(seeds)
    else:
        count = len(cases)
    collected: dict[str, list] = {"plain-seg": [], "mixup-unmix": []}
    truths = []
    for number in range(count):
        say(f"calibration subject {number + 1}/{count}")
        if cases is None:
            # Fitted where labels are read: on the scan's own grid, after registration and resampling back. On
            # the model grid the fit missed that, once resampled, the private path calls tissue on background
            # voxels twice as often as the baseline (Learned+TTA / Baseline on held-out subjects 900000 and 900001:
            # 0.952 and 0.914 with weights fitted on the model grid, 0.965 and 0.933 with these).
            image, label_image = to_scanner_space(synthesize_subject(seeds[number]), seeds[number])
            truth = sitk.GetArrayFromImage(label_image)
        else:
            volume, labels = cases[number]
            image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
            image.CopyInformation(load_template().image)  # on the model grid: no registration, labels stay exact
            truth = np.asarray(labels)
        prepared = prepare_scan(image, patch_size)
        model_grid_scores = {
            "plain-seg": plain_scores(prepared, segmenter)[0],
            "mixup-unmix": private_scores(prepared, segmenter, bank, {"learned": unmixer}, settings, rng).averaged[
                "learned"
            ],
        }
        on_scan = {
            name: scores_to_input_grid(background_outside_analysis(scores), prepared.transform, prepared.image)
            for name, scores in model_grid_scores.items()
        }
        # Only voxels some factor could label as tissue, or that are tissue, can change the Dice.
        keep = truth > 0
        for scores in on_scan.values():
            keep |= scores[1:].max(axis=0) * CANDIDATE_FACTORS.max() > scores[0]
        for name, scores in on_scan.items():
            collected[name].append(scores[:, keep])
        truths.append(truth[keep])
    record = {
        "command": command or "medprivacy mixup calibrate " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
        "subjects": cases_description or f"{count} validation cases",
        "key": f"{CALIBRATION_REFERENCE_PATCHES} reference patches from {reference_subjects} seeded synthetic subjects "
        f"{CALIBRATION_REFERENCE_SEED_BASE}+",
        "tta": settings.tta,
        "privacy": settings.to_json(),
        "objective": "mean Dice over " + ", ".join(CLASS_NAMES),
    }
    manifest = load_manifest(models_dir)
    for name, scores in collected.items():
        factors, before, after = fit_decision_weights(scores, truths)
        manifest["models"][name]["decision_weights"] = factors
        record[name] = {"decision_weights": factors, "dice_before": round(before, 4), "dice_after": round(after, 4)}
        say(f"{name}: decision weights {factors}, validation mean Dice {before:.4f} -> {after:.4f}")
    record["seconds"] = round(time.time() - started, 1)
    manifest.setdefault("training", {})["calibration"] = record
    write_manifest(manifest, models_dir)
    return record
