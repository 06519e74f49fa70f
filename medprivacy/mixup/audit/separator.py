"""The attacker's single-mixture separator: a 3D U-Net that predicts the scan's part of one upload.

A curious server can train it with public means only: its own synthetic patients (seeds no client uses), its own
keygen-like reference bank, and the client's own upload code (pipeline.plan_session / make_uploads) at every
privacy level, so it learns exactly the mixtures clients send. ``train_separator`` (``medprivacy mixup
train-attacker``) regenerates the shipped weights ``attack-separator`` with a manifest entry.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np

# The attacker's own seeds (synthetic patients, reference subjects) are ranges nothing else uses (data.synth).
from ...data.synth import ATTACKER_BANK_SEED_BASE, ATTACKER_SUBJECT_SEED_BASE, VALIDATION_SEED_BASE

MODEL_NAME = "attack-separator"
MODEL_FILE = "attack_separator.safetensors"
ARCH = {
    "name": "unet",
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64],
    "strides": [2, 2],
    "num_res_units": 1,
}


def attacker_bank(patch_size, subjects: int = 4, patches: int = 512):
    """A reference bank made as keygen makes one, from the attacker's own seeded synthetic subjects."""
    from ..bank import ReferenceBank
    from ..sampling import TEXTURE_OVERSAMPLING, sample_reference_patches
    from ..train_data import synthetic_subject_normalized

    images, labels = zip(*(synthetic_subject_normalized(ATTACKER_BANK_SEED_BASE + i) for i in range(subjects)))
    rng = np.random.default_rng(ATTACKER_BANK_SEED_BASE)
    patch_images, patch_labels = sample_reference_patches(
        list(images), list(labels), patches, tuple(patch_size), rng, TEXTURE_OVERSAMPLING
    )
    return ReferenceBank(Path(), patch_images.astype(np.float16), patch_labels, {"source": "attacker"})


def _prepared(seed: int, patch_size):
    """An attacker patient on the model grid, cut as the client cuts scans (no registration needed there)."""
    import SimpleITK as sitk

    from ...data.template import load_template
    from ..pipeline import prepare_scan
    from ..train_data import synthetic_subject_normalized

    image = sitk.GetImageFromArray(synthetic_subject_normalized(seed)[0].astype(np.float32))
    image.CopyInformation(load_template().image)
    return prepare_scan(image, patch_size)


class TrainingMixtures:
    """Endless (upload, scan part) pairs: random attacker patient, random privacy level, one private run's rows."""

    def __init__(self, patch_size, seeds, rng: np.random.Generator, bank):
        from ..privacy import LEVELS

        self.rng = rng
        self.patch_size = tuple(patch_size)
        self.bank = bank
        self.scans = [_prepared(seed, self.patch_size) for seed in seeds]
        self.levels = [settings.with_changes(tta=2, level=settings.level) for settings in LEVELS.values()]
        self._pool: list = []

    def batch(self, count: int):
        from ..pipeline import make_uploads, plan_session
        from .capture import as_received

        while len(self._pool) < count:
            scan = self.scans[int(self.rng.integers(len(self.scans)))]
            settings = self.levels[int(self.rng.integers(len(self.levels)))]
            session = plan_session(scan, self.bank, settings, self.rng)
            rows = self.rng.choice(len(session.plan), size=min(64, len(session.plan)), replace=False)
            mixed, _, targets, _ = make_uploads(session, self.bank, np.sort(rows))
            self._pool.extend(zip(as_received(mixed), targets))
        chosen = [self._pool.pop(int(self.rng.integers(len(self._pool)))) for _ in range(count)]
        return np.stack([c[0] for c in chosen]), np.stack([c[1] for c in chosen])


def train_separator(
    out_dir,
    iterations: int = 1500,
    batch_size: int = 4,
    crop: int = 32,
    subjects: int = 4,
    seed: int = 0,
    threads: int = 0,
    learning_rate: float = 1e-3,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train the separator on 32³ crops of real client uploads (it is fully convolutional: it runs on whole uploads)."""
    import torch
    from tqdm import tqdm

    from ...nets import ModelSpec, build_network, save_model
    from ..bank import client_patch_size
    from ..mixing import DEFAULT_LAMBDA_RANGE

    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    patch_size = client_patch_size()
    data = TrainingMixtures(
        patch_size, [ATTACKER_SUBJECT_SEED_BASE + i for i in range(subjects)], rng, attacker_bank(patch_size)
    )
    net = build_network(ARCH)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=learning_rate * 0.05)
    bar = tqdm(range(1, iterations + 1), desc="training the attacker's separator", disable=not progress)
    for _ in bar:
        uploads, targets = data.batch(batch_size)
        corner = rng.integers(0, patch_size[0] - crop + 1, size=3)
        region = (slice(None),) + tuple(slice(int(c), int(c) + crop) for c in corner)
        x = torch.from_numpy(np.ascontiguousarray(uploads[region]))[:, None]
        y = torch.from_numpy(np.ascontiguousarray(targets[region]))[:, None]
        loss = torch.nn.functional.l1_loss(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(l1=f"{loss.item():.4f}")
    metrics = validate_separator(net, patch_size, data.bank)
    spec = ModelSpec(
        MODEL_NAME,
        MODEL_FILE,
        dict(ARCH),
        "attack",
        list(patch_size),
        {"0": "scan part of one upload"},
        extra={
            "purpose": "privacy audit only: the strongest single-upload separator a curious server can train with "
            "public means",
            "training": {
                "command": command
                or "medprivacy mixup train-attacker " + " ".join(shlex.quote(a) for a in sys.argv[3:]),
                "data": (
                    f"uploads made by the client's own code at every privacy level from {subjects} attacker-seeded "
                    f"synthetic patients ({ATTACKER_SUBJECT_SEED_BASE}+) and an attacker bank "
                    f"({ATTACKER_BANK_SEED_BASE}+), λ ~ U{tuple(DEFAULT_LAMBDA_RANGE)}"
                ),
                "iterations": iterations,
                "batch_size": batch_size,
                "crop": crop,
                "seed": seed,
                "learning_rate": learning_rate,
                "seconds": round(time.time() - started, 1),
                "validation": metrics,
            },
        },
    )
    save_model(net, spec, out_dir)
    return metrics


def validate_separator(net, patch_size, bank, subjects: int = 1) -> dict:
    """L1 and PSNR of the separator's output against the scan part, next to the raw upload, on validation patients."""
    import torch

    seeds = [VALIDATION_SEED_BASE + 200 + i for i in range(subjects)]
    uploads, targets = TrainingMixtures(patch_size, seeds, np.random.default_rng(1), bank).batch(32)
    with torch.inference_mode():
        estimates = separate(net, uploads)

    def measures(values):
        error = np.mean((np.clip(values, 0, 1) - targets) ** 2)
        return round(float(np.mean(np.abs(values - targets))), 4), round(float(10 * np.log10(1 / max(error, 1e-12))), 2)

    (l1_raw, psnr_raw), (l1_net, psnr_net) = measures(uploads), measures(estimates)
    return {
        "uploads": 32,
        "l1_upload": l1_raw,
        "psnr_upload_db": psnr_raw,
        "l1_separated": l1_net,
        "psnr_separated_db": psnr_net,
    }


def separate(net, uploads: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    out = np.empty(uploads.shape, dtype=np.float32)
    with torch.inference_mode():
        for begin in range(0, len(uploads), batch):
            x = torch.from_numpy(np.ascontiguousarray(uploads[begin : begin + batch], dtype=np.float32))[:, None]
            out[begin : begin + batch] = net(x)[:, 0].numpy()
    return out


def load_separator(models_dir=None):
    from ...nets import load_model

    return load_model(MODEL_NAME, models_dir)[0]
