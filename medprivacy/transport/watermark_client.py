"""Client for the MedLocker endpoints (``/v1/watermark/*``); see ``medprivacy.server.watermark`` for the protocol.

``WatermarkClient`` is an ``InferenceClient`` (same TLS, token, timeouts, retries and one-line errors) with three
more calls: ``classify`` (class probabilities per model), ``lesions`` (a lesion probability map) and
``optimize`` (the whole watermark search for one image, run on the server next to its models).

It knows the wire and the HTTP contract only: turning pixels into what the classifiers see, or logos into RGBA, is
the watermark package's (``medprivacy.watermark.blending``), which calls this client and is never imported here.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ServerError
from .client import InferenceClient, error_detail
from .contract import (
    RESPONSE_DTYPE_HEADER,
    WATERMARK_CLASSIFY_PATH,
    WATERMARK_LESIONS_PATH,
    WATERMARK_OPTIMIZE_PATH,
    WATERMARK_PREFIX,
)
from .wire import CONTENT_TYPE, decode_tensor_raw, encode_tensor, encode_tensor_raw, to_float32


class WatermarkClient(InferenceClient):
    """Talks to the MedLocker endpoints of one server. Not thread-safe: one client per worker thread."""

    def classifiers(self) -> dict[str, dict[str, Any]]:
        """The server's classifiers (from /v1/info): name -> description with ``patch_size`` and ``labels``."""
        return {name: d for name, d in self.info().get("models", {}).items() if d.get("task") == "classify"}

    def segmenters(self) -> dict[str, dict[str, Any]]:
        return {name: d for name, d in self.info().get("models", {}).items() if d.get("task") == "segment-lesion"}

    def classify(
        self, images: np.ndarray, models: Sequence[str] | None = None, upload_dtype: str = "uint8"
    ) -> dict[str, Any]:
        """Per-model class probabilities for float images (N, 3, H, W) (or (N, 1, H, W) gray) in [0, 1].

        Returns the server's JSON: ``{"count": N, "models": {name: {"labels", "probabilities", "predicted"}}}``.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise InputError(f"images must have shape (N>0, 3, H, W) or (N>0, 1, H, W), got {images.shape}")
        body = encode_tensor(images, dtype=upload_dtype)
        params = {"models": ",".join(models)} if models else None
        response = self._request(
            "POST", WATERMARK_CLASSIFY_PATH, data=body, params=params, headers={"Content-Type": CONTENT_TYPE}
        )
        self._count(body, response)
        answer = self._json(response)
        if not isinstance(answer, dict) or not isinstance(answer.get("models"), dict):
            raise ServerError(
                f"{self.url} answered /classify without per-model results; check that client and server versions match"
            )
        return answer

    def lesions(self, image: np.ndarray, model: str | None = None, upload_dtype: str = "uint8") -> np.ndarray:
        """Lesion probability (H, W) float32 for one float image (3, H, W) or (1, H, W) in [0, 1]."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise InputError(f"the image must have shape (3, H, W) or (1, H, W), got {image.shape}")
        body = encode_tensor(image[None], dtype=upload_dtype)
        response = self._request(
            "POST",
            WATERMARK_LESIONS_PATH,
            data=body,
            params={"model": model} if model else None,
            headers={"Content-Type": CONTENT_TYPE, RESPONSE_DTYPE_HEADER: "float16"},
        )
        self._count(body, response)
        if response.headers.get("Content-Type", "").split(";")[0].strip() != CONTENT_TYPE:
            raise ServerError(
                f"{self.url} answered /lesions without a tensor; check that the URL points at a MedPrivacy server"
            )
        try:
            raw, _ = decode_tensor_raw(response.content, max_elements=int(np.prod(image.shape[1:])))
        except InputError as exc:
            raise ServerError(
                f"{self.url} sent an unreadable lesion map ({exc}); retry, and report it to the operator if it persists"
            ) from None
        if raw.shape != (1, 1, *image.shape[1:]):
            raise ServerError(
                f"{self.url} answered a lesion map of shape {list(raw.shape)} for an image of {list(image.shape[1:])}"
            )
        return to_float32(raw)[0, 0]

    def optimize(
        self, pixels: np.ndarray, logo: np.ndarray, mask: np.ndarray | None = None, **params: Any
    ) -> dict[str, Any]:
        """Run the watermark search for one image on the server; returns its JSON answer.

        ``pixels``: the image exactly as protected, (H, W) or (H, W, 3), uint8 or uint16. ``logo``: RGBA uint8
        (h, w, 4) (or gray / RGB: see ``logo_tensor``). ``mask``: optional lesion mask (H, W), nonzero = lesion.
        ``params``: the search parameters
        (mode, lesions, models, weights, sl, population, generations, crossover_rate, step, local_iterations,
        alpha_range, alpha_step, mutation, seed, label, max_evaluations, mask_threshold, mask_params, window); None
        values are left out so the server's defaults apply.
        """
        document = {
            "image": _b64(exact_image_tensor(pixels)),
            "logo": _b64(logo_tensor(logo)),
            "params": {k: v for k, v in params.items() if v is not None},
        }
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != np.asarray(pixels).shape[:2]:
                raise InputError(f"the lesion mask is {mask.shape} but the image is {np.asarray(pixels).shape[:2]}")
            document["mask"] = _b64(encode_tensor_raw((mask != 0).astype(np.uint8)[None, None]))
        try:
            body = json.dumps(document, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InputError(f"watermark parameters cannot be sent as JSON ({exc})") from None
        limit = (self._server_info or {}).get("max_request_bytes")
        if isinstance(limit, int) and len(body) > limit:
            raise ServerError(
                f"this image makes a {len(body)}-byte request, over the limit of {limit} bytes of {self.url}; "
                "ask the operator to raise --max-request-mb"
            )
        response = self._request(
            "POST", WATERMARK_OPTIMIZE_PATH, data=body, headers={"Content-Type": "application/json"}
        )
        self._count(body, response)
        answer = self._json(response)
        if not isinstance(answer, dict) or not isinstance(answer.get("params"), dict):
            raise ServerError(
                f"{self.url} answered /optimize without watermark parameters; "
                "check that client and server versions match"
            )
        return answer

    def _count(self, body: bytes, response) -> None:
        self.bytes_sent += len(body)
        self.bytes_received += len(response.content)

    def _raise_for_status(self, response, path: str) -> None:
        # A 404 from a watermark endpoint means "this server lacks that model", which the server's detail says.
        if response.status_code == 404 and path.startswith(WATERMARK_PREFIX):
            detail = error_detail(response)
            if detail.startswith("watermark"):
                raise ServerError(f"{self.url}: {detail}")
        if response.status_code == 413 and path.startswith(WATERMARK_PREFIX):
            raise ServerError(
                f"request too large for {self.url}; send a smaller image or ask the operator to raise --max-request-mb"
            )
        super()._raise_for_status(response, path)


def exact_image_tensor(pixels: np.ndarray) -> bytes:
    """Wire tensor (1, C, H, W) carrying every pixel exactly: uint8 as is, uint16 as float32 k/65535."""
    pixels = np.asarray(pixels)
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise InputError(f"the image has shape {pixels.shape}; give one 2D gray (H, W) or RGB (H, W, 3) image")
    planar = (pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0))[None]
    if pixels.dtype == np.uint8:
        return encode_tensor_raw(np.ascontiguousarray(planar))
    if pixels.dtype == np.uint16:
        return encode_tensor_raw((planar.astype(np.float64) / 65535.0).astype(np.float32))
    raise InputError(f"the image has pixel type {pixels.dtype}; MedLocker works on 8- or 16-bit unsigned pixels")


def logo_tensor(logo: np.ndarray) -> bytes:
    """Wire tensor (1, C, h, w) of an 8-bit logo with C = 1 to 4 channels (gray, gray+alpha, RGB, RGBA), as is: the
    server turns it into RGBA exactly as the client's blending does (``watermark.blending.as_rgba``)."""
    logo = np.asarray(logo)
    planar = logo[None] if logo.ndim == 2 else np.moveaxis(logo, -1, 0) if logo.ndim == 3 else None
    if logo.dtype != np.uint8 or planar is None or not 1 <= planar.shape[0] <= 4 or min(planar.shape[1:]) < 1:
        raise InputError(
            f"the logo is {logo.dtype} {logo.shape}; give an 8-bit gray, RGB or RGBA picture "
            "(medprivacy.watermark.blending.as_rgba converts other ones)"
        )
    return encode_tensor_raw(np.ascontiguousarray(planar)[None])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
