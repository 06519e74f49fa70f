"""The optimisation of one MedLocker network: seeded batches with augmentation, the shared Adam loop keeping the
best validation state, batch-norm re-estimation, and the classifier's and segmenter's held-out metrics."""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np

from .data import LesionDataset
from .models import SEGMENTER_FAMILY, build_model
from .train_manifest import save_trained_model
from .train_plans import TARGET_ACCURACY, ModelPlan, WatermarkTrainConfig, model_seed

log = logging.getLogger("medprivacy.watermark.train")


def _schedule(optimizer, plan: ModelPlan, warmup_fraction: float):
    import torch

    warmup = max(1, round(plan.steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, plan.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Batches:
    """Seeded epoch shuffling and augmentation: per-image left/right flip, shift, brightness, gamma, noise."""

    def __init__(self, dataset: LesionDataset, batch_size: int, seed: int, max_shift: int, with_masks: bool):
        import torch

        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.max_shift = max_shift
        self.with_masks = with_masks
        self.order = np.zeros(0, dtype=np.int64)

    def next(self):
        import torch

        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.dataset))])
        index, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        index = np.sort(index)
        images = torch.from_numpy(self.dataset.float_images(index)).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(self.dataset.labels[index])
        masks = torch.from_numpy(self.dataset.masks[index].astype(np.int64)) if self.with_masks else None
        images, masks = self._augment(images, masks)
        return images, labels, masks

    def _augment(self, images, masks):
        import torch

        n = images.shape[0]
        g = self.generator
        flip = torch.rand(n, generator=g) < 0.5
        images[flip] = images[flip].flip(-1)
        if masks is not None:
            masks[flip] = masks[flip].flip(-1)
        if self.max_shift:
            s = self.max_shift
            shifts = torch.randint(-s, s + 1, (n, 2), generator=g)
            padded = torch.nn.functional.pad(images, (s, s, s, s))
            padded_masks = torch.nn.functional.pad(masks, (s, s, s, s)) if masks is not None else None
            h, w = images.shape[-2:]
            for i in range(n):
                dy, dx = int(shifts[i, 0]) + s, int(shifts[i, 1]) + s
                images[i] = padded[i, :, dy : dy + h, dx : dx + w]
                if masks is not None:
                    masks[i] = padded_masks[i, dy : dy + h, dx : dx + w]
        gain = torch.empty(n, 1, 1, 1).uniform_(0.9, 1.1, generator=g)
        gamma = torch.empty(n, 1, 1, 1).uniform_(0.85, 1.15, generator=g)
        images = (images * gain).clamp(0, 1) ** gamma
        sigma = torch.empty(n, 1, 1, 1).uniform_(0.0, 0.015, generator=g)
        images = (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 1)
        return images, masks


def _calibration_images(config: WatermarkTrainConfig, train: LesionDataset):
    import torch

    count = min(config.bn_calibration_samples, len(train))
    index = np.sort(np.random.default_rng([config.seed, 7]).choice(len(train), size=count, replace=False))
    return torch.from_numpy(train.float_images(index)).permute(0, 3, 1, 2).contiguous()


def recalibrate_batchnorm(net, images, batch_size: int = 32, device: str = "cpu") -> bool:
    """Re-estimate every batch-norm layer's running mean/variance as a plain average over ``images``
    (N, 3, H, W); returns False when the network has no batch norm."""
    import torch
    from torch import nn

    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(images) == 0:
        return False
    momenta = [m.momentum for m in layers]
    was_training = net.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                net(images[start : start + batch_size].to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.train(was_training)
    return True


def _eval_tensor(dataset: LesionDataset):
    import torch

    return torch.from_numpy(dataset.float_images()).permute(0, 3, 1, 2).contiguous()


def _logits(net, images, device, batch_size: int = 64):
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(net(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def _classification_metrics(pred: np.ndarray, dataset: LesionDataset) -> dict:
    labels = dataset.labels
    correct = pred == labels
    sources = np.array(dataset.sources)
    per_source = {s: round(float(correct[sources == s].mean()), 4) for s in sorted(set(dataset.sources))}
    positives, negatives = labels == 1, labels == 0
    return {
        "accuracy": round(float(correct.mean()), 4),
        "sensitivity": round(float(correct[positives].mean()), 4) if positives.any() else None,
        "specificity": round(float(correct[negatives].mean()), 4) if negatives.any() else None,
        "per_source_accuracy": per_source,
        "images": len(labels),
    }


def _train_loop(net, plan, config, family, batches, loss_fn, validate, device, progress):
    """Shared optimisation loop; ``validate()`` returns a score (higher is better) and the best state is kept."""
    import torch
    from tqdm import tqdm

    optimizer = torch.optim.Adam(net.parameters(), lr=plan.learning_rate)
    scheduler = _schedule(optimizer, plan, config.warmup_fraction)
    best_score, best_state, best_step, history = -1.0, None, 0, []
    step_seconds = 0.0
    bar = tqdm(range(1, plan.steps + 1), desc=f"training {family}", disable=not progress, leave=False)
    for step in bar:
        t0 = time.time()
        net.train()
        images, labels, masks = batches.next()
        loss = loss_fn(net(images.to(device)), labels.to(device), None if masks is None else masks.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step_seconds += time.time() - t0
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.validate_every == 0 or step == plan.steps:
            score = validate()
            history.append({"step": step, "score": round(score, 4), "loss": round(loss.item(), 4)})
            log.info("%s step %d validation %.4f", family, step, score)
            if score >= best_score:
                best_score, best_state, best_step = score, copy.deepcopy(net.state_dict()), step
    net.load_state_dict(best_state)
    return {
        "validation_best": round(best_score, 4),
        "best_step": best_step,
        "validation_history": history,
        "ms_per_image": round(1000 * step_seconds / max(1, plan.steps * batches.batch_size), 2),
    }


def _setup_model(config, plan, family, train, validation, device, with_masks: bool):
    """What every model's training starts with, in this order so each model's seed fixes its weights and batches."""
    import torch

    seed = model_seed(config, family)
    torch.manual_seed(seed)
    net, arch = build_model(family, (config.size, config.size), plan.arch)
    batches = _Batches(train, plan.batch_size, seed, config.max_shift, with_masks=with_masks)
    return seed, net.to(device), arch, batches, _calibration_images(config, train), _eval_tensor(validation)


def train_classifier(config, plan, family, train, validation, test, device, out_dir, progress) -> dict:
    import torch

    started = time.time()
    seed, net, arch, batches, calibration, val_images = _setup_model(
        config, plan, family, train, validation, device, with_masks=False
    )

    def loss_fn(logits, labels, _masks):
        return torch.nn.functional.cross_entropy(logits, labels)

    def validate() -> float:
        recalibrate_batchnorm(net, calibration, plan.batch_size, device)
        pred = _logits(net, val_images, device).argmax(1).numpy()
        return float((pred == validation.labels).mean())

    metrics = _train_loop(net, plan, config, family, batches, loss_fn, validate, device, progress)
    net.eval()
    test_metrics = _classification_metrics(_logits(net, _eval_tensor(test), device).argmax(1).numpy(), test)
    metrics.update(
        {
            "held_out_accuracy": test_metrics["accuracy"],
            "held_out": test_metrics,
            "meets_target": test_metrics["accuracy"] >= TARGET_ACCURACY,
            "steps": plan.steps,
            "batch_size": plan.batch_size,
            "learning_rate": plan.learning_rate,
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "seconds": round(time.time() - started, 1),
        }
    )
    if not metrics["meets_target"] and config.preset != "smoke":
        log.warning(
            "%s held-out accuracy %.3f is below the %.0f %% target",
            family,
            metrics["held_out_accuracy"],
            100 * TARGET_ACCURACY,
        )
    save_trained_model(
        net,
        family,
        arch,
        config,
        out_dir,
        {
            "task": "classify",
            "held_out_accuracy": metrics["held_out_accuracy"],
        },
    )
    return metrics


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denominator = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / denominator) if denominator else 1.0


def _segmentation_metrics(pred: np.ndarray, dataset: LesionDataset) -> dict:
    truth = dataset.masks
    positives = dataset.labels == 1
    detected = pred.reshape(len(pred), -1).any(axis=1).astype(np.int64)
    per_image = [_dice(pred[i], truth[i]) for i in np.nonzero(positives)[0]]
    sources = np.array(dataset.sources)
    per_source = {}
    for s in sorted(set(dataset.sources)):
        chosen = positives & (sources == s)
        if chosen.any():
            per_source[s] = round(_dice(pred[chosen], truth[chosen]), 4)
    return {
        "dice": round(_dice(pred[positives], truth[positives]), 4) if positives.any() else None,
        "mean_image_dice": round(float(np.mean(per_image)), 4) if per_image else None,
        "per_source_dice": per_source,
        "detection_accuracy": round(float((detected == dataset.labels).mean()), 4),
        "false_positive_pixel_rate": round(float(pred[~positives].mean()), 6) if (~positives).any() else None,
        "images": len(dataset),
    }


def train_segmenter(config, plan, train, validation, test, device, out_dir, progress) -> dict:
    from monai.losses import DiceCELoss

    started = time.time()
    family = SEGMENTER_FAMILY
    seed, net, arch, batches, calibration, val_images = _setup_model(
        config, plan, family, train, validation, device, with_masks=True
    )
    # batch=True: Dice over the whole batch, so lesion-free images do not give 0/0 terms. Dice on the lesion class
    # only: with the background's near-perfect Dice in the mean, lesions (~1 % of pixels) gave too little signal
    # and the first cpu-small run collapsed to all-background.
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)

    def loss_fn(logits, _labels, masks):
        return dice_ce(logits, masks[:, None])

    def predict(images) -> np.ndarray:
        recalibrate_batchnorm(net, calibration, plan.batch_size, device)
        return (_logits(net, images, device, batch_size=32).argmax(1) == 1).numpy()

    def validate() -> float:
        pred = predict(val_images)
        positives = validation.labels == 1
        return _dice(pred[positives], validation.masks[positives])

    metrics = _train_loop(net, plan, config, family, batches, loss_fn, validate, device, progress)
    test_metrics = _segmentation_metrics(
        (_logits(net, _eval_tensor(test), device, batch_size=32).argmax(1) == 1).numpy(), test
    )
    metrics.update(
        {
            "held_out_dice": test_metrics["dice"],
            "held_out_accuracy": test_metrics["detection_accuracy"],
            "held_out": test_metrics,
            "steps": plan.steps,
            "batch_size": plan.batch_size,
            "learning_rate": plan.learning_rate,
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "seconds": round(time.time() - started, 1),
        }
    )
    save_trained_model(
        net,
        family,
        arch,
        config,
        out_dir,
        {
            "task": "segment-lesion",
            # Image-level: an image counts as "lesion" when any pixel is segmented as lesion.
            "held_out_accuracy": metrics["held_out_accuracy"],
            "held_out_dice": metrics["held_out_dice"],
        },
    )
    return metrics
