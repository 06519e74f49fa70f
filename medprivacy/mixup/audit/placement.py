"""Placing the shuffled uploads back on the scan, as a curious server would try it.

- ``TemplateMatcher``: normalised cross-correlation of each upload (or of its separated estimate) with a reference
  volume — the public MNI152 template the scan was aligned to, or the server's own rebuild in later rounds — over
  every position and every cube orientation the privacy level may have used: coarse (FFT on a 4 mm grid) for all,
  then at 1 mm around the best coarse hits. Where the level cuts the scan on public grids, the server scores only
  those grids' starts.
- ``pair_uploads``: overlap pairing without any template: for a query upload, the other upload, relative
  orientation and offset whose overlap correlates best; a server that pairs neighbours could chain them.
- ``placement_accuracy``: the share of uploads placed exactly (start and orientation) and within one patch step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..mixing import ORIENTATIONS, orient, unorient


@dataclass
class Placement:
    start: np.ndarray  # (N, 3) int, on the model grid (may reach past its edge)
    orientation: np.ndarray  # (N,) code that turns the reference volume's patch into the upload
    score: np.ndarray  # (N,) normalised cross-correlation of the best match


def _torch():
    import torch

    return torch


def _pool(volume: np.ndarray, factor: int):
    torch = _torch()
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    tensor = tensor.reshape((-1, 1) + tensor.shape[-3:])
    return torch.nn.functional.avg_pool3d(tensor, factor, factor)[:, 0]


def _ncc_maps(reference, patches, valid_shape):
    """NCC of each (small) patch with every position of ``reference`` (all torch; FFT). Patches (B, n, n, n) are
    zero-mean; returns (B, *valid_shape)."""
    torch = _torch()
    n = patches.shape[-1]
    size = [s + n for s in reference.shape]
    spectrum = torch.fft.rfftn(reference, s=size)
    ones = torch.fft.rfftn(torch.ones((n, n, n)), s=size)
    window = tuple(slice(0, v) for v in valid_shape)
    local_sum = torch.fft.irfftn(spectrum * torch.conj(ones), s=size)[window]
    local_sq = torch.fft.irfftn(torch.fft.rfftn(reference * reference, s=size) * torch.conj(ones), s=size)[window]
    local_std = torch.sqrt(torch.clamp(local_sq - local_sum * local_sum / n**3, min=1e-6))
    norms = torch.sqrt((patches * patches).sum(dim=(1, 2, 3))).clamp_min(1e-6)
    products = torch.fft.irfftn(
        spectrum[None] * torch.conj(torch.fft.rfftn(patches, s=size, dim=(1, 2, 3))), s=size, dim=(1, 2, 3)
    )
    return products[(slice(None),) + window] / (norms.view(-1, 1, 1, 1) * local_std[None])


class TemplateMatcher:
    """Finds where (and how turned) an upload best matches ``volume`` (the template or a rebuild)."""

    def __init__(self, volume: np.ndarray, patch_size: int, orientations: int, coarse: int = 4, lattice=()):
        torch = _torch()
        self.patch = int(patch_size)
        self.codes = list(range(orientations))
        self.coarse = coarse
        # Padded by a patch on every side: secret lattices cut patches that reach past the volume's edge.
        self.pad = self.patch
        self.volume = np.pad(np.asarray(volume, dtype=np.float32), self.pad)
        self.coarse_volume = _pool(self.volume, coarse)[0]
        n = self.patch // coarse
        self.coarse_valid = tuple(s - n + 1 for s in self.coarse_volume.shape)
        self.lattice = np.array(lattice, dtype=np.int64).reshape(-1, 3)
        if len(self.lattice):
            self._lattice_patches = self._reference_patches(self.lattice)
        self._torch = torch

    def _reference_patches(self, starts) -> np.ndarray:
        """Zero-mean, unit-norm reference patches at ``starts`` (pooled by 2: a lattice's points are 12 voxels
        apart)."""
        patches = np.stack(
            [self.volume[tuple(slice(s + self.pad, s + self.pad + self.patch) for s in start)] for start in starts]
        )
        pooled = _pool(patches, 2).reshape(len(starts), -1).numpy()
        pooled -= pooled.mean(axis=1, keepdims=True)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-6)

    def match(self, upload: np.ndarray, top: int = 3) -> tuple[float, tuple[int, int, int], int]:
        """(score, start on the model grid, orientation code) of the best match of one upload."""
        if len(self.lattice):
            return self._match_lattice(upload)
        torch = self._torch
        pooled = _pool(upload, self.coarse)[0].numpy()
        turned = torch.from_numpy(np.stack([np.ascontiguousarray(unorient(pooled, code)) for code in self.codes]))
        turned = turned - turned.mean(dim=(1, 2, 3), keepdim=True)
        scores = _ncc_maps(self.coarse_volume, turned, self.coarse_valid)
        values, flat = torch.topk(scores.flatten(), min(top, scores.numel()))
        best = (-2.0, (0, 0, 0), 0)
        for index in flat.tolist():
            code_index, rest = divmod(index, int(np.prod(self.coarse_valid)))
            position = np.unravel_index(rest, self.coarse_valid)
            start = tuple(int(p) * self.coarse - self.pad for p in position)
            best = max(best, self._refine(upload, start, self.codes[code_index]))
        return best

    def _match_lattice(self, upload):
        best = (-2.0, (0, 0, 0), 0)
        for code in self.codes:
            pooled = _pool(np.ascontiguousarray(unorient(upload, code)), 2).reshape(-1).numpy()
            pooled = pooled - pooled.mean()
            scores = self._lattice_patches @ (pooled / max(float(np.linalg.norm(pooled)), 1e-6))
            index = int(np.argmax(scores))
            best = max(best, (float(scores[index]), tuple(int(v) for v in self.lattice[index]), code))
        return best

    def _refine(self, upload, start, code):
        """Best 1 mm position within one coarse cell around ``start`` (FFT over the window)."""
        torch = self._torch
        radius = self.coarse
        low = [max(s + self.pad - radius, 0) for s in start]
        window = self.volume[
            tuple(slice(start, min(start + self.patch + 2 * radius, n)) for start, n in zip(low, self.volume.shape))
        ]
        valid = tuple(w - self.patch + 1 for w in window.shape)
        if min(valid) < 1:
            return (-2.0, start, code)
        turned = torch.from_numpy(np.ascontiguousarray(unorient(upload, code), dtype=np.float32))[None]
        turned = turned - turned.mean()
        scores = _ncc_maps(torch.from_numpy(np.ascontiguousarray(window)), turned, valid)[0]
        index = int(torch.argmax(scores))
        offset = np.unravel_index(index, valid)
        return (float(scores.flatten()[index]), tuple(int(start + o - self.pad) for start, o in zip(low, offset)), code)


def place_all(uploads: np.ndarray, volume: np.ndarray, orientations: int, lattice=(), progress=None) -> Placement:
    matcher = TemplateMatcher(volume, uploads.shape[-1], orientations, lattice=lattice)
    starts, codes, scores = [], [], []
    for n, upload in enumerate(uploads):
        score, start, code = matcher.match(upload)
        starts.append(start), codes.append(code), scores.append(score)
        if progress is not None and n % 64 == 0:
            progress(f"placing uploads on the template ({n}/{len(uploads)})", n / len(uploads))
    return Placement(
        np.array(starts, dtype=np.int64).reshape(-1, 3),
        np.array(codes, dtype=np.int64),
        np.array(scores, dtype=np.float32),
    )


def same_turn(code_a: int, code_b: int, relative: int) -> bool:
    """Whether turning by ``code_a`` then ``relative`` equals turning by ``code_b``."""
    probe = np.arange(27.0).reshape(3, 3, 3)
    return bool(np.array_equal(orient(orient(probe, code_a), relative), orient(probe, code_b)))


def placement_accuracy(placement: Placement, truth, step: int) -> dict:
    """Shares of real (non-decoy) uploads placed exactly, and within ``step`` voxels, with the right orientation."""
    real = truth.copy >= 0
    distance = np.abs(placement.start - truth.start).max(axis=1)
    turned_right = placement.orientation == truth.orientation
    return {
        "uploads_scored": int(real.sum()),
        "placed_exactly": float(np.mean((distance == 0) & turned_right & real) / max(real.mean(), 1e-9)),
        "placed_within_one_step": float(np.mean((distance <= step) & turned_right & real) / max(real.mean(), 1e-9)),
        "orientation_right": float(np.mean(turned_right[real])) if real.any() else float("nan"),
        "step_voxels": int(step),
    }


def pair_uploads(uploads: np.ndarray, query: int, orientations: int, factor: int = 2, min_overlap: float = 0.4):
    """Best partner of upload ``query`` by overlap correlation over every relative offset and orientation, at
    ``factor`` mm. Returns (partner, relative orientation code, score)."""
    torch = _torch()
    n = uploads.shape[-1] // factor
    size = [2 * n] * 3
    others = _pool(uploads, factor)
    others = others - others.mean(dim=(1, 2, 3), keepdim=True)
    spectrum_b = torch.fft.rfftn(others, s=size, dim=(1, 2, 3))
    spectrum_b2 = torch.fft.rfftn(others * others, s=size, dim=(1, 2, 3))
    ones = torch.fft.rfftn(torch.ones((n, n, n)), s=size)
    count = torch.fft.irfftn(ones * torch.conj(ones), s=size).round().clamp_min(1)
    valid = count >= min_overlap * n**3
    query_pooled = others[query].numpy()
    # The partners' windowed sums do not depend on how the query is turned: once, not per orientation.
    sum_b = torch.fft.irfftn(ones[None] * torch.conj(spectrum_b), s=size, dim=(1, 2, 3))
    sum_b2 = torch.fft.irfftn(ones[None] * torch.conj(spectrum_b2), s=size, dim=(1, 2, 3))
    best = (-2.0, -1, 0)
    for code in range(orientations):
        a = torch.from_numpy(np.ascontiguousarray(orient(query_pooled, code)))
        spectrum_a, spectrum_a2 = torch.fft.rfftn(a, s=size), torch.fft.rfftn(a * a, s=size)
        products = torch.fft.irfftn(spectrum_a[None] * torch.conj(spectrum_b), s=size, dim=(1, 2, 3))
        sum_a = torch.fft.irfftn(spectrum_a * torch.conj(ones), s=size)[None]
        sum_a2 = torch.fft.irfftn(spectrum_a2 * torch.conj(ones), s=size)[None]
        covariance = products - sum_a * sum_b / count
        variance = (sum_a2 - sum_a * sum_a / count).clamp_min(1e-6) * (sum_b2 - sum_b * sum_b / count).clamp_min(1e-6)
        scores = torch.where(valid[None], covariance / torch.sqrt(variance), torch.tensor(-2.0))
        scores[query] = -2.0
        value, index = torch.max(scores.flatten(), 0)
        partner = int(index) // int(np.prod(size))
        best = max(best, (float(value), partner, code))
    return best[1], best[2], best[0]


def pairing_accuracy(
    uploads: np.ndarray,
    truth,
    orientations: int,
    queries: int,
    rng: np.random.Generator,
    factor: int = 2,
    progress=None,
) -> dict:
    """Share of sampled real uploads whose best overlap partner truly overlaps them (≥ a quarter of a patch) with
    the right relative orientation."""
    real = np.nonzero(truth.copy >= 0)[0]
    chosen = rng.choice(real, size=min(queries, len(real)), replace=False)
    size = uploads.shape[-1]
    hits = []
    for n, query in enumerate(chosen):
        if progress is not None:
            progress(f"pairing uploads by their overlaps ({n}/{len(chosen)})", n / len(chosen))
        partner, code, _ = pair_uploads(uploads, int(query), orientations, factor)
        overlap = np.prod(np.clip(size - np.abs(truth.start[partner] - truth.start[query]), 0, None)) / size**3
        hits.append(
            bool(
                truth.copy[partner] >= 0
                and overlap >= 0.25
                and same_turn(int(truth.orientation[query]), int(truth.orientation[partner]), code)
            )
        )
    return {
        "queries": len(chosen),
        "true_neighbour_first": float(np.mean(hits)) if hits else float("nan"),
        "resolution_mm": factor,
    }


def orientation_count() -> int:
    return len(ORIENTATIONS)
