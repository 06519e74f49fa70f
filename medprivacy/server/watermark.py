"""MedLocker endpoints: classify images, find lesions, and search a watermark next to the models.

Models. Manifest entries with role "server" and ``task`` "classify" (2D classifiers: float32 (N, 3, H, W) in
[0, 1] -> logits (N, C)) or "segment-lesion" (-> lesion logits (N, 2, H, W)) are served when present; their
``patch_size`` [H, W] is the input size, and every image is resized to it on the server (bilinear, antialiased
when shrinking). Operators add their own classifiers with ``--extra-classifier NAME=model.pt[:HxW]``: a
TorchScript file, which is a program the server runs, so load only files you trust.

Endpoints (same bearer token, size limit, API-version header and one-line JSON errors as the rest of the server):

``POST /v1/watermark/classify[?models=a,b]``
    Body: a wire tensor (N, 3, H, W) (or (N, 1, H, W) gray), uint8 or float16, values in [0, 1], any H and W.
    Answer (JSON): ``{"count": N, "models": {name: {"labels": {...}, "probabilities": [[p_0, ..., p_C-1], ...],
    "predicted": [class, ...]}}}``. Default: every classifier.
``POST /v1/watermark/lesions[?model=name]``
    Body: a wire tensor (N, 3 or 1, H, W) as above. Answer: a wire tensor (N, 1, H, W) with the lesion
    probability at the image's own size, uint8 codes or float16 (``X-MedPrivacy-Response-Dtype``).
``POST /v1/watermark/optimize``
    One request per image, JSON: ``{"image": <wire>, "logo": <wire>, "mask": <wire, optional>, "params": {...}}``
    where <wire> is a base64 string of a wire tensor. ``image``: (1, C, H, W) with C = 1 (gray) or 3 (RGB), the
    exact pixels: uint8 for 8-bit images, float32 k/65535 for 16-bit ones. ``logo``: (1, 4, h, w) uint8 RGBA
    (1-3 channels also accepted). ``mask``: (1, 1, H, W), nonzero = lesion. ``params`` (all optional):

    ======================  ==================================  =============================================
    key                     paper / default                     meaning
    ======================  ==================================  =============================================
    mode                    "keep-out"                          keep-out | keep-in | wap (see boxes.py)
    lesions                 mask if sent, else server for       where lesion boxes come from: mask | server |
                            keep-in/keep-out when it has a      none
                            segmenter, else none
    mask_threshold          0.5                                 lesion probability counted as lesion
    mask_params             paper's, scaled to the image        {kernel, iterations, min_area, gamma}
    models, weights         every classifier*, equal            source models and beta_i of eq. 8
    sl                      sl = 4                              logo scale (eq. 2)
    population              Np = 50
    generations             Ng = 3
    crossover_rate          CR = 0.9
    step                    s = 10 (pixels)
    local_iterations        Niter = 3
    alpha_range             [100, 255]
    alpha_step              step scaled to the alpha range
    mutation                "basin-hopping"                     basin-hopping | random
    seed                    none (fresh randomness)
    label                   none: each model's own clean        the true class, moved away from by every
                            prediction                          model
    max_evaluations         none (server cap MAX_EVALUATIONS)
    window                  [0, 255] or [0, 65535]              intensity window [low, high] in pixel values:
                                                                the logo's black/white and the classifiers' 0/1
    ======================  ==================================  =============================================

    Every parameter has a type and bounds (``schema.OptimizeParams``); anything else is refused with a 422.

    * by default the largest group of classifiers with the same number of classes (a user's 3-class model is not
      mixed into the 2-class ensemble).

    Answer (JSON): ``params`` {alpha, x, y, sl}, ``logo_size`` [h, w], ``objective``, ``fooled``,
    ``evaluations``, ``stop_reason``, ``target`` (the label, or null), ``targets`` {model: class it was pushed away
    from}, ``target_source`` ("label" | "clean-prediction": each model's own answer on the clean image), ``models``,
    ``weights``, ``before`` / ``after`` {model: {probabilities, predicted}} on the clean and the watermarked image,
    ``history`` [{generation, evaluations, best_objective, population_mean, fooled}], ``mode``, ``lesion_source``,
    ``lesion_boxes`` [[x, y, w, h], ...] (the boxes that constrained the positions; none for wap), ``elapsed_s``.

Search. ``optimizer.optimize_watermark`` runs here, next to the models, so candidates never travel. Each
candidate is rendered with the blending module's own eq. 1 (``blend_terms`` + ``composite``, what ``blend_batch``
does), but only over the logo's area: since resizing is linear, the model input of a watermarked image is the
resized clean image plus the resized change under the logo, ``Ry @ delta @ Rx.T`` with ``Ry``/``Rx`` the resize
as matrices. That is the same input (to float rounding) as rendering the whole image and resizing it, at a small
fraction of the cost on large photographs. The reported ``after`` predictions come from the fully rendered image.
If the client disconnects, the search stops at its next batch.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..transport.wire import CONTENT_TYPE, decode_tensor_raw, encode_tensor_raw, to_float32
from .app import _HTTPError
from .schema import ClassifyQuery, LesionsQuery, NoQuery, OptimizeRequest, parse_json, parse_query

log = logging.getLogger("medprivacy.server")

TASK_CLASSIFY = "classify"
TASK_SEGMENT = "segment-lesion"
CLASSIFY_PATH = "/v1/watermark/classify"
LESIONS_PATH = "/v1/watermark/lesions"
OPTIMIZE_PATH = "/v1/watermark/optimize"
#: One search may not occupy the models longer than this many candidate evaluations (the paper's settings need 650).
MAX_EVALUATIONS = 20_000
#: Larger sides are not photographs but mistakes (or attempts to exhaust memory).
MAX_IMAGE_SIDE = 16384
DEFAULT_SIZE = (224, 224)
_RANGE_SLACK = 1e-3


# --- configuration ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtraClassifier:
    """A user's TorchScript classifier: float32 (N, 3, H, W) in [0, 1] -> logits (N, C)."""

    name: str
    path: Path
    size: tuple[int, int] = DEFAULT_SIZE


_EXTRA_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})=(?P<path>.+?)(?::(?P<h>\d+)x(?P<w>\d+))?$")


def parse_extra_classifier(text: str) -> ExtraClassifier:
    """``NAME=path.pt[:HxW]`` -> ExtraClassifier (input size default 224x224); checks the file is readable."""
    match = _EXTRA_RE.match(str(text).strip())
    if not match:
        raise InputError(f"--extra-classifier {text!r} must look like NAME=model.pt or NAME=model.pt:224x224 "
                         "(NAME: letters, digits, '.', '_', '-')")
    path = Path(match["path"]).expanduser()
    if not path.is_file():
        raise InputError(f"--extra-classifier {match['name']}: {path} does not exist; give a TorchScript file (torch.jit.save)")
    size = (int(match["h"]), int(match["w"])) if match["h"] else DEFAULT_SIZE
    if not (1 <= size[0] <= 4096 and 1 <= size[1] <= 4096):
        raise InputError(f"--extra-classifier {match['name']}: input size {size[0]}x{size[1]} must lie between 1x1 and 4096x4096")
    return ExtraClassifier(match["name"], path, size)


class _Model:
    def __init__(self, name: str, task: str, size, labels: dict[str, str], sha256: str, arch: str,
                 spec=None, script: Path | None = None):
        self.name, self.task, self.labels, self.sha256, self.arch = name, task, labels, sha256, arch
        self.size = (int(size[0]), int(size[1]))
        self.spec, self.script = spec, script
        self.net = None
        self.classes = len(labels) if labels else None

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": CLASSIFY_PATH if self.task == TASK_CLASSIFY else LESIONS_PATH,
            "task": self.task,
            "patch_size": list(self.size),
            "labels": dict(self.labels),
            "sha256": self.sha256,
            "arch": self.arch,
            "in_channels": 3,
            "out_channels": self.classes,
        }


class WatermarkModels:
    """The MedLocker models one server holds: classifiers by name and lesion segmenters by name."""

    def __init__(self, entries: dict[str, Any], models_dir: Path, extra: tuple[ExtraClassifier, ...] = ()):
        from ..nets.registry import ModelSpec, file_sha256

        self.models_dir = models_dir
        self.classifiers: dict[str, _Model] = {}
        self.segmenters: dict[str, _Model] = {}
        for name, entry in sorted(entries.items()):
            task = entry.get("task") if isinstance(entry, dict) else None
            if task not in (TASK_CLASSIFY, TASK_SEGMENT) or entry.get("role") != "server":
                continue
            try:
                spec = ModelSpec.from_json(name, entry)
                size = [int(v) for v in spec.patch_size]
                arch = str(spec.arch["name"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"manifest entry {name!r} is incomplete ({type(exc).__name__}: {exc}); restore manifest.json") from None
            if len(size) != 2 or min(size) < 1:
                raise InputError(f"manifest entry {name!r} has patch_size {spec.patch_size}; a 2D model needs [H, W]")
            model = _Model(name, task, size, {str(k): str(v) for k, v in spec.labels.items()}, spec.sha256, arch, spec=spec)
            (self.classifiers if task == TASK_CLASSIFY else self.segmenters)[name] = model
        for item in extra:
            if item.name in self.classifiers or item.name in self.segmenters or item.name in entries:
                raise InputError(f"--extra-classifier name {item.name!r} is already a model of this server; choose another name")
            self.classifiers[item.name] = _Model(item.name, TASK_CLASSIFY, item.size, {}, file_sha256(item.path), "torchscript",
                                                 script=item.path)

    def __bool__(self) -> bool:
        return bool(self.classifiers or self.segmenters)

    def all(self) -> list[_Model]:
        return [*self.classifiers.values(), *self.segmenters.values()]

    def describe(self) -> dict[str, Any]:
        return {m.name: m.describe() for m in self.all()}

    def ensure_loaded(self, model: _Model, device: str):
        """Load ``model`` (caller holds the inference lock)."""
        if model.net is not None:
            return model.net
        started = time.perf_counter()
        if model.script is not None:
            model.net = _load_torchscript(model, device)
        else:
            from ..nets.registry import load_model

            model.net, _ = load_model(model.name, self.models_dir, device)
        log.info("loaded %s (%s, %s) on %s in %.1f s", model.name, model.arch, model.task, device, time.perf_counter() - started)
        return model.net


def _load_torchscript(model: _Model, device: str):
    import torch

    try:
        net = torch.jit.load(str(model.script), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or its own types for a non-TorchScript file
        raise InputError(f"--extra-classifier {model.name}: {model.script} is not a TorchScript file "
                         f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}); save it with torch.jit.save") from None
    net.eval()
    # One probe now, so a wrong input size or output shape stops the server at startup, not a user's request.
    try:
        with torch.inference_mode():
            out = _logits(net(torch.zeros((1, 3, *model.size), device=device)))
    except Exception as exc:
        raise InputError(f"--extra-classifier {model.name}: the model fails on a 1x3x{model.size[0]}x{model.size[1]} input "
                         f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__}); give its input size as :HxW") from None
    if out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        raise InputError(f"--extra-classifier {model.name}: the model returns shape {tuple(out.shape)}; a classifier must return logits (N, C) with C >= 2")
    model.classes = int(out.shape[1])
    model.labels = {str(i): f"class {i}" for i in range(model.classes)}
    return net


def _logits(out):
    # Some networks (e.g. ViT) return (logits, extras).
    return out[0] if isinstance(out, (tuple, list)) else out


# --- the service -----------------------------------------------------------------------------------------------

class _Cancelled(Exception):
    pass


class WatermarkService:
    """MedLocker requests against the models of an ``InferenceService`` (its device, lock and limits)."""

    def __init__(self, service, models: WatermarkModels):
        self.service = service
        self.models = models

    @property
    def device(self) -> str:
        return self.service.device

    def load(self) -> None:
        with self.service._inference_lock:
            for model in self.models.all():
                self.models.ensure_loaded(model, self.device)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _pick_classifiers(self, names) -> list[_Model]:
        if not self.models.classifiers:
            raise _HTTPError(404, "watermark classification is not available: this server holds no classifier "
                                  "(task 'classify' in the manifest, or --extra-classifier)")
        if names is None or names == [] or names == "":
            return list(self.models.classifiers.values())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _HTTPError(422, "models must be a list of classifier names")
        unknown = [n for n in names if n not in self.models.classifiers]
        if unknown:
            raise _HTTPError(422, f"unknown classifier(s) {', '.join(map(repr, unknown[:5]))}; this server has "
                                  f"{', '.join(self.models.classifiers) or 'none'}")
        return [self.models.classifiers[n] for n in dict.fromkeys(names)]

    def _pick_segmenter(self, name: str | None) -> _Model:
        if not self.models.segmenters:
            raise _HTTPError(404, "watermark lesion segmentation is not available: this server holds no lesion segmenter "
                                  "(task 'segment-lesion' in the manifest)")
        if name is None or name == "":
            return next(iter(self.models.segmenters.values()))
        if name not in self.models.segmenters:
            raise _HTTPError(422, f"unknown lesion segmenter {name!r}; this server has {', '.join(self.models.segmenters)}")
        return self.models.segmenters[name]

    def _decode(self, body: bytes, what: str):
        try:
            return decode_tensor_raw(body, max_elements=self.service.config.max_request_bytes)
        except InputError as exc:
            raise _HTTPError(422, f"{what} is not a valid MedPrivacy tensor: {exc}") from None

    def _images(self, body: bytes, kind: str) -> np.ndarray:
        """(N, 3 or 1, H, W) uint8 or float16 wire tensor -> float32 (N, C, H, W) in [0, 1]."""
        raw, header = self._decode(body, "request body")
        self.service.audit(kind, raw)
        if header["dtype"] not in ("uint8", "float16"):
            raise _HTTPError(422, f"images arrived as {header['dtype']}; send uint8 or float16 values in [0, 1]")
        if raw.ndim != 4 or raw.shape[1] not in (1, 3) or raw.shape[0] < 1:
            raise _HTTPError(422, f"images have shape {list(raw.shape)}; expected (N, 3, H, W) RGB or (N, 1, H, W) gray with N >= 1")
        _check_side(raw.shape[2:], "image")
        images = to_float32(raw)
        if header["dtype"] == "float16" and images.size and (images.min() < -_RANGE_SLACK or images.max() > 1 + _RANGE_SLACK):
            raise _HTTPError(422, f"image values span [{images.min():.3g}, {images.max():.3g}]; send intensities scaled to [0, 1]")
        return np.clip(images, 0.0, 1.0)

    def _probabilities(self, model: _Model, x):
        """Class probabilities (N, C) float32 tensor for float32 images x (N, 3, H, W) on the device; lock held."""
        import torch

        net = self.models.ensure_loaded(model, self.device)
        logits = _logits(net(_resize(x, model.size)))
        if logits.ndim != 2 or logits.shape[0] != x.shape[0] or (model.classes is not None and logits.shape[1] != model.classes):
            raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
        return torch.softmax(logits.float(), dim=1)

    def _classify_array(self, models: list[_Model], images: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities per model, (N, C) float64, for float32 images (N, C, H, W) in [0, 1]."""
        import torch

        batch = self.service.config.inference_batch
        out: dict[str, list[np.ndarray]] = {m.name: [] for m in models}
        for start in range(0, images.shape[0], batch):
            with self.service._inference_lock, torch.inference_mode():
                x = _three_channels(torch.from_numpy(images[start:start + batch]).to(self.device))
                for model in models:
                    out[model.name].append(self._probabilities(model, x).cpu().numpy().astype(np.float64))
        return {name: np.concatenate(parts) for name, parts in out.items()}

    # -- endpoints -------------------------------------------------------------------------------------------
    def classify(self, body: bytes, names: str | None) -> dict[str, Any]:
        models = self._pick_classifiers(names)
        images = self._images(body, "classify")
        started = time.perf_counter()
        probs = self._classify_array(models, images)
        log.info("watermark classify: %d images %s with %s in %.2f s", images.shape[0], "x".join(map(str, images.shape[2:])),
                 ", ".join(m.name for m in models), time.perf_counter() - started)
        return {"count": int(images.shape[0]), "models": {m.name: _prediction(m, probs[m.name]) for m in models}}

    def lesions(self, body: bytes, name: str | None, response_dtype: str) -> bytes:
        model = self._pick_segmenter(name)
        images = self._images(body, "lesions")
        started = time.perf_counter()
        masks = self._lesion_probability(model, images)
        log.info("watermark lesions: %d images %s in %.2f s", images.shape[0], "x".join(map(str, images.shape[2:])), time.perf_counter() - started)
        if response_dtype == "uint8":
            return encode_tensor_raw(np.rint(masks * 255.0).astype(np.uint8))
        return encode_tensor_raw(masks.astype(np.float16))

    def _lesion_probability(self, model: _Model, images: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 lesion probability at the images' own size."""
        import torch

        out = np.empty((images.shape[0], 1, *images.shape[2:]), dtype=np.float32)
        batch = self.service.config.inference_batch
        for start in range(0, images.shape[0], batch):
            with self.service._inference_lock, torch.inference_mode():
                net = self.models.ensure_loaded(model, self.device)
                x = _three_channels(torch.from_numpy(images[start:start + batch]).to(self.device))
                logits = _logits(net(_resize(x, model.size)))
                if logits.ndim != 4 or logits.shape[0] != x.shape[0] or logits.shape[1] < 2:
                    raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
                lesion = torch.softmax(logits.float(), dim=1)[:, 1:2]
                out[start:start + batch] = _resize(lesion, images.shape[2:]).clamp(0.0, 1.0).cpu().numpy()
        return out

    def optimize(self, body: bytes, cancel: threading.Event) -> dict[str, Any]:
        from ..watermark import blending, boxes
        from ..watermark.optimizer import ensemble_objective, optimize_watermark

        started = time.perf_counter()
        request = self._optimize_request(body)
        params = request["params"]
        image, logo, mask = request["image"], request["logo"], request["mask"]
        models = self._pick_classifiers(params.get("models"))
        with self.service._inference_lock:
            for model in models:  # a TorchScript model knows its number of classes only once loaded
                self.models.ensure_loaded(model, self.device)
        if not params.get("models"):
            models = _same_classes(models)
        classes = {m.classes for m in models}
        if len(classes) != 1:
            raise _HTTPError(422, "the chosen classifiers predict different numbers of classes; pick models with the same labels")
        weights = _weights(params.get("weights"), len(models))
        options = _search_options(params)
        try:
            window = blending.check_window(params.get("window"), image.dtype)
            fitted = blending.fit_logo(logo, image.shape, params.get("sl", blending.DEFAULT_SL))
            mode = boxes.normalize_mode(params.get("mode", boxes.DEFAULT_MODE))
            lesion_source, lesion_mask = self._lesion_mask(params, mode, image, mask, window)
            found = []
            if lesion_mask is not None and mode != "wap":
                mask_params = _mask_params(params.get("mask_params"), image.shape)
                found = boxes.lesion_boxes(lesion_mask, mask_params)
            placement = boxes.Placement(mode, image.shape, fitted.size, found)
            if mode == "wap":
                lesion_source = "none"  # positions are unconstrained, whatever was sent
        except InputError as exc:
            raise _HTTPError(422, str(exc)) from None

        scorer = _CandidateScorer(self, models, image, fitted, window, cancel)
        clean = scorer.full_probabilities(image)
        label = params.get("label")
        classes = models[0].classes or clean[models[0].name].shape[1]
        if label is None:
            # Without a label, each model is pushed away from its own clean answer: a shared target (the ensemble's
            # vote) would push the models that voted otherwise towards it, which may be the true class.
            targets, target_source = [int(np.argmax(clean[m.name][0])) for m in models], "clean-prediction"
        else:
            if not 0 <= int(label) < classes:
                raise _HTTPError(422, f"label {label!r} must be a class index between 0 and {classes - 1}")
            targets, target_source = [int(label)] * len(models), "label"
        scorer.target, scorer.weights = np.asarray(targets), weights
        try:
            result = optimize_watermark(scorer, placement, rng=params.get("seed"), **options)
        except InputError as exc:
            raise _HTTPError(422, str(exc)) from None
        alpha, x, y = result.alpha, result.x, result.y
        protected = blending.blend(image, fitted, alpha, x, y, window)
        after = scorer.full_probabilities(protected)
        objective_after, _ = ensemble_objective(np.stack([after[m.name] for m in models]), targets, weights)
        if abs(float(objective_after[0]) - result.objective) > 1e-3:
            log.warning("watermark search objective %.5f differs from the rendered image's %.5f", result.objective, float(objective_after[0]))
        elapsed = time.perf_counter() - started
        log.info("watermark optimize: %s image %dx%d, %s, %d evaluations, %s, fooled=%s in %.1f s", "RGB" if image.ndim == 3 else "gray",
                 image.shape[1], image.shape[0], mode, result.evaluations, result.stop_reason, result.fooled, elapsed)
        return {
            "params": {"alpha": float(alpha), "x": int(x), "y": int(y), "sl": float(params.get("sl", blending.DEFAULT_SL)),
                       "window": list(window)},
            "logo_size": list(fitted.size),
            "objective": float(result.objective),
            "fooled": bool(result.fooled),
            "evaluations": int(result.evaluations),
            "stop_reason": result.stop_reason,
            "target": int(label) if label is not None else None,
            "targets": {m.name: t for m, t in zip(models, targets)},
            "target_source": target_source,
            "models": [m.name for m in models],
            "weights": [float(w) for w in weights],
            "before": {m.name: _prediction(m, clean[m.name]) for m in models},
            "after": {m.name: _prediction(m, after[m.name]) for m in models},
            "history": [
                {"generation": h.generation, "evaluations": h.evaluations, "best_objective": _finite(h.best_objective),
                 "population_mean": _finite(h.population_mean), "fooled": bool(h.fooled)}
                for h in result.history
            ],
            "mode": mode,
            "lesion_source": lesion_source,
            "lesion_boxes": [[int(v) for v in box] for box in placement.lesions],
            "elapsed_s": round(elapsed, 3),
        }

    def _optimize_request(self, body: bytes) -> dict[str, Any]:
        request = parse_json(body, OptimizeRequest)
        params = request.params.given() if request.params is not None else {}
        image = self._exact_image(self._field(request.image, "image"))
        self.service.audit("optimize-image", image)
        logo = self._logo(self._field(request.logo, "logo"))
        mask = None
        if request.mask is not None:
            mask = self._mask(self._field(request.mask, "mask"), image.shape)
            self.service.audit("optimize-mask", mask.astype(np.uint8))
        return {"image": image, "logo": logo, "mask": mask, "params": params}

    def _field(self, text: str, name: str):
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _HTTPError(422, f"{name} is not valid base64") from None
        return self._decode(data, name)

    @staticmethod
    def _exact_image(decoded) -> np.ndarray:
        raw, header = decoded
        if raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] not in (1, 3):
            raise _HTTPError(422, f"image has shape {list(raw.shape)}; expected (1, C, H, W) with C = 1 (gray) or 3 (RGB)")
        _check_side(raw.shape[2:], "image")
        if header["dtype"] == "uint8":
            pixels = raw[0]
        elif header["dtype"] == "float32":
            # 16-bit pixels travel as k/65535 in float32, which holds every k exactly enough to round back.
            scaled = raw[0].astype(np.float64) * 65535.0
            pixels = np.rint(scaled)
            if scaled.size and (pixels.min() < 0 or pixels.max() > 65535 or np.abs(scaled - pixels).max() > 0.01):
                raise _HTTPError(422, "a float32 image must hold 16-bit pixels as k/65535 (k = 0..65535)")
            pixels = pixels.astype(np.uint16)
        else:
            raise _HTTPError(422, "image arrived as float16, which cannot carry exact pixels; send 8-bit images as uint8 and 16-bit ones as float32 k/65535")
        pixels = np.moveaxis(pixels, 0, -1)
        return np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)

    @staticmethod
    def _logo(decoded) -> np.ndarray:
        from ..watermark.blending import as_rgba

        raw, header = decoded
        if header["dtype"] != "uint8" or raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] not in (1, 2, 3, 4):
            raise _HTTPError(422, f"logo has shape {list(raw.shape)} {header['dtype']}; expected (1, 4, h, w) uint8 RGBA")
        _check_side(raw.shape[2:], "logo")
        try:
            return as_rgba(np.moveaxis(raw[0], 0, -1))
        except InputError as exc:
            raise _HTTPError(422, str(exc)) from None

    @staticmethod
    def _mask(decoded, shape) -> np.ndarray:
        raw, _ = decoded
        if raw.ndim == 4 and raw.shape[:2] == (1, 1):
            raw = raw[0, 0]
        if raw.ndim != 2 or tuple(raw.shape) != tuple(shape[:2]):
            raise _HTTPError(422, f"lesion mask has shape {list(raw.shape)}; expected (1, 1, {shape[0]}, {shape[1]}) like the image")
        return raw != 0

    def _lesion_mask(self, params: dict, mode: str, image: np.ndarray, mask, window):
        source = params.get("lesions")
        if source is None:
            source = "mask" if mask is not None else ("server" if mode != "wap" and self.models.segmenters else "none")
        if source == "mask":
            if mask is None:
                raise _HTTPError(422, "lesions=mask but the request has no mask; send one or use lesions=server")
            return source, mask
        if source == "server" and mode != "wap":
            threshold = params.get("mask_threshold", 0.5)
            segmenter = self._pick_segmenter(None)
            from ..watermark.blending import unit_view

            return source, self._lesion_probability(segmenter, unit_view(image, window)[None])[0, 0] >= float(threshold)
        return source, None


class _CandidateScorer:
    """``score(params) -> (objective, fooled)`` for the optimiser: renders the logo area, classifies in batches."""

    def __init__(self, wm: WatermarkService, models: list[_Model], image: np.ndarray, fitted, window: tuple[int, int],
                 cancel: threading.Event):
        import torch

        self.wm, self.models, self.image, self.fitted, self.window, self.cancel = wm, models, image, fitted, window, cancel
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
                self.resizers[size] = (_resize_matrix(height, size[0], self.device), _resize_matrix(width, size[1], self.device),
                                       _resize(base, size).to(self.device))

    def _view(self, image: np.ndarray) -> np.ndarray:
        from ..watermark.blending import unit_view

        return unit_view(image, self.window)

    def full_probabilities(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Per-model probabilities (1, C) of one whole image, through the same path as /classify."""
        return self.wm._classify_array(self.models, self._view(image)[None])

    def __call__(self, params: np.ndarray):
        from ..watermark.optimizer import ensemble_objective

        batch = self.wm.service.config.inference_batch
        probs = np.empty((len(self.models), len(params), self.models[0].classes or 2), dtype=np.float64)
        for start in range(0, len(params), batch):
            if self.cancel.is_set():
                raise _Cancelled()
            chunk = params[start:start + batch]
            for k, model_probs in enumerate(self._score_chunk(chunk)):
                probs[k, start:start + len(chunk)] = model_probs
        return ensemble_objective(probs, self.target, self.weights)

    def _score_chunk(self, params: np.ndarray) -> list[np.ndarray]:
        import torch

        from ..watermark.blending import blend_terms, composite

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
        with self.wm.service._inference_lock, torch.inference_mode():
            delta = torch.from_numpy(deltas).to(self.device)
            for model in self.models:
                ry, rx, base = self.resizers[model.size]
                rows = ry[:, ys[:, None] + torch.arange(h, device=self.device)].permute(1, 0, 2)  # (m, Hm, h)
                cols = rx[:, xs[:, None] + torch.arange(w, device=self.device)].permute(1, 0, 2)  # (m, Wm, w)
                change = rows[:, None] @ delta @ cols[:, None].transpose(-1, -2)  # (m, C, Hm, Wm)
                x = _three_channels((base + change).clamp_(0.0, 1.0))
                net = self.wm.models.ensure_loaded(model, self.device)
                logits = _logits(net(x))
                if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
        return out


# --- routes ----------------------------------------------------------------------------------------------------

def add_watermark_routes(app, service, *, require_token, check_api_version, read_body, response_dtype) -> None:
    """Register the MedLocker endpoints on ``app``; the dependencies are the server's own checks."""
    wm: WatermarkService = service.watermark

    @app.post(CLASSIFY_PATH, dependencies=[Depends(require_token)])
    async def watermark_classify(request: Request) -> JSONResponse:
        check_api_version(request)
        query = parse_query(request.query_params, ClassifyQuery)
        body = await read_body(request, CONTENT_TYPE)
        return JSONResponse(await run_in_threadpool(wm.classify, body, query.models))

    @app.post(LESIONS_PATH, dependencies=[Depends(require_token)])
    async def watermark_lesions(request: Request) -> Response:
        check_api_version(request)
        query = parse_query(request.query_params, LesionsQuery)
        dtype = response_dtype(request)
        body = await read_body(request, CONTENT_TYPE)
        answer = await run_in_threadpool(wm.lesions, body, query.model, dtype)
        return Response(content=answer, media_type=CONTENT_TYPE)

    @app.post(OPTIMIZE_PATH, dependencies=[Depends(require_token)])
    async def watermark_optimize(request: Request) -> JSONResponse:
        check_api_version(request)
        parse_query(request.query_params, NoQuery)
        body = await read_body(request, "application/json")
        cancel = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(wm.optimize, body, cancel))
        # A search can take minutes; a client that gave up should not keep the models busy.
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                cancel.set()
        try:
            return JSONResponse(task.result())
        except _Cancelled:
            log.info("watermark optimize: client disconnected, search stopped")
            return JSONResponse({"detail": "client disconnected; search stopped"}, status_code=499)


# --- small helpers ---------------------------------------------------------------------------------------------

def _resize(x, size):
    import torch.nn.functional as F

    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _resize_matrix(n_in: int, n_out: int, device: str, block: int = 1024):
    """(n_out, n_in) matrix R with R @ v = the 1D resize that ``_resize`` applies along one axis (it is separable).

    Column i is the resize of the i-th unit vector; they are resized ``block`` at a time so that a 16k-pixel side
    needs 64 MiB rather than a 1 GiB identity matrix.
    """
    import torch

    columns = []
    for start in range(0, n_in, block):
        count = min(block, n_in - start)
        units = torch.zeros((count, 1, 1, n_in), dtype=torch.float32, device=device)
        units[torch.arange(count), 0, 0, start + torch.arange(count)] = 1.0
        columns.append(_resize(units, (1, n_out)).reshape(count, n_out))
    return torch.cat(columns).T.contiguous()


def _three_channels(x):
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check_side(shape, what: str) -> None:
    if min(shape) < 1 or max(shape) > MAX_IMAGE_SIDE:
        raise _HTTPError(422, f"{what} is {'x'.join(map(str, shape))} pixels; sides must lie between 1 and {MAX_IMAGE_SIDE}")


def _prediction(model: _Model, probs: np.ndarray) -> dict[str, Any]:
    return {
        "labels": dict(model.labels),
        "probabilities": [[float(p) for p in row] for row in probs],
        "predicted": [int(i) for i in np.argmax(probs, axis=1)],
    }


def _same_classes(models: list[_Model]) -> list[_Model]:
    """The default ensemble: the largest group of classifiers that predict the same number of classes (eq. 8 adds
    their probabilities class by class); on a tie, the group of the first classifier."""
    groups: dict[Any, list[_Model]] = {}
    for model in models:
        groups.setdefault(model.classes, []).append(model)
    return max(groups.values(), key=len)


def _weights(weights, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    if len(weights) != count:
        raise _HTTPError(422, f"weights must be a list of {count} numbers, one per chosen model")
    beta = np.asarray(weights, dtype=np.float64)
    if (beta < 0).any() or not beta.sum() > 0:
        raise _HTTPError(422, "weights must be non-negative and not all zero")
    return beta


def _mask_params(given, shape):
    from ..watermark.boxes import MaskParams

    default = MaskParams.for_image(shape)
    if given is None:
        return default
    given = {k: v for k, v in given.items() if v is not None}  # bounds checked by the schema
    return MaskParams(kernel=int(given.get("kernel", default.kernel)), iterations=int(given.get("iterations", default.iterations)),
                      min_area=int(given.get("min_area", default.min_area)), gamma=float(given.get("gamma", default.gamma)))


def _search_options(params: dict) -> dict[str, Any]:
    """The optimiser's keyword arguments from validated ``params`` (types and bounds: schema.OptimizeParams)."""
    from ..watermark import optimizer

    options: dict[str, Any] = {
        "population": params.get("population", optimizer.DEFAULT_POPULATION),
        "generations": params.get("generations", optimizer.DEFAULT_GENERATIONS),
        "step": params.get("step", optimizer.DEFAULT_STEP),
        "local_iterations": params.get("local_iterations", optimizer.DEFAULT_LOCAL_ITERATIONS),
        "crossover_rate": params.get("crossover_rate", optimizer.DEFAULT_CROSSOVER_RATE),
        "mutation": params.get("mutation", "basin-hopping"),
    }
    low, high = params.get("alpha_range", optimizer.DEFAULT_ALPHA_BOUNDS)
    options["alpha_bounds"] = (float(low), float(high))
    if params.get("alpha_step") is not None:
        options["alpha_step"] = float(params["alpha_step"])
    requested = params.get("max_evaluations")
    if requested is not None and requested > MAX_EVALUATIONS:
        raise _HTTPError(422, f"max_evaluations must be a whole number between 1 and {MAX_EVALUATIONS} (this server's limit)")
    options["max_evaluations"] = MAX_EVALUATIONS if requested is None else int(requested)
    return options


def _finite(value: float):
    return float(value) if math.isfinite(value) else None
