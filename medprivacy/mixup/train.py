"""End-to-end training of the Mixup-Privacy networks and the same-budget baseline (``medprivacy mixup train``).

One run trains three networks, seeded:
- ``mixup-seg`` (server): segments mixed patches into mixed class probabilities;
- ``mixup-unmix`` (client): λ-conditioned unmixing of those probabilities given the reference labels;
- ``plain-seg`` (server, evaluation only): same architecture, same iterations and batch, on unmixed patches.
The segmentation and unmixing losses (Dice + cross-entropy each) are summed and back-propagated together, so the
segmentation net learns what the unmixer needs (paper sec. 3.3).

The run's settings are in ``train_config``, its data and patches in ``train_data``, what it loads and saves in
``train_manifest``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time

import numpy as np

from ..data.synth import VALIDATION_SEED_BASE
from ..labels import NUM_CLASSES
from .train_config import TrainConfig
from .train_data import PatchSampler, load_dataset_subjects, synthetic_subject_normalized
from .train_manifest import initialise_from, save_trained_networks

log = logging.getLogger("medprivacy.train")


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
        validation = subjects[-config.validation_subjects :] if len(subjects) > 1 else subjects
        subjects = subjects[: -config.validation_subjects] if len(subjects) > 1 else subjects
    else:
        from ..data.synth import TRAIN_SEED_BASE

        seeds = [TRAIN_SEED_BASE + i for i in range(config.train_subjects)]
        loader = tqdm(seeds, desc="synthesising subjects", disable=not progress)
        subjects = [synthetic_subject_normalized(s, config.deformation) for s in loader]
        validation = [
            synthetic_subject_normalized(VALIDATION_SEED_BASE + i, config.deformation)
            for i in range(config.validation_subjects)
        ]
        data_description = (
            f"{len(subjects)} synthetic subjects from the MNI152 2009a template (Resources/Template), "
            f"seeds {seeds[0]}..{seeds[-1]}, "
            "random affine + smooth elastic deformation, bias field, gamma, noise; "
            f"validation seeds from {VALIDATION_SEED_BASE}"
        )

    sampling = dict(sampling=config.target_sampling, fill_probability=config.fill_probability, warp_rms=config.warp_rms)
    sampler = PatchSampler(subjects, config.patch_size, rng, config.reference_oversampling, **sampling)
    val_sampler = PatchSampler(
        validation, config.patch_size, np.random.default_rng(config.seed + 1), config.reference_oversampling, **sampling
    )
    val_batch = _validation_batch(val_sampler, config, count=48)

    seg_arch = config.segmentation_arch()
    unmix_arch = {"name": "unmix", "num_classes": NUM_CLASSES, "features": config.unmix_features}
    seg = build_network(seg_arch).to(device)
    unmix = build_network(unmix_arch).to(device)
    plain = build_network(seg_arch).to(device)
    previous_stage = (
        initialise_from(config.init_from, {"mixup-seg": seg, "mixup-unmix": unmix, "plain-seg": plain})
        if config.init_from
        else None
    )
    mix_opt = torch.optim.Adam(list(seg.parameters()) + list(unmix.parameters()), lr=config.learning_rate)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=config.learning_rate)
    schedule = [
        torch.optim.lr_scheduler.CosineAnnealingLR(
            o, T_max=max(config.iterations, 1), eta_min=config.learning_rate * 0.05
        )
        for o in (mix_opt, plain_opt)
    ]

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
        bar.set_postfix(
            seg=f"{loss_seg.item():.3f}", unmix=f"{loss_unmix.item():.3f}", plain=f"{loss_plain.item():.3f}"
        )

        last = step == final_step
        if config.validate_every and (step % config.validate_every == 0 or last):
            metrics = _validate(seg, unmix, plain, val_batch, device)
            metrics["iteration"] = step
            history.append(metrics)
            log.info("iteration %d validation %s", step, json.dumps(metrics))
            if progress:
                tqdm.write(
                    f"[{step}] validation patch Dice: "
                    f"{json.dumps({k: v for k, v in metrics.items() if k.endswith('mean')})}"
                )
        if (config.save_every and step % config.save_every == 0) or last:
            save_trained_networks(
                seg,
                unmix,
                plain,
                seg_arch,
                unmix_arch,
                config,
                out_dir,
                data_description,
                metrics,
                history,
                step,
                started,
                command,
                previous_stage,
            )
    calibration = None
    if config.calibration_subjects > 0:
        from .calibrate import calibrate

        # A user dataset is calibrated on its own validation cases, never on synthetic brains of another domain.
        user_cases = validation if config.dataset else None
        calibration = calibrate(
            out_dir,
            subjects=config.calibration_subjects,
            device=device,
            progress=tqdm.write if progress else None,
            command=command or "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
            cases=user_cases,
            cases_description=f"the last {len(validation)} case(s) of {config.dataset}" if config.dataset else None,
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
        baseline = (
            plain(torch.round(torch.from_numpy(plain_img[:, None]).to(device) * 255) / 255).argmax(1).cpu().numpy()
        )
    out = {}
    for name, pred, truth in (
        ("baseline", baseline, plain_lab),
        ("naive", naive, target_lab),
        ("learned", learned, target_lab),
    ):
        scores = _dice_scores(pred, truth)
        out[f"{name}_dice"] = [round(s, 4) for s in scores]
        out[f"{name}_mean"] = round(float(np.mean(scores)), 4)
    return out
