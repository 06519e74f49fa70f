"""Scoring watermark candidates for the search: each candidate is the logo blended into the image at (alpha, x, y),
and what matters is what the classifiers make of it.

Each candidate is rendered with the blending module's own eq. 1 (``blend_terms`` + ``composite``, what
``blend_batch`` does), but only over the logo's area: since resizing is linear, the model input of a watermarked
image is the resized clean image plus the resized change under the logo, ``Ry @ delta @ Rx.T`` with ``Ry``/``Rx``
the resize as matrices. That is the same input (to float rounding) as rendering the whole image and resizing it, at
a small fraction of the cost on large photographs.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .models import ServedModel, logits_of


class SearchCancelled(Exception):
    """The client went away: the search stops at its next batch."""


class CandidateScorer:
    """``score(params) -> (objective, fooled)`` for the optimiser: renders the logo area, classifies in batches."""

    def __init__(
        self, wm, models: list[ServedModel], image: np.ndarray, fitted, window: tuple[int, int], cancel: threading.Event
    ):
        import torch

        self.wm, self.models, self.image, self.fitted, self.window, self.cancel = (
            wm,
            models,
            image,
            fitted,
            window,
            cancel,
        )
        self.device = wm.device
        self.target, self.weights = 0, None
        height, width = image.shape[:2]
        # The full-size clean image is resized once per input size on the CPU, so a large photograph never
        # occupies GPU memory; only the small resized copies and the resize matrices live on the device.
        # Its window is applied (and clipped) before resizing, like for the rendered candidates below.
        base = torch.from_numpy(self._view(image))[None]
        self.resizers: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        with torch.inference_mode():
            for size in {m.size for m in models}:
                self.resizers[size] = (
                    resize_matrix(height, size[0], self.device),
                    resize_matrix(width, size[1], self.device),
                    resize(base, size).to(self.device),
                )

    def _view(self, image: np.ndarray) -> np.ndarray:
        from ...watermark.blending import unit_view

        return unit_view(image, self.window)

    def full_probabilities(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Per-model probabilities (1, C) of one whole image, through the same path as /classify."""
        return self.wm.classify_array(self.models, self._view(image)[None])

    def __call__(self, params: np.ndarray):
        from ...watermark.optimizer import ensemble_objective

        batch = self.wm.service.config.inference_batch
        probs = np.empty((len(self.models), len(params), self.models[0].classes or 2), dtype=np.float64)
        for start in range(0, len(params), batch):
            if self.cancel.is_set():
                raise SearchCancelled()
            chunk = params[start : start + batch]
            for k, model_probs in enumerate(self._score_chunk(chunk)):
                probs[k, start : start + len(chunk)] = model_probs
        return ensemble_objective(probs, self.target, self.weights)

    def _score_chunk(self, params: np.ndarray) -> list[np.ndarray]:
        import torch

        from ...watermark.blending import blend_terms, composite

        h, w = self.fitted.size
        deltas = np.empty((len(params), 1 if self.image.ndim == 2 else 3, h, w), dtype=np.float32)
        for i, (alpha, x, y) in enumerate(params):
            region = self.fitted.region(int(x), int(y))
            original = self.image[region]
            a, b = blend_terms(self.fitted, alpha, self.image.ndim, self.image.dtype, self.window)
            # The change as the classifiers see it: windowed (and clipped) rendered minus windowed original.
            deltas[i] = self._view(composite(original, a, b, self.image.dtype)) - self._view(original)
        xs = torch.as_tensor(params[:, 1].astype(np.int64), device=self.device)
        ys = torch.as_tensor(params[:, 2].astype(np.int64), device=self.device)
        out = []
        with self.wm.service.inference_lock, torch.inference_mode():
            delta = torch.from_numpy(deltas).to(self.device)
            for model in self.models:
                ry, rx, base = self.resizers[model.size]
                rows = ry[:, ys[:, None] + torch.arange(h, device=self.device)].permute(1, 0, 2)  # (m, Hm, h)
                cols = rx[:, xs[:, None] + torch.arange(w, device=self.device)].permute(1, 0, 2)  # (m, Wm, w)
                change = rows[:, None] @ delta @ cols[:, None].transpose(-1, -2)  # (m, C, Hm, Wm)
                x = three_channels((base + change).clamp_(0.0, 1.0))
                net = self.wm.models.ensure_loaded(model, self.device)
                logits = logits_of(net(x))
                if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
        return out


def resize(x, size):
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_matrix(n_in: int, n_out: int, device: str, block: int = 1024):
    """(n_out, n_in) matrix R with R @ v = the 1D resize that ``resize`` applies along one axis (it is separable).

    Column i is the resize of the i-th unit vector; they are resized ``block`` at a time so that a 16k-pixel side
    needs 64 MiB rather than a 1 GiB identity matrix.
    """
    import torch

    columns = []
    for start in range(0, n_in, block):
        count = min(block, n_in - start)
        units = torch.zeros((count, 1, 1, n_in), dtype=torch.float32, device=device)
        units[torch.arange(count), 0, 0, start + torch.arange(count)] = 1.0
        columns.append(resize(units, (1, n_out)).reshape(count, n_out))
    return torch.cat(columns).T.contiguous()


def three_channels(x):
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
