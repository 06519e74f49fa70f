"""The rates of the MedLocker evaluation: attack success, transfer success, and the ensemble's prediction (eq. 8).

Definitions are in :mod:`medprivacy.watermark.evaluate`; these functions take per-image arrays of classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _rate(successes: int, total: int) -> float | None:
    return successes / total if total else None


def attack_success_rate(labels, clean_pred, watermarked_pred) -> dict[str, Any]:
    """ASR = successful attacks ÷ images the model classified correctly before (per-image arrays of classes).

    Returns ``{"asr", "successes", "correct_before", "images"}``; ``asr`` is None when nothing was right before.
    """
    labels, clean_pred, watermarked_pred = (np.asarray(a).reshape(-1) for a in (labels, clean_pred, watermarked_pred))
    if not (labels.shape == clean_pred.shape == watermarked_pred.shape):
        raise ValueError(
            f"labels and predictions differ in length: {labels.shape}, {clean_pred.shape}, {watermarked_pred.shape}"
        )
    correct = clean_pred == labels
    success = correct & (watermarked_pred != labels)
    return {
        "asr": _rate(int(success.sum()), int(correct.sum())),
        "successes": int(success.sum()),
        "correct_before": int(correct.sum()),
        "images": int(labels.size),
    }


def transfer_success_rate(labels, source_clean, source_watermarked, target_clean, target_watermarked) -> dict[str, Any]:
    """Transfer ASR = target fooled ÷ images whose watermark fooled the source and that the target got right clean.

    Returns ``{"asr", "fooled", "pool"}``; ``asr`` is None when the pool is empty.
    """
    arrays = [
        np.asarray(a).reshape(-1) for a in (labels, source_clean, source_watermarked, target_clean, target_watermarked)
    ]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("labels and predictions differ in length")
    labels, source_clean, source_watermarked, target_clean, target_watermarked = arrays
    pool = (source_clean == labels) & (source_watermarked != labels) & (target_clean == labels)
    fooled = pool & (target_watermarked != labels)
    return {"asr": _rate(int(fooled.sum()), int(pool.sum())), "fooled": int(fooled.sum()), "pool": int(pool.sum())}


def ensemble_prediction(probabilities: dict[str, np.ndarray], members: Sequence[str], weights=None) -> np.ndarray:
    """argmax of the weighted mean of the members' class probabilities (eq. 8); weights default to 1/K."""
    stack = np.stack([np.asarray(probabilities[m], dtype=np.float64) for m in members])
    beta = np.full(len(members), 1.0 / len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.einsum("k,k...c->...c", beta, stack).argmax(axis=-1)
