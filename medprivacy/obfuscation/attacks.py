"""Reconstruction attacks on obfuscated frames, and the measures that score them.

Threat model (a), *algorithm and public data known*: the attacker runs this very code with keys of its own on the
public data (the synthetic angiograms, the fundus photograph) and trains a network from obfuscated frames back to
the originals. It cannot read codes as intensities (each key shuffles them), so its network sees what every key
leaves alike: for each pixel, how often its code occurs in the frame (frequent codes are background) and which
of its 24 neighbours in a 5x5 window carry the same code (the outlines of the level sets). A fresh random key is
drawn for every training frame.

Threat model (b), *N leaked pairs* (plain, obfuscated) made with the victim's key, on top of (a):
``b-lut``      the inverse mapping fitted directly: the mean plain intensity behind each code, looked up pixel by
               pixel and smoothed (the smoothing chosen on the leaked pairs themselves);
``b-window``   local likelihood decoding: P(code | plain-intensity bin) counted on the leaked pairs, and every
               pixel's intensity estimated from the codes of a Gaussian window around it (naive Bayes; the window
               chosen on the leaked pairs);
``b-finetune`` the (a) network fine-tuned on the leaked pairs;
``b-keyfit``   key recovery: the public VAE's output for the leaked plain frames is quantised and each level is
               assigned the code it most often became, which estimates the secret table; the attacker then makes
               unlimited training pairs from public data with the estimated table and trains a network that reads
               the victim's codes directly (one-hot input).
``oracle``     the same network trained with the victim's true table and secret: everything but the original frames
               is known. It bounds every attack that recovers the key from any amount of leaked data, so it is
               reported beside (b) as the limit.

Measures (originals and reconstructions are the normalised model-size frames in [0, 1]): SSIM and PSNR
(scikit-image, data range 1) and vessel Dice: both images through Frangi vesselness (dark ridges, sigmas 0.7 to
2 pixels), each thresholded at its own 90th percentile (the top 10 % of pixels: about the vessel area of the
frames), Dice of the two masks. Unrelated images score about 0.1 (chance overlap of two 10 % masks). Baselines:
the mean training frame (what knowing nothing gives) and the obfuscated frame itself, read as an image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CancelledError
from ..nets.obfuscation import NEIGHBOURHOOD, build_attack_net, invariant_features  # noqa: F401  (the networks' home is nets/)

ARCH_NAME = "obf-attack"
VESSEL_FRACTION = 0.10
FRANGI_SIGMAS = (0.7, 1.0, 1.5, 2.0)
INTENSITY_BINS = 16


# ---------------------------------------------------------------------------------------------------- measures


def vessel_mask(image: np.ndarray, fraction: float = VESSEL_FRACTION) -> np.ndarray:
    from skimage.filters import frangi

    vesselness = frangi(np.asarray(image, dtype=np.float64), sigmas=FRANGI_SIGMAS, black_ridges=True)
    return vesselness >= np.quantile(vesselness, 1.0 - fraction)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / total) if total else 1.0


def scores(reconstructions: np.ndarray, originals: np.ndarray, original_masks: list | None = None) -> dict:
    """Mean SSIM, PSNR and vessel Dice of reconstructions (N, H, W) against originals, both in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    reconstructions = np.clip(np.asarray(reconstructions, dtype=np.float64), 0.0, 1.0)
    originals = np.asarray(originals, dtype=np.float64)
    masks = original_masks if original_masks is not None else [vessel_mask(o) for o in originals]
    ssim = [structural_similarity(r, o, data_range=1.0) for r, o in zip(reconstructions, originals)]
    # An exact copy has infinite PSNR; 99 dB stands for it, so means stay finite.
    psnr = [
        min(99.0, peak_signal_noise_ratio(o, r, data_range=1.0)) if np.any(o != r) else 99.0
        for r, o in zip(reconstructions, originals)
    ]
    dices = [dice(vessel_mask(r), m) for r, m in zip(reconstructions, masks)]
    return {
        "ssim": round(float(np.mean(ssim)), 4),
        "psnr": round(float(np.mean(psnr)), 2),
        "vessel_dice": round(float(np.mean(dices)), 4),
        "frames": int(len(originals)),
    }


# ---------------------------------------------------------------------------------------------------- networks


@dataclass
class AttackSettings:
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 2e-3
    seed: int = 0


def train_attack(
    net,
    batches: Callable[[int, int], tuple],
    settings: AttackSettings,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Fit ``net`` to ``batches(step, batch_size) -> (codes uint8 (B, H, W), originals float32 (B, H, W))`` with the
    loss a strong attacker picks for these measures: L1 + 0.5 (1 - SSIM)."""
    import torch
    from monai.losses import SSIMLoss

    torch.manual_seed(settings.seed)
    net.to(device).train()
    ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    from .classifier import warmup_cosine

    scheduler = warmup_cosine(optimizer, settings.steps)
    started, recent = time.perf_counter(), []
    for step in range(1, settings.steps + 1):
        if cancel is not None and cancel():
            raise CancelledError("attack training cancelled")
        codes, originals = batches(step, settings.batch_size)
        target = torch.from_numpy(np.ascontiguousarray(originals, dtype=np.float32)).to(device)
        guess = net(torch.from_numpy(np.ascontiguousarray(codes)).to(device))
        loss = (guess - target).abs().mean() + 0.5 * ssim_loss(guess[:, None], target[:, None])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        recent.append(float(loss.detach()))
        if progress is not None and (step % 100 == 0 or step == settings.steps):
            progress(step, settings.steps, float(np.mean(recent[-100:])))
    net.eval()
    return {
        "steps": settings.steps,
        "final_loss": round(float(np.mean(recent[-100:])), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }


def reconstruct(net, codes: np.ndarray, device: str = "cpu", batch: int = 64) -> np.ndarray:
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(codes), batch):
            out.append(
                net(torch.from_numpy(np.ascontiguousarray(codes[start : start + batch])).to(device))
                .float()
                .cpu()
                .numpy()
            )
    return np.concatenate(out)


# ------------------------------------------------------------------------------- (b) without a network


def fit_lut_inverse(plain: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(256,) mean plain intensity behind each code value in the leaked pairs (the overall mean where unseen)."""
    sums = np.bincount(codes.ravel(), weights=plain.ravel().astype(np.float64), minlength=256)
    counts = np.bincount(codes.ravel(), minlength=256)
    inverse = np.full(256, float(plain.mean()))
    inverse[counts > 0] = sums[counts > 0] / counts[counts > 0]
    return inverse


def lut_attack(
    plain: np.ndarray, leaked: np.ndarray, codes: np.ndarray, sigmas=(0.0, 0.7, 1.0, 1.5, 2.0, 3.0)
) -> tuple[np.ndarray, dict]:
    """b-lut: per-pixel inverse lookup, then the Gaussian smoothing that scores best on the leaked pairs."""
    from scipy.ndimage import gaussian_filter

    inverse = fit_lut_inverse(plain, leaked)
    best = max(sigmas, key=lambda s: _fit_score(_smooth(inverse[leaked], s, gaussian_filter), plain))
    return _smooth(inverse[codes], best, gaussian_filter), {"sigma": best}


def _smooth(images: np.ndarray, sigma: float, gaussian_filter) -> np.ndarray:
    if sigma <= 0:
        return images.astype(np.float32)
    return np.stack([gaussian_filter(image, sigma) for image in images]).astype(np.float32)


def _fit_score(guess: np.ndarray, plain: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(np.mean([structural_similarity(np.clip(g, 0, 1), p, data_range=1.0) for g, p in zip(guess, plain)]))


def window_attack(
    plain: np.ndarray,
    leaked: np.ndarray,
    codes: np.ndarray,
    sigmas=(0.7, 1.0, 1.5, 2.0, 3.0),
    bins: int = INTENSITY_BINS,
) -> tuple[np.ndarray, dict]:
    """b-window: naive-Bayes decoding of each pixel's intensity bin from the codes in a Gaussian window."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    plain_bins = np.clip(np.digitize(plain, edges[1:-1]), 0, bins - 1)
    # P(code | bin) with add-one smoothing over the codes that occur, and P(bin).
    table = np.ones((bins, 256))
    np.add.at(table, (plain_bins.ravel(), leaked.ravel().astype(np.int64)), 1.0)
    seen = np.zeros(256, dtype=bool)
    seen[np.unique(leaked)] = True
    table[:, ~seen] = 1.0
    log_likelihood = np.log(table / table.sum(axis=1, keepdims=True))
    log_prior = np.log(np.bincount(plain_bins.ravel(), minlength=bins) + 1.0)
    best = max(sigmas, key=lambda s: _fit_score(_decode(leaked, log_likelihood, log_prior, centres, s), plain))
    return _decode(codes, log_likelihood, log_prior, centres, best), {"sigma": best, "bins": bins}


def _decode(
    codes: np.ndarray, log_likelihood: np.ndarray, log_prior: np.ndarray, centres: np.ndarray, sigma: float
) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = np.empty(codes.shape, dtype=np.float32)
    for i, frame in enumerate(codes):
        evidence = log_likelihood[:, frame.astype(np.int64)]  # (bins, H, W)
        # A Gaussian window sums the evidence of the neighbours (weights normalised to the centre pixel's 1).
        weight = 2 * np.pi * sigma**2
        pooled = (
            np.stack([gaussian_filter(plane, sigma, mode="nearest") * weight for plane in evidence])
            + log_prior[:, None, None]
        )
        pooled -= pooled.max(axis=0, keepdims=True)
        posterior = np.exp(pooled)
        posterior /= posterior.sum(axis=0, keepdims=True)
        out[i] = np.tensordot(centres, posterior, axes=1)
    return out


def estimate_table(decoded_plain: np.ndarray, leaked: np.ndarray, levels: int) -> tuple[np.ndarray, float]:
    """b-keyfit's table estimate: quantise the public VAE's (noise-free) output of the leaked plain frames and give
    each level the code it most often became; unseen levels get the most frequent code. Returns (table (levels,)
    uint8, fraction of pixels the estimate explains on the leaked pairs)."""
    quantised = np.clip(np.floor(decoded_plain * levels), 0, levels - 1).astype(np.int64).ravel()
    counts = np.zeros((levels, 256))
    np.add.at(counts, (quantised, leaked.ravel().astype(np.int64)), 1.0)
    fallback = int(np.bincount(leaked.ravel(), minlength=256).argmax())
    table = np.where(counts.sum(axis=1) > 0, counts.argmax(axis=1), fallback).astype(np.uint8)
    explained = float((table[quantised] == leaked.ravel()).mean())
    return table, explained
