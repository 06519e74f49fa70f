"""End-to-end training of the Mixup-Privacy networks and the same-budget baseline (``medprivacy mixup train``).

One run trains three networks, seeded:
- ``mixup-seg`` (server): segments mixed patches into mixed class probabilities;
- ``mixup-unmix`` (client): λ-conditioned unmixing of those probabilities given the reference labels;
- ``plain-seg`` (server, evaluation only): same architecture, same iterations and batch, on unmixed patches.
The segmentation and unmixing losses (Dice + cross-entropy each) are summed and back-propagated together, so the
segmentation net learns what the unmixer needs (paper sec. 3.3).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.synth import VALIDATION_SEED_BASE
from ..labels import NUM_CLASSES
from .intensity import normalize_intensity
from .mixing import DEFAULT_LAMBDA_RANGE
from .sampling import crop, draw_reference_patches, keep_most_textured, reference_candidates

log = logging.getLogger("medprivacy.train")

LABEL_NAMES = {"0": "Background", "1": "CSF", "2": "Gray matter", "3": "White matter"}


@dataclass
class TrainConfig:
    arch: str = "unet"  # "unet" (small, CPU) or "unetplusplus" (the paper's U-Net++)
    channels: tuple = (16, 32, 64, 128)
    patch_size: int = 32
    unmix_features: int = 8
    iterations: int = 3000
    batch_size: int = 8
    learning_rate: float = 1e-3
    lambda_range: tuple = DEFAULT_LAMBDA_RANGE
    train_subjects: int = 16
    validation_subjects: int = 1
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    save_every: int = 250
    validate_every: int = 250
    dataset: str | None = None  # nnU-Net/MSD folder; None: synthetic subjects from the MNI152 template
    init_from: str | None = None  # models folder to continue from (a second stage with a fresh LR schedule)
    deformation: float = 1.0
    #: 1: references uniform over mostly-brain positions (how the first stage was trained). keygen keeps the most
    #: textured of TEXTURE_OVERSAMPLING draws, so a later stage passes that number to train on what clients send.
    reference_oversampling: int = 1
    #: Validation subjects on which the decision weights are fitted once training ends (calibrate.py); 0 skips.
    calibration_subjects: int = 4
    #: End after this many steps of the ``iterations``-long schedule (reproduces a stage that was cut short).
    stop_after: int | None = None
    #: How targets are drawn (the first four stages: "box", inside the analysis box with a left-right flip, references
    #: flipped). "private": as the privacy levels cut them (privacy.py): anywhere a patch touches the analysis region,
    #: past the volume's edge too, turned by any of the 48 cube symmetries, voxels without signal filled with
    #: reference texture with probability ``fill_probability``, and sampled through a random smooth deformation of up
    #: to ``warp_rms`` voxels RMS; references turned by any of the 48 symmetries.
    target_sampling: str = "box"
    fill_probability: float = 0.0
    warp_rms: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        if name == "cpu-small":
            return cls()
        if name == "gpu-paper":
            # Sec. 4: U-Net++ segmenter, Adam, batch 4, 200k iterations; 64³ patches on a GPU.
            return cls(arch="unetplusplus", patch_size=64, iterations=200_000, batch_size=4, train_subjects=64, save_every=5000, validate_every=5000)
        if name == "smoke":
            return cls(channels=(4, 8, 16), patch_size=16, unmix_features=4, iterations=3, batch_size=2, train_subjects=1, save_every=0, validate_every=3, deformation=0.3, calibration_subjects=0)
        raise ValueError(f"unknown preset {name!r}; use cpu-small, gpu-paper or smoke")

    def segmentation_arch(self) -> dict:
        if self.arch == "unet":
            return {
                "name": "unet",
                "in_channels": 1,
                "out_channels": NUM_CLASSES,
                "channels": list(self.channels),
                "strides": [2] * (len(self.channels) - 1),
                "num_res_units": 1,
            }
        if self.arch == "unetplusplus":
            return {"name": "unetplusplus", "in_channels": 1, "out_channels": NUM_CLASSES, "features": [32, 32, 64, 128, 256, 32]}
        raise ValueError(f"unknown architecture {self.arch!r}; use unet or unetplusplus")


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
        write_atomically(path, lambda tmp: np.savez(tmp, image=image.astype(np.float16), labels=subject.labels), sync=False)
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
        raise InputError(f"{root} has no dataset.json; expected the nnU-Net/MSD layout (dataset.json, imagesTr/, labelsTr/)")
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

    def __init__(self, subjects, patch_size: int, rng: np.random.Generator, reference_oversampling: int = 1, sampling: str = "box",
                 fill_probability: float = 0.0, warp_rms: float = 0.0):
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

        images, labels = draw_reference_patches(self.images, self.labels, self.reference_candidates, count * self.reference_oversampling, self.patch, self.rng)
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
    coarse = np.stack([gaussian_filter(c, CONTROL_SPACING_MM / 4 / step, mode="nearest") for c in noise]).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None], size=tuple(shape), mode="trilinear", align_corners=True)[0].numpy()
    current = float(np.sqrt(np.mean(np.sum(field ** 2, axis=0))))
    return (field * (rms / max(current, 1e-9))).astype(np.float32)


def _dice_ce(logits, target_probs):
    """Soft Dice (foreground classes) + soft cross-entropy; targets may be mixed (non one-hot) label maps."""
    import torch

    log_probs = torch.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    dims = (0, 2, 3, 4)
    intersection = (probs * target_probs).sum(dims)
    denominator = probs.sum(dims) + target_probs.sum(dims)
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    cross_entropy = -(target_probs * log_probs).sum(1).mean()
    return (1 - dice[1:].mean()) + cross_entropy


def _dice_scores(pred_labels: np.ndarray, true_labels: np.ndarray) -> list[float]:
    scores = []
    for c in range(1, NUM_CLASSES):
        p, t = pred_labels == c, true_labels == c
        denom = p.sum() + t.sum()
        scores.append(float(2 * (p & t).sum() / denom) if denom else 1.0)
    return scores


def train(config: TrainConfig, out_dir: str | os.PathLike, progress: bool = True, command: str | None = None) -> dict:
    import torch
    from tqdm import tqdm

    from ..nets import build_network, resolve_device
    from .mixing import one_hot

    if config.stop_after is not None and config.stop_after < 1:
        from ..errors import InputError

        raise InputError(f"--stop-after {config.stop_after}: give a number of iterations of at least 1")
    started = time.time()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)

    if config.dataset:
        subjects = load_dataset_subjects(config.dataset, limit=config.train_subjects)
        data_description = f"user dataset {config.dataset} ({len(subjects)} cases)"
        validation = subjects[-config.validation_subjects:] if len(subjects) > 1 else subjects
        subjects = subjects[: -config.validation_subjects] if len(subjects) > 1 else subjects
    else:
        from ..data.synth import TRAIN_SEED_BASE

        seeds = [TRAIN_SEED_BASE + i for i in range(config.train_subjects)]
        loader = tqdm(seeds, desc="synthesising subjects", disable=not progress)
        subjects = [synthetic_subject_normalized(s, config.deformation) for s in loader]
        validation = [synthetic_subject_normalized(VALIDATION_SEED_BASE + i, config.deformation) for i in range(config.validation_subjects)]
        data_description = (
            f"{len(subjects)} synthetic subjects from the MNI152 2009a template (Resources/Template), seeds {seeds[0]}..{seeds[-1]}, "
            f"random affine + smooth elastic deformation, bias field, gamma, noise; validation seeds from {VALIDATION_SEED_BASE}"
        )

    sampling = dict(sampling=config.target_sampling, fill_probability=config.fill_probability, warp_rms=config.warp_rms)
    sampler = PatchSampler(subjects, config.patch_size, rng, config.reference_oversampling, **sampling)
    val_sampler = PatchSampler(validation, config.patch_size, np.random.default_rng(config.seed + 1), config.reference_oversampling, **sampling)
    val_batch = _validation_batch(val_sampler, config, count=48)

    seg_arch = config.segmentation_arch()
    unmix_arch = {"name": "unmix", "num_classes": NUM_CLASSES, "features": config.unmix_features}
    seg = build_network(seg_arch).to(device)
    unmix = build_network(unmix_arch).to(device)
    plain = build_network(seg_arch).to(device)
    previous_stage = _initialise_from(config.init_from, {"mixup-seg": seg, "mixup-unmix": unmix, "plain-seg": plain}) if config.init_from else None
    mix_opt = torch.optim.Adam(list(seg.parameters()) + list(unmix.parameters()), lr=config.learning_rate)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=config.learning_rate)
    schedule = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(config.iterations, 1), eta_min=config.learning_rate * 0.05) for o in (mix_opt, plain_opt)]

    def quantize(t):
        # The wire sends uint8; straight-through rounding lets gradients pass while the forward sees the real values.
        return t + (torch.round(t.clamp(0, 1) * 255) / 255 - t).detach()

    history = []
    metrics: dict = {}
    final_step = min(config.stop_after or config.iterations, config.iterations)
    bar = tqdm(range(1, final_step + 1), desc="training", disable=not progress)
    for step in bar:
        target_img, target_lab = sampler.targets(config.batch_size)
        ref_img, ref_lab = sampler.references(config.batch_size)
        lam = rng.uniform(*config.lambda_range, size=config.batch_size).astype(np.float32)
        x = torch.from_numpy(target_img[:, None]).to(device)
        r = torch.from_numpy(ref_img[:, None]).to(device)
        y_x = torch.from_numpy(one_hot(target_lab, NUM_CLASSES)).to(device)
        y_r = torch.from_numpy(one_hot(ref_lab, NUM_CLASSES)).to(device)
        lam_t = torch.from_numpy(lam).to(device)
        lam_b = lam_t.view(-1, 1, 1, 1, 1)

        seg.train(), unmix.train(), plain.train()
        mixed_logits = seg(quantize(lam_b * x + (1 - lam_b) * r))
        mixed_probs = torch.softmax(mixed_logits, dim=1)
        unmixed_logits = unmix(quantize(mixed_probs), y_r, lam_t)
        loss_seg = _dice_ce(mixed_logits, lam_b * y_x + (1 - lam_b) * y_r)
        loss_unmix = _dice_ce(unmixed_logits, y_x)
        mix_opt.zero_grad()
        (loss_seg + loss_unmix).backward()
        mix_opt.step()

        if config.target_sampling == "box":
            plain_x, plain_y = x, y_x
        else:  # the baseline keeps segmenting plain patches, with the same budget as the private networks
            plain_img, plain_lab = sampler.baseline_targets(config.batch_size)
            plain_x = torch.from_numpy(plain_img[:, None]).to(device)
            plain_y = torch.from_numpy(one_hot(plain_lab, NUM_CLASSES)).to(device)
        loss_plain = _dice_ce(plain(quantize(plain_x)), plain_y)
        plain_opt.zero_grad()
        loss_plain.backward()
        plain_opt.step()
        for s in schedule:
            s.step()
        bar.set_postfix(seg=f"{loss_seg.item():.3f}", unmix=f"{loss_unmix.item():.3f}", plain=f"{loss_plain.item():.3f}")

        last = step == final_step
        if config.validate_every and (step % config.validate_every == 0 or last):
            metrics = _validate(seg, unmix, plain, val_batch, device)
            metrics["iteration"] = step
            history.append(metrics)
            log.info("iteration %d validation %s", step, json.dumps(metrics))
            if progress:
                tqdm.write(f"[{step}] validation patch Dice: {json.dumps({k: v for k, v in metrics.items() if k.endswith('mean')})}")
        if (config.save_every and step % config.save_every == 0) or last:
            _save_all(seg, unmix, plain, seg_arch, unmix_arch, config, out_dir, data_description, metrics, history, step, started, command, previous_stage)
    calibration = None
    if config.calibration_subjects > 0:
        from .calibrate import calibrate

        # A user dataset is calibrated on its own validation cases, never on synthetic brains of another domain.
        user_cases = validation if config.dataset else None
        calibration = calibrate(
            out_dir, subjects=config.calibration_subjects, device=device, progress=tqdm.write if progress else None,
            command=command or "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
            cases=user_cases, cases_description=f"the last {len(validation)} case(s) of {config.dataset}" if config.dataset else None,
        )
    return {"metrics": metrics, "history": history, "calibration": calibration, "seconds": time.time() - started}


def _validation_batch(sampler: PatchSampler, config: TrainConfig, count: int):
    rng = np.random.default_rng(12345)
    target_img, target_lab = sampler.targets(count)
    ref_img, ref_lab = sampler.references(count)
    lam = rng.uniform(*config.lambda_range, size=count).astype(np.float32)
    plain = (target_img, target_lab) if config.target_sampling == "box" else sampler.baseline_targets(count)
    return target_img, target_lab, ref_img, ref_lab, lam, plain


def _validate(seg, unmix, plain, batch, device) -> dict:
    import torch

    from .mixing import naive_unmix, one_hot

    target_img, target_lab, ref_img, ref_lab, lam, (plain_img, plain_lab) = batch
    seg.eval(), unmix.eval(), plain.eval()
    with torch.inference_mode():
        x = torch.from_numpy(target_img[:, None]).to(device)
        r = torch.from_numpy(ref_img[:, None]).to(device)
        lam_t = torch.from_numpy(lam).to(device)
        lam_b = lam_t.view(-1, 1, 1, 1, 1)
        y_r = torch.from_numpy(one_hot(ref_lab, NUM_CLASSES)).to(device)
        mixed = torch.softmax(seg(torch.round((lam_b * x + (1 - lam_b) * r) * 255) / 255), dim=1)
        mixed_q = torch.round(mixed * 255) / 255
        learned = unmix(mixed_q, y_r, lam_t).argmax(1).cpu().numpy()
        naive = naive_unmix(mixed_q.cpu().numpy(), y_r.cpu().numpy(), lam).argmax(1)
        baseline = plain(torch.round(torch.from_numpy(plain_img[:, None]).to(device) * 255) / 255).argmax(1).cpu().numpy()
    out = {}
    for name, pred, truth in (("baseline", baseline, plain_lab), ("naive", naive, target_lab), ("learned", learned, target_lab)):
        scores = _dice_scores(pred, truth)
        out[f"{name}_dice"] = [round(s, 4) for s in scores]
        out[f"{name}_mean"] = round(float(np.mean(scores)), 4)
    return out


def _initialise_from(folder: str, nets: dict) -> dict:
    """Load weights for every network from ``folder`` (same architectures); returns that folder's training record
    so the new manifest keeps the whole chain of commands needed to reproduce the final weights."""
    from ..errors import InputError
    from ..nets import load_manifest, load_model

    manifest = load_manifest(folder)
    for name, net in nets.items():
        loaded, _ = load_model(name, folder)
        try:
            net.load_state_dict(loaded.state_dict())
        except RuntimeError:
            raise InputError(f"--init-from {folder}: {name} has a different architecture; use the same preset and --arch") from None
    previous = dict(manifest.get("training", {}))
    previous["weights_sha256"] = {name: manifest["models"][name]["sha256"] for name in nets}
    return previous


def _save_all(seg, unmix, plain, seg_arch, unmix_arch, config, out_dir, data_description, metrics, history, step, started, command, previous_stage=None):
    from ..nets import ModelSpec, save_model

    patch = [config.patch_size] * 3
    lambda_range = [float(v) for v in config.lambda_range]
    seg_spec = save_model(
        seg,
        ModelSpec("mixup-seg", "mixup_seg.safetensors", seg_arch, "server", patch, LABEL_NAMES, extra={"input": "mixed", "lambda_range": lambda_range}),
        out_dir,
    )
    save_model(
        unmix,
        ModelSpec(
            "mixup-unmix",
            "mixup_unmix.safetensors",
            unmix_arch,
            "client",
            patch,
            LABEL_NAMES,
            # The unmixer learned this particular segmenter's errors: pair them so a client refuses a mismatched server.
            extra={"paired_with": {"mixup-seg": seg_spec.sha256}, "lambda_range": lambda_range},
        ),
        out_dir,
    )
    training = {
        "command": command or "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "data": data_description,
        "iterations_done": step,
        **({"continued_from": previous_stage} if previous_stage else {}),
        "seconds": round(time.time() - started, 1),
        "torch": __import__("torch").__version__,
        "validation_patch_metrics": metrics,
        "validation_history": history,
    }
    save_model(
        plain,
        ModelSpec("plain-seg", "plain_seg.safetensors", seg_arch, "server", patch, LABEL_NAMES, extra={"input": "plain", "purpose": "evaluation baseline"}),
        out_dir,
        training=training,
    )
