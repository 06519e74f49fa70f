"""Mixup-Privacy mixing and unmixing (Kim, Dolz, Desrosiers, eq. 2, 4, 5, 6).

Every patch, and every TTA copy of a patch, gets its own λ, its own reference patch and its own orientation, all
drawn independently; the k copies of all patches travel in one shuffled batch. Shuffling alone does not stop a
server from grouping the copies of one location (it can place them on the template): privacy.py lists what does,
and audit/ measures it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

#: Default mixing-weight range. Both sources stay substantial (neither image dominates the upload), which keeps
#: the single-channel separation problem hard, while λ ≥ 0.35 keeps eq. 4's division well conditioned.
DEFAULT_LAMBDA_RANGE = (0.35, 0.65)


def mix(target: np.ndarray, reference: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """x_mix = λ·x + (1 − λ)·r with one λ per patch (eq. 2); arrays are (N, ...) with λ of shape (N,)."""
    lam = np.asarray(lam, dtype=np.float32).reshape((-1,) + (1,) * (target.ndim - 1))
    return lam * target + (1.0 - lam) * reference


def naive_unmix(mixed_probs: np.ndarray, reference_onehot: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Eq. 4: y = (y_mix − (1 − λ)·y_r) / λ. Not clipped: averaging over TTA copies is linear and unbiased."""
    lam = np.asarray(lam, dtype=np.float32).reshape((-1,) + (1,) * (mixed_probs.ndim - 1))
    return (mixed_probs - (1.0 - lam) * reference_onehot) / lam


#: Exponent of λ in a copy's weight (``copy_weights``), chosen on validation subjects (calibration seeds 800100 and
#: 800101 on scanner grids, k = 16, standard level, the decision weights of that time): mean Dice ratio to the
#: baseline 0.927 with λ² and the former σ 0.25 centre weights; with σ 0.35, 0.929 with λ², 0.934 with λ⁴, 0.936
#: with λ⁶ and 0.936 with λ⁸ (a tie: the milder was kept).
COPY_WEIGHT_POWER = 6


def copy_weights(lam: np.ndarray) -> np.ndarray:
    """How much each unmixed copy counts in the TTA average: λ⁶. Eq. 4 divides the server's error by λ (λ² would be
    the inverse of that error's variance), and the server's error itself grows as the scan's share of the mixture
    falls, so copies mixed at small λ are worth less than λ² says; the exponent was measured (``COPY_WEIGHT_POWER``).
    A client-side choice: the uploads, and so what a server sees, are the same whatever it is."""
    return np.power(np.asarray(lam, dtype=np.float32), COPY_WEIGHT_POWER)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, *spatial) integer labels → (N, C, *spatial) float32."""
    out = np.zeros((labels.shape[0], num_classes) + labels.shape[1:], dtype=np.float32)
    np.put_along_axis(out, labels[:, None].astype(np.int64), 1.0, axis=1)
    return out


#: The 48 symmetries of a cube: an order of the three axes, then a flip of each. Code 0 is the identity and codes
#: 0..7 keep the axis order (flips only), so "the first n codes" is a subgroup for n = 1, 8 and 48.
ORIENTATIONS = tuple(
    (order, flips) for order in itertools.permutations(range(3)) for flips in itertools.product((False, True), repeat=3)
)


def orient(patch: np.ndarray, code: int) -> np.ndarray:
    """One (…, D, H, W) patch turned by cube symmetry ``code``: axes reordered, then flipped. A view, not a copy."""
    order, flips = ORIENTATIONS[int(code)]
    lead = patch.ndim - 3
    out = np.transpose(patch, tuple(range(lead)) + tuple(lead + a for a in order))
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, lead + axis)
    return out


def unorient(patch: np.ndarray, code: int) -> np.ndarray:
    """The inverse of ``orient``: ``unorient(orient(p, c), c)`` is ``p``."""
    order, flips = ORIENTATIONS[int(code)]
    lead = patch.ndim - 3
    out = patch
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, lead + axis)
    return np.transpose(out, tuple(range(lead)) + tuple(lead + a for a in np.argsort(order)))


def orient_rows(patches: np.ndarray, codes, inverse: bool = False) -> np.ndarray:
    """Row i of (N, …, D, H, W) ``patches`` turned by ``codes[i]`` (or turned back with ``inverse``); cubic patches."""
    turn = unorient if inverse else orient
    return np.stack([turn(patch, code) for patch, code in zip(patches, codes)]) if len(patches) else np.array(patches)


@dataclass
class MixPlan:
    """How each uploaded patch is made, and the order the patches are sent in.

    Row i (in send order) is patch ``location[i]`` of TTA copy ``copy[i]``'s patch grid, or a decoy when ``copy[i]``
    is -1 (a mixture of two reference patches, sent only so that the real rows cannot be counted or grouped; its
    answer is dropped). Kept on the client: it is part of the secret; the server sees the rows in this order only.
    """

    location: np.ndarray
    copy: np.ndarray
    reference_index: np.ndarray
    reference_orientation: np.ndarray  # cube symmetry of the reference patch: multiplies the bank's size by 8 or 48
    target_orientation: np.ndarray  # cube symmetry of the scan's patch (undone on the answer); 0 = as on the grid
    fill_index: (
        np.ndarray
    )  # reference patch whose texture replaces the scan outside the analysis region (or a decoy's target)
    fill_orientation: np.ndarray
    lam: np.ndarray

    def __len__(self) -> int:
        return len(self.lam)

    @property
    def is_decoy(self) -> np.ndarray:
        return self.copy < 0


def plan_mixing(
    patches_per_copy,
    bank_size: int,
    rng: np.random.Generator,
    lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE,
    target_orientations: int = 1,
    reference_orientations: int = 8,
    decoys: int = 0,
) -> MixPlan:
    """One row per patch of every TTA copy (copy c has ``patches_per_copy[c]`` patches) plus ``decoys`` decoy rows,
    each with its own reference, orientations and λ, all shuffled together. Orientations are drawn from the first
    ``target_orientations`` / ``reference_orientations`` codes of ``ORIENTATIONS`` (1, 8 or 48)."""
    counts = [int(n) for n in patches_per_copy]
    if not counts:
        raise ValueError("tta must be ≥ 1")
    for n in (target_orientations, reference_orientations):
        if n not in (1, 8, 48):
            raise ValueError(f"orientation count {n}: use 1, 8 or 48")
    location = np.concatenate([np.arange(n) for n in counts] + [np.full(int(decoys), -1)])
    copy = np.concatenate([np.repeat(np.arange(len(counts)), counts), np.full(int(decoys), -1)])
    total = len(location)
    order = rng.permutation(total)
    return MixPlan(
        location=location[order],
        copy=copy[order],
        reference_index=rng.integers(0, bank_size, size=total),
        reference_orientation=rng.integers(0, reference_orientations, size=total),
        target_orientation=rng.integers(0, target_orientations, size=total),
        fill_index=rng.integers(0, bank_size, size=total),
        fill_orientation=rng.integers(0, reference_orientations, size=total),
        lam=rng.uniform(lambda_range[0], lambda_range[1], size=total).astype(np.float32),
    )


def flip_patches(patches: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Flip each (.., D, H, W) patch along the axes its row of ``flips`` marks (the first training stages drew
    reference flips this way; orientation codes 0..7 are the same eight flips)."""
    out = np.array(patches, copy=True)
    for axis in range(3):
        rows = np.nonzero(flips[:, axis])[0]
        if rows.size:
            out[rows] = np.flip(out[rows], axis=out.ndim - 3 + axis)
    return out
