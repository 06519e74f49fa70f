"""The watermark requests (classify, lesions, optimize) against the models of an ``InferenceService``: its device,
inference lock, limits and audit copy. The search itself (``watermark.optimizer``) runs here, next to the models,
so candidates never travel."""

from __future__ import annotations

import base64
import binascii
import logging
import math
import threading
import time
from typing import Any

import numpy as np

from ...errors import InputError
from ...transport.wire import decode_tensor_raw, encode_tensor_raw, to_float32
from ..schema import OptimizeRequest, RequestError, parse_json
from .models import ServedModel, WatermarkModels, logits_of
from .scoring import CandidateScorer, resize, three_channels

log = logging.getLogger("medprivacy.server")

#: One search may not occupy the models longer than this many candidate evaluations (the paper's settings need 650).
MAX_EVALUATIONS = 20_000
#: Larger sides are not photographs but mistakes (or attempts to exhaust memory).
MAX_IMAGE_SIDE = 16384
_RANGE_SLACK = 1e-3


class WatermarkService:
    """MedLocker requests against the models of an ``InferenceService`` (its device, lock and limits)."""

    def __init__(self, service, models: WatermarkModels):
        self.service = service
        self.models = models

    @property
    def device(self) -> str:
        return self.service.device

    def load(self) -> None:
        with self.service.inference_lock:
            for model in self.models.all():
                self.models.ensure_loaded(model, self.device)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _pick_classifiers(self, names) -> list[ServedModel]:
        if not self.models.classifiers:
            raise RequestError(
                404,
                "watermark classification is not available: this server holds no classifier "
                "(task 'classify' in the manifest, or --extra-classifier)",
            )
        if names is None or names == [] or names == "":
            return list(self.models.classifiers.values())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError(422, "models must be a list of classifier names")
        unknown = [n for n in names if n not in self.models.classifiers]
        if unknown:
            raise RequestError(
                422,
                f"unknown classifier(s) {', '.join(map(repr, unknown[:5]))}; this server has "
                f"{', '.join(self.models.classifiers) or 'none'}",
            )
        return [self.models.classifiers[n] for n in dict.fromkeys(names)]

    def _pick_segmenter(self, name: str | None) -> ServedModel:
        if not self.models.segmenters:
            raise RequestError(
                404,
                "watermark lesion segmentation is not available: this server holds no lesion segmenter "
                "(task 'segment-lesion' in the manifest)",
            )
        if name is None or name == "":
            return next(iter(self.models.segmenters.values()))
        if name not in self.models.segmenters:
            raise RequestError(
                422, f"unknown lesion segmenter {name!r}; this server has {', '.join(self.models.segmenters)}"
            )
        return self.models.segmenters[name]

    def _decode(self, body: bytes, what: str):
        try:
            return decode_tensor_raw(body, max_elements=self.service.config.max_request_bytes)
        except InputError as exc:
            raise RequestError(422, f"{what} is not a valid MedPrivacy tensor: {exc}") from None

    def _images(self, body: bytes, kind: str) -> np.ndarray:
        """(N, 3 or 1, H, W) uint8 or float16 wire tensor -> float32 (N, C, H, W) in [0, 1]."""
        raw, header = self._decode(body, "request body")
        self.service.audit(kind, raw)
        if header["dtype"] not in ("uint8", "float16"):
            raise RequestError(422, f"images arrived as {header['dtype']}; send uint8 or float16 values in [0, 1]")
        if raw.ndim != 4 or raw.shape[1] not in (1, 3) or raw.shape[0] < 1:
            raise RequestError(
                422, f"images have shape {list(raw.shape)}; expected (N, 3, H, W) RGB or (N, 1, H, W) gray with N >= 1"
            )
        _check_side(raw.shape[2:], "image")
        images = to_float32(raw)
        if (
            header["dtype"] == "float16"
            and images.size
            and (images.min() < -_RANGE_SLACK or images.max() > 1 + _RANGE_SLACK)
        ):
            raise RequestError(
                422, f"image values span [{images.min():.3g}, {images.max():.3g}]; send intensities scaled to [0, 1]"
            )
        return np.clip(images, 0.0, 1.0)

    def _probabilities(self, model: ServedModel, x):
        """Class probabilities (N, C) float32 tensor for float32 images x (N, 3, H, W) on the device; lock held."""
        import torch

        net = self.models.ensure_loaded(model, self.device)
        logits = logits_of(net(resize(x, model.size)))
        if (
            logits.ndim != 2
            or logits.shape[0] != x.shape[0]
            or (model.classes is not None and logits.shape[1] != model.classes)
        ):
            raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
        return torch.softmax(logits.float(), dim=1)

    def classify_array(self, models: list[ServedModel], images: np.ndarray) -> dict[str, np.ndarray]:
        """Probabilities per model, (N, C) float64, for float32 images (N, C, H, W) in [0, 1]."""
        import torch

        batch = self.service.config.inference_batch
        out: dict[str, list[np.ndarray]] = {m.name: [] for m in models}
        for start in range(0, images.shape[0], batch):
            with self.service.inference_lock, torch.inference_mode():
                x = three_channels(torch.from_numpy(images[start : start + batch]).to(self.device))
                for model in models:
                    out[model.name].append(self._probabilities(model, x).cpu().numpy().astype(np.float64))
        return {name: np.concatenate(parts) for name, parts in out.items()}

    # -- endpoints -------------------------------------------------------------------------------------------
    def classify(self, body: bytes, names: str | None) -> dict[str, Any]:
        models = self._pick_classifiers(names)
        images = self._images(body, "classify")
        started = time.perf_counter()
        probs = self.classify_array(models, images)
        log.info(
            "watermark classify: %d images %s with %s in %.2f s",
            images.shape[0],
            "x".join(map(str, images.shape[2:])),
            ", ".join(m.name for m in models),
            time.perf_counter() - started,
        )
        return {"count": int(images.shape[0]), "models": {m.name: _prediction(m, probs[m.name]) for m in models}}

    def lesions(self, body: bytes, name: str | None, response_dtype: str) -> bytes:
        model = self._pick_segmenter(name)
        images = self._images(body, "lesions")
        started = time.perf_counter()
        masks = self._lesion_probability(model, images)
        log.info(
            "watermark lesions: %d images %s in %.2f s",
            images.shape[0],
            "x".join(map(str, images.shape[2:])),
            time.perf_counter() - started,
        )
        if response_dtype == "uint8":
            return encode_tensor_raw(np.rint(masks * 255.0).astype(np.uint8))
        return encode_tensor_raw(masks.astype(np.float16))

    def _lesion_probability(self, model: ServedModel, images: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 lesion probability at the images' own size."""
        import torch

        out = np.empty((images.shape[0], 1, *images.shape[2:]), dtype=np.float32)
        batch = self.service.config.inference_batch
        for start in range(0, images.shape[0], batch):
            with self.service.inference_lock, torch.inference_mode():
                net = self.models.ensure_loaded(model, self.device)
                x = three_channels(torch.from_numpy(images[start : start + batch]).to(self.device))
                logits = logits_of(net(resize(x, model.size)))
                if logits.ndim != 4 or logits.shape[0] != x.shape[0] or logits.shape[1] < 2:
                    raise RuntimeError(f"{model.name} produced {tuple(logits.shape)} for input {tuple(x.shape)}")
                lesion = torch.softmax(logits.float(), dim=1)[:, 1:2]
                out[start : start + batch] = resize(lesion, images.shape[2:]).clamp(0.0, 1.0).cpu().numpy()
        return out

    def optimize(self, body: bytes, cancel: threading.Event) -> dict[str, Any]:
        from ...watermark import blending, boxes
        from ...watermark.optimizer import ensemble_objective, optimize_watermark

        started = time.perf_counter()
        request = self._optimize_request(body)
        params = request["params"]
        image, logo, mask = request["image"], request["logo"], request["mask"]
        models = self._pick_classifiers(params.get("models"))
        with self.service.inference_lock:
            for model in models:  # a TorchScript model knows its number of classes only once loaded
                self.models.ensure_loaded(model, self.device)
        if not params.get("models"):
            models = _same_classes(models)
        classes = {m.classes for m in models}
        if len(classes) != 1:
            raise RequestError(
                422, "the chosen classifiers predict different numbers of classes; pick models with the same labels"
            )
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
            raise RequestError(422, str(exc)) from None

        scorer = CandidateScorer(self, models, image, fitted, window, cancel)
        clean = scorer.full_probabilities(image)
        label = params.get("label")
        classes = models[0].classes or clean[models[0].name].shape[1]
        if label is None:
            # Without a label, each model is pushed away from its own clean answer: a shared target (the ensemble's
            # vote) would push the models that voted otherwise towards it, which may be the true class.
            targets, target_source = [int(np.argmax(clean[m.name][0])) for m in models], "clean-prediction"
        else:
            if not 0 <= int(label) < classes:
                raise RequestError(422, f"label {label!r} must be a class index between 0 and {classes - 1}")
            targets, target_source = [int(label)] * len(models), "label"
        scorer.target, scorer.weights = np.asarray(targets), weights
        try:
            result = optimize_watermark(scorer, placement, rng=params.get("seed"), **options)
        except InputError as exc:
            raise RequestError(422, str(exc)) from None
        alpha, x, y = result.alpha, result.x, result.y
        protected = blending.blend(image, fitted, alpha, x, y, window)
        after = scorer.full_probabilities(protected)
        objective_after, _ = ensemble_objective(np.stack([after[m.name] for m in models]), targets, weights)
        if abs(float(objective_after[0]) - result.objective) > 1e-3:
            log.warning(
                "watermark search objective %.5f differs from the rendered image's %.5f",
                result.objective,
                float(objective_after[0]),
            )
        elapsed = time.perf_counter() - started
        log.info(
            "watermark optimize: %s image %dx%d, %s, %d evaluations, %s, fooled=%s in %.1f s",
            "RGB" if image.ndim == 3 else "gray",
            image.shape[1],
            image.shape[0],
            mode,
            result.evaluations,
            result.stop_reason,
            result.fooled,
            elapsed,
        )
        return {
            "params": {
                "alpha": float(alpha),
                "x": int(x),
                "y": int(y),
                "sl": float(params.get("sl", blending.DEFAULT_SL)),
                "window": list(window),
            },
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
                {
                    "generation": h.generation,
                    "evaluations": h.evaluations,
                    "best_objective": _finite(h.best_objective),
                    "population_mean": _finite(h.population_mean),
                    "fooled": bool(h.fooled),
                }
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
            raise RequestError(422, f"{name} is not valid base64") from None
        return self._decode(data, name)

    @staticmethod
    def _exact_image(decoded) -> np.ndarray:
        raw, header = decoded
        if raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] not in (1, 3):
            raise RequestError(
                422, f"image has shape {list(raw.shape)}; expected (1, C, H, W) with C = 1 (gray) or 3 (RGB)"
            )
        _check_side(raw.shape[2:], "image")
        if header["dtype"] == "uint8":
            pixels = raw[0]
        elif header["dtype"] == "float32":
            # 16-bit pixels travel as k/65535 in float32, which holds every k exactly enough to round back.
            scaled = raw[0].astype(np.float64) * 65535.0
            pixels = np.rint(scaled)
            if scaled.size and (pixels.min() < 0 or pixels.max() > 65535 or np.abs(scaled - pixels).max() > 0.01):
                raise RequestError(422, "a float32 image must hold 16-bit pixels as k/65535 (k = 0..65535)")
            pixels = pixels.astype(np.uint16)
        else:
            raise RequestError(
                422,
                "image arrived as float16, which cannot carry exact pixels; "
                "send 8-bit images as uint8 and 16-bit ones as float32 k/65535",
            )
        pixels = np.moveaxis(pixels, 0, -1)
        return np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)

    @staticmethod
    def _logo(decoded) -> np.ndarray:
        from ...watermark.blending import as_rgba

        raw, header = decoded
        if header["dtype"] != "uint8" or raw.ndim != 4 or raw.shape[0] != 1 or raw.shape[1] not in (1, 2, 3, 4):
            raise RequestError(
                422, f"logo has shape {list(raw.shape)} {header['dtype']}; expected (1, 4, h, w) uint8 RGBA"
            )
        _check_side(raw.shape[2:], "logo")
        try:
            return as_rgba(np.moveaxis(raw[0], 0, -1))
        except InputError as exc:
            raise RequestError(422, str(exc)) from None

    @staticmethod
    def _mask(decoded, shape) -> np.ndarray:
        raw, _ = decoded
        if raw.ndim == 4 and raw.shape[:2] == (1, 1):
            raw = raw[0, 0]
        if raw.ndim != 2 or tuple(raw.shape) != tuple(shape[:2]):
            raise RequestError(
                422, f"lesion mask has shape {list(raw.shape)}; expected (1, 1, {shape[0]}, {shape[1]}) like the image"
            )
        return raw != 0

    def _lesion_mask(self, params: dict, mode: str, image: np.ndarray, mask, window):
        source = params.get("lesions")
        if source is None:
            source = "mask" if mask is not None else ("server" if mode != "wap" and self.models.segmenters else "none")
        if source == "mask":
            if mask is None:
                raise RequestError(422, "lesions=mask but the request has no mask; send one or use lesions=server")
            return source, mask
        if source == "server" and mode != "wap":
            threshold = params.get("mask_threshold", 0.5)
            segmenter = self._pick_segmenter(None)
            from ...watermark.blending import unit_view

            return source, self._lesion_probability(segmenter, unit_view(image, window)[None])[0, 0] >= float(threshold)
        return source, None


def _check_side(shape, what: str) -> None:
    if min(shape) < 1 or max(shape) > MAX_IMAGE_SIDE:
        raise RequestError(
            422, f"{what} is {'x'.join(map(str, shape))} pixels; sides must lie between 1 and {MAX_IMAGE_SIDE}"
        )


def _prediction(model: ServedModel, probs: np.ndarray) -> dict[str, Any]:
    return {
        "labels": dict(model.labels),
        "probabilities": [[float(p) for p in row] for row in probs],
        "predicted": [int(i) for i in np.argmax(probs, axis=1)],
    }


def _same_classes(models: list[ServedModel]) -> list[ServedModel]:
    """The default ensemble: the largest group of classifiers that predict the same number of classes (eq. 8 adds
    their probabilities class by class); on a tie, the group of the first classifier."""
    groups: dict[Any, list[ServedModel]] = {}
    for model in models:
        groups.setdefault(model.classes, []).append(model)
    return max(groups.values(), key=len)


def _weights(weights, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    if len(weights) != count:
        raise RequestError(422, f"weights must be a list of {count} numbers, one per chosen model")
    beta = np.asarray(weights, dtype=np.float64)
    if (beta < 0).any() or not beta.sum() > 0:
        raise RequestError(422, "weights must be non-negative and not all zero")
    return beta


def _mask_params(given, shape):
    from ...watermark.boxes import MaskParams

    default = MaskParams.for_image(shape)
    if given is None:
        return default
    given = {k: v for k, v in given.items() if v is not None}  # bounds checked by the schema
    return MaskParams(
        kernel=int(given.get("kernel", default.kernel)),
        iterations=int(given.get("iterations", default.iterations)),
        min_area=int(given.get("min_area", default.min_area)),
        gamma=float(given.get("gamma", default.gamma)),
    )


def _search_options(params: dict) -> dict[str, Any]:
    """The optimiser's keyword arguments from validated ``params`` (types and bounds: schema.OptimizeParams)."""
    from ...watermark import optimizer

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
        raise RequestError(
            422, f"max_evaluations must be a whole number between 1 and {MAX_EVALUATIONS} (this server's limit)"
        )
    options["max_evaluations"] = MAX_EVALUATIONS if requested is None else int(requested)
    return options


def _finite(value: float):
    return float(value) if math.isfinite(value) else None
