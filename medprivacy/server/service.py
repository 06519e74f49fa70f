"""What the inference server serves, behind its HTTP layer: the configuration (``ServerConfig``), the Mixup models
with their device and inference lock, and the optional audit copy of every request (``InferenceService``).

The MedLocker and ObfuscationPrivacy services (the ``watermark`` and ``obfuscation`` packages beside this file) hang
off the same ``InferenceService``; ``app`` puts HTTP routes in front of all three.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError
from ..files import WriteError, os_error_reason, write_atomically
from ..nets import resolve_device
from ..transport.contract import API_VERSION, BASELINE_PATH, MIXUP_PATH
from ..transport.wire import decode_tensor_raw, encode_tensor_raw
from .schema import RequestError as _HTTPError

log = logging.getLogger("medprivacy.server")

DEFAULT_MAX_REQUEST_BYTES = 256 * 1024 * 1024
#: Longest silence allowed while a request arrives (headers or body), and the slowest average upload accepted
#: once that much time has passed: a client that stalls or trickles must not hold a connection forever.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Rounding to float16 adds up to half a unit in the last place; allow that much outside [0, 1] before refusing.
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class _Route:
    kind: str  # also the audit file suffix
    model: str
    path: str


MIXUP = _Route("mixup", "mixup-seg", MIXUP_PATH)
BASELINE = _Route("baseline", "plain-seg", BASELINE_PATH)


@dataclass
class ServerConfig:
    models_dir: Path | None = None
    device: str = "auto"
    #: Kept out of repr so the token never lands in a log line or traceback that prints the config.
    token: str | None = field(default=None, repr=False)
    audit_dir: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    enable_baseline: bool = False
    inference_batch: int = 32
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    #: The operator's own TorchScript classifiers for MedLocker (``watermark.ExtraClassifier``); code, so trusted
    #: files only.
    extra_classifiers: tuple = ()
    #: Where classifiers trained on obfuscated frames are kept across restarts; None: in memory only.
    model_store: Path | None = None


class _ServedModel:
    def __init__(self, spec, route: _Route):
        self.spec = spec
        self.route = route
        self.net = None
        self.out_channels = int(spec.arch.get("out_channels") or len(spec.labels))

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": self.route.path,
            "patch_size": list(self.spec.patch_size),
            "labels": dict(self.spec.labels),
            "sha256": self.spec.sha256,
            "arch": self.spec.arch.get("name"),
            "in_channels": 1,
            "out_channels": self.out_channels,
            # The mixing-weight range the model was trained on: clients must draw λ inside it.
            **({"lambda_range": self.spec.extra["lambda_range"]} if "lambda_range" in self.spec.extra else {}),
            # Per-class factors applied to these probabilities before the argmax, fitted on validation scans.
            **(
                {"decision_weights": self.spec.extra["decision_weights"]}
                if "decision_weights" in self.spec.extra
                else {}
            ),
        }


class InferenceService:
    """Everything behind the HTTP layer: models, device, the inference lock and the optional audit copy."""

    def __init__(self, config: ServerConfig):
        from ..nets.registry import ModelSpec, load_manifest, models_dir

        if config.inference_batch < 1:
            raise InputError(f"inference batch must be at least 1 (got {config.inference_batch})")
        if config.max_request_bytes < 1:
            raise InputError(f"max request size must be positive (got {config.max_request_bytes} bytes)")
        if not config.request_timeout > 0:
            raise InputError(f"request timeout must be a positive number of seconds (got {config.request_timeout})")
        self.config = config
        self.models_dir = models_dir(config.models_dir)
        self.device = resolve_device(config.device)
        manifest = load_manifest(self.models_dir)
        entries = manifest.get("models", {})
        from .watermark import WatermarkModels, WatermarkService

        self.watermark = WatermarkService(
            self, WatermarkModels(entries, self.models_dir, tuple(config.extra_classifiers))
        )
        from .obfuscation import ObfuscationService

        self.obfuscation = ObfuscationService(self, config.model_store)
        routes = [MIXUP, BASELINE] if config.enable_baseline else [MIXUP]
        self.models: dict[str, _ServedModel] = {}
        for route in routes:
            entry = entries.get(route.model)
            if entry is None and route is MIXUP and self.watermark.models:
                continue  # a MedLocker-only server
            if entry is None:
                raise InputError(
                    f"model manifest {self.models_dir / 'manifest.json'} has no {route.model!r} entry; "
                    "train it with 'medprivacy mixup train' or point --models-dir at a folder that has it"
                )
            try:
                spec = ModelSpec.from_json(route.model, entry)
            except (KeyError, TypeError) as exc:
                raise InputError(
                    f"manifest entry {route.model!r} is incomplete ({type(exc).__name__}: {exc}); restore manifest.json"
                ) from None
            if spec.role != "server":
                raise InputError(
                    f"manifest entry {route.model!r} has role {spec.role!r}, not 'server'; fix the manifest"
                )
            self.models[route.kind] = _ServedModel(spec, route)
        # One forward pass at a time: parallel passes would only fight over the same GPU memory or CPU cores.
        self.inference_lock = threading.Lock()
        self._audit_counter = itertools.count(1)
        self._audit_lock = threading.Lock()
        if config.audit_dir is not None:
            Path(config.audit_dir).mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- models ----------------------------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load every served network now, so a missing or corrupt weight file stops the server at startup."""
        with self.inference_lock:
            for model in self.models.values():
                self._ensure_loaded(model)
        self.watermark.load()

    def _ensure_loaded(self, model: _ServedModel):
        if model.net is None:
            from ..nets.registry import load_model

            started = time.perf_counter()
            model.net, _ = load_model(model.spec.name, self.models_dir, self.device)
            log.info(
                "loaded %s (%s) on %s in %.1f s",
                model.spec.name,
                model.spec.arch.get("name"),
                self.device,
                time.perf_counter() - started,
            )
        return model.net

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "api_version": API_VERSION,
            "server_version": __version__,
            "torch_version": torch.__version__,
            "device": self.device,
            "baseline_enabled": self.config.enable_baseline,
            "auth_required": self.config.token is not None,
            "max_request_bytes": self.config.max_request_bytes,
            "models": {**{m.spec.name: m.describe() for m in self.models.values()}, **self.watermark.models.describe()},
            "obfuscation": self.obfuscation.describe(),
        }

    # -- requests --------------------------------------------------------------------------------------------
    def segment(self, kind: str, body: bytes, response_dtype: str) -> bytes:
        model = self.models[kind]
        patch = tuple(int(n) for n in model.spec.patch_size)
        try:
            raw, header = decode_tensor_raw(body, max_elements=max(self.config.max_request_bytes, math.prod(patch)))
        except InputError as exc:
            raise _HTTPError(422, f"request body is not a valid MedPrivacy tensor: {exc}") from None
        self.audit(kind, raw)
        self._check_patches(model, raw, header["dtype"], patch)
        started = time.perf_counter()
        probabilities = self._infer(model, raw, response_dtype)
        answer = encode_tensor_raw(probabilities)
        log.info(
            "%s: %d patches %s %s (%d bytes in, %d bytes out) in %.2f s",
            kind,
            raw.shape[0],
            "x".join(map(str, patch)),
            header["dtype"],
            len(body),
            len(answer),
            time.perf_counter() - started,
        )
        return answer

    @staticmethod
    def _check_patches(model: _ServedModel, raw: np.ndarray, dtype: str, patch: tuple[int, ...]) -> None:
        expected = "x".join(map(str, patch))
        if dtype not in ("uint8", "float16"):
            raise _HTTPError(
                422, f"patches arrived as {dtype}; send uint8 or float16 (float32 only doubles the upload)"
            )
        if raw.ndim != 5 or raw.shape[1] != 1:
            raise _HTTPError(
                422,
                f"patches have shape {list(raw.shape)}; "
                f"expected (N, 1, {', '.join(map(str, patch))}) single-channel 3D patches",
            )
        if tuple(raw.shape[2:]) != patch:
            got = "x".join(map(str, raw.shape[2:]))
            raise _HTTPError(
                422,
                f"patches are {got} voxels but model {model.spec.name} expects {expected}; "
                "cut patches with the patch_size from /v1/info",
            )
        if raw.shape[0] == 0:
            raise _HTTPError(422, "request holds no patches; send at least one")
        if dtype == "float16" and (raw.min() < -_RANGE_SLACK or raw.max() > 1 + _RANGE_SLACK):
            raise _HTTPError(
                422,
                f"patch values span [{float(raw.min()):.3g}, {float(raw.max()):.3g}]; "
                "send intensities scaled to [0, 1] like the uint8 encoding",
            )

    def _infer(self, model: _ServedModel, raw: np.ndarray, response_dtype: str) -> np.ndarray:
        from ..nets.inference import segment_patches

        with self.inference_lock:
            net = self._ensure_loaded(model)
            out = segment_patches(net, raw, self.device, self.config.inference_batch, response_dtype)
        if out.shape[1] != model.out_channels:
            raise RuntimeError(
                f"{model.spec.name} produced {out.shape[1]} classes; its manifest says {model.out_channels}"
            )
        return out

    def audit(self, kind: str, raw: np.ndarray) -> None:
        """With --audit-dir, keep a copy of what a request carried; every route that receives images calls it.

        The copy is exactly what arrived (wire dtype, uint8 codes not rescaled; MedLocker images as their pixels), so
        an auditor sees what the server saw. If it cannot be written the request is refused: an operator who asked
        for a copy of everything must not silently get less.
        """
        if self.config.audit_dir is None:
            return
        try:
            self._write_audit(kind, raw)
        except (OSError, InputError) as exc:
            if isinstance(exc, WriteError):
                reason = exc.reason
            else:
                reason = os_error_reason(exc) if isinstance(exc, OSError) else "its folder no longer exists"
            log.error(
                "cannot write the audit copy of a %s request to %s (%s); request refused",
                kind,
                self.config.audit_dir,
                reason,
            )
            raise _HTTPError(
                503,
                f"the server cannot save its audit copy ({reason}); ask the operator to free space in its --audit-dir",
                headers={"Retry-After": "60"},
            ) from None

    def _write_audit(self, kind: str, raw: np.ndarray) -> None:
        directory = Path(self.config.audit_dir)
        with self._audit_lock:
            counter = next(self._audit_counter)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        final = directory / f"{stamp}-{counter:06d}-{kind}.npy"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, raw, allow_pickle=False)

        # The temporary name does not end in .npy, so readers globbing *.npy never see half-written files; no
        # fsync per request (an audit copy lost to a power cut is not worth slowing every request for).
        write_atomically(final, write, temporary_suffix=".tmp", sync=False)
