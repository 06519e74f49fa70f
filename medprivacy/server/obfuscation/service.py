"""The obfuscation service: training jobs run one at a time on a worker thread, trained models classify frames
from the key they were trained on. The request checks answer one-line HTTP errors (``schema.RequestError``)."""

from __future__ import annotations

import base64
import binascii
import collections
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import Field

from ...errors import CancelledError, InputError, MedPrivacyError
from ...transport.contract import (
    OBFUSCATION_CLASSIFY_PATH,
    OBFUSCATION_JOBS_PATH,
    OBFUSCATION_KEY_ID_HEADER,
    OBFUSCATION_MODELS_PATH,
    OBFUSCATION_TRAIN_PATH,
)
from ...transport.wire import decode_tensor_raw
from ..schema import MAX_SEED, RequestError as _HTTPError, RequestModel, parse_object
from .store import ModelStore, TrainedModel

log = logging.getLogger("medprivacy.server")

MIN_SIDE, MAX_SIDE = 16, 512
MAX_CLASSES = 64
#: Finished jobs are kept for status queries; the oldest are forgotten beyond this many.
KEEP_FINISHED_JOBS = 100
_KEY_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
_TRAIN_KEYS = {"frames", "labels", "classes", "key_id", "name", "params"}
_PARAM_KEYS = {"steps", "batch_size", "learning_rate", "validation_fraction", "seed"}


class ObfuscationTrainParams(RequestModel):
    """The training parameters a client may choose; the server's --max-steps style limits apply on top."""

    steps: Optional[int] = Field(None, ge=1, le=100_000)  # None: the server's default
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    validation_fraction: float = Field(0.1, ge=0, lt=0.5)
    seed: int = Field(0, ge=0, le=MAX_SEED)


@dataclass
class ObfuscationLimits:
    max_train_frames: int = 50_000
    max_steps: int = 20_000
    max_queued_jobs: int = 4
    default_steps: int = 1500


@dataclass
class Job:
    id: str
    created: float
    dataset: dict
    settings: Any
    frames: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    classes: list = field(default_factory=list)
    key_id: str = ""
    name: str = ""
    status: str = "queued"
    progress: dict = field(default_factory=dict)
    model: str | None = None
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "status": self.status,
            "name": self.name,
            "dataset": dict(self.dataset),
            "settings": self.settings.to_json(),
            "progress": dict(self.progress),
            "model": self.model,
            "error": self.error,
            "created": _stamp(self.created),
            "started": _stamp(self.started),
            "finished": _stamp(self.finished),
        }


def _stamp(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ObfuscationService:
    """Jobs, trained models and requests against an ``InferenceService`` (its device, lock, limits and audit)."""

    def __init__(self, service, model_store: Path | None = None, limits: ObfuscationLimits | None = None):
        self.service = service
        self.limits = limits or ObfuscationLimits()
        self.model_store = ModelStore(model_store) if model_store is not None else None
        self.models: dict[str, TrainedModel] = self.model_store.load() if self.model_store is not None else {}
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._lock = threading.Lock()  # jobs and models dicts
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._stopping = False

    def _network(self, model: TrainedModel):
        """The model's network on the device (caller holds the inference lock)."""
        if model.net is None:
            from safetensors.torch import load_file

            from ...obfuscation.classifier import build_code_classifier

            net = build_code_classifier(model.arch)
            net.load_state_dict(load_file(str(self.model_store.weights(model.id)), device="cpu"))
            model.net = net.to(self.service.device).eval()
        return model.net

    # -- worker -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="MedPrivacy obfuscation training", daemon=True)
                self._worker.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            for job in self.jobs.values():
                job.cancel.set()
            self._wake.notify_all()

    def _next_job(self) -> Job | None:
        with self._wake:
            while not self._stopping:
                job = next((j for j in self.jobs.values() if j.status == "queued"), None)
                if job is not None:
                    job.status, job.started = "running", time.time()
                    return job
                self._wake.wait()
        return None

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._run(job)
            except CancelledError:
                self._finish(job, "cancelled", None)
                log.info("obfuscation job %s cancelled", job.id)
            except MedPrivacyError as exc:
                self._finish(job, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            except Exception as exc:  # a bug: keep the traceback in the log, give the client one line
                log.exception("obfuscation job %s failed", job.id)
                self._finish(
                    job,
                    "failed",
                    f"internal error ({type(exc).__name__}); the operator can find the cause in the server log",
                )

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        with self._lock:
            job.status, job.error, job.finished = status, error, time.time()
            job.frames = job.labels = None  # the uploaded frames are dropped as soon as the job ends
            finished = [j for j in self.jobs.values() if j.status in ("done", "failed", "cancelled")]
            for old in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
                del self.jobs[old.id]

    def _run(self, job: Job) -> None:
        from ...obfuscation.classifier import train_classifier

        log.info(
            "obfuscation job %s: training on %d frames %s, classes %s, %d steps",
            job.id,
            len(job.frames),
            "x".join(map(str, job.frames.shape[1:])),
            ", ".join(job.classes),
            job.settings.steps,
        )

        def progress(state: dict) -> None:
            job.progress = dict(state, fraction=round(state["step"] / state["steps"], 4))

        result = train_classifier(
            job.frames,
            job.labels,
            job.classes,
            job.settings,
            device=self.service.device,
            progress=progress,
            cancel=job.cancel.is_set,
            lock=self.service.inference_lock,
        )
        model = TrainedModel(
            f"obf-{secrets.token_hex(6)}",
            list(job.classes),
            list(job.frames.shape[1:]),
            job.key_id,
            result.arch,
            {k: v for k, v in result.metrics.items() if k != "history"},
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            job.name,
            net=result.net.eval(),
        )
        if self.model_store is not None:
            self.model_store.save(model, result.net.state_dict())
        with self._lock:
            self.models[model.id] = model
            job.model = model.id
        self._finish(job, "done", None)
        log.info(
            "obfuscation job %s: model %s, validation accuracy %s",
            job.id,
            model.id,
            model.metrics.get("validation_accuracy"),
        )

    # -- requests ---------------------------------------------------------------------------------------------
    def submit(self, body: bytes) -> dict[str, Any]:
        from ...obfuscation.classifier import TrainSettings, check_dataset

        document = _json_object(body, '{"frames": ..., "labels": [...], "classes": [...], "key_id": ...}')
        unknown = set(document) - _TRAIN_KEYS
        if unknown:
            raise _HTTPError(
                422,
                f"unknown request field(s) {', '.join(sorted(map(str, unknown))[:5])}; "
                f"expected {', '.join(sorted(_TRAIN_KEYS))}",
            )
        key_id = _key_id(document.get("key_id"))
        classes = document.get("classes")
        if not isinstance(classes, list) or not all(
            isinstance(c, str) and c.strip() and len(c) <= 100 for c in classes
        ):
            raise _HTTPError(422, "classes must be a list of class names (non-empty strings)")
        if len(set(classes)) != len(classes) or len(classes) > MAX_CLASSES:
            raise _HTTPError(422, f"class names must be unique, at most {MAX_CLASSES}")
        if not isinstance(document.get("frames"), str):
            raise _HTTPError(422, "request has no frames; send them as a base64 MedPrivacy tensor")
        frames = self._frames(
            _b64_tensor(document["frames"], "frames", self.service.config.max_request_bytes),
            limit=self.limits.max_train_frames,
        )
        labels = document.get("labels")
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise _HTTPError(422, "labels must be a list of whole numbers, one per frame")
        labels = np.asarray(labels, dtype=np.int64)
        params = document.get("params") or {}
        if not isinstance(params, dict) or set(params) - _PARAM_KEYS:
            raise _HTTPError(422, f"params must be an object with some of {', '.join(sorted(_PARAM_KEYS))}")
        checked = parse_object(params, ObfuscationTrainParams, "params")
        try:
            settings = TrainSettings(
                steps=checked.steps or self.limits.default_steps,
                batch_size=checked.batch_size,
                learning_rate=checked.learning_rate,
                validation_fraction=checked.validation_fraction,
                seed=checked.seed,
            )
            settings.check()
            check_dataset(frames, labels, classes)
        except (TypeError, InputError) as exc:
            raise _HTTPError(422, str(exc).splitlines()[0] if str(exc) else "invalid training parameters") from None
        if settings.steps > self.limits.max_steps:
            raise _HTTPError(
                422, f"{settings.steps} steps is more than this server allows ({self.limits.max_steps}); ask for fewer"
            )
        name = document.get("name") or ""
        if not isinstance(name, str) or len(name) > 200:
            raise _HTTPError(422, "name must be a string of at most 200 characters")
        self._audit("obfuscation-train", frames)
        counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
        job = Job(
            secrets.token_hex(8),
            time.time(),
            {"frames": int(len(frames)), "frame_size": list(frames.shape[1:]), "classes": counts, "key_id": key_id},
            settings,
            frames,
            labels,
            list(classes),
            key_id,
            name,
        )
        with self._wake:
            waiting = sum(1 for j in self.jobs.values() if j.status in ("queued", "running"))
            if waiting >= self.limits.max_queued_jobs:
                raise _HTTPError(
                    503,
                    f"this server already has {waiting} training job(s) waiting or running; try again later",
                    headers={"Retry-After": "60"},
                )
            self.jobs[job.id] = job
            self._wake.notify_all()
        self.start()
        log.info("obfuscation job %s queued: %d frames, classes %s", job.id, len(frames), counts)
        return job.describe()

    def job(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._job(job_id).describe()

    def list_jobs(self) -> dict[str, Any]:
        with self._lock:
            return {"jobs": [j.describe() for j in self.jobs.values()]}

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            job = self._job(job_id)
            if job.status == "queued":
                job.status, job.finished = "cancelled", time.time()
                job.frames = job.labels = None
            elif job.status == "running":
                job.cancel.set()
            return job.describe()

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise _HTTPError(
                404,
                f"obfuscation job {job_id[:40]!r} is unknown on this server (finished jobs are kept until "
                f"{KEEP_FINISHED_JOBS} newer ones finish, and none survive a restart)",
            )
        return job

    def list_models(self) -> dict[str, Any]:
        with self._lock:
            return {"models": [m.describe() for m in self.models.values()], "model_store": self.model_store is not None}

    def classify(self, body: bytes, model_id: str | None, key_id: str | None) -> dict[str, Any]:
        from ...obfuscation.classifier import predict_probabilities

        model = self._model(model_id)
        given = _key_id(key_id, header=True)
        if given != model.key_id:
            raise _HTTPError(
                409,
                f"these frames were obfuscated with key {given} but model {model.id} was trained on key "
                f"{model.key_id}; classify with the key folder the model was trained with",
            )
        try:
            raw, header = decode_tensor_raw(body, max_elements=self.service.config.max_request_bytes)
        except InputError as exc:
            raise _HTTPError(422, f"request body is not a valid MedPrivacy tensor: {exc}") from None
        frames = self._frames((raw, header), limit=None)
        if list(frames.shape[1:]) != list(model.frame_size):
            raise _HTTPError(
                422,
                f"frames are {frames.shape[2]}x{frames.shape[1]} but model {model.id} expects "
                f"{model.frame_size[1]}x{model.frame_size[0]}; obfuscate them with the same key folder as its training "
                "frames",
            )
        self._audit("obfuscation-classify", frames)
        started = time.perf_counter()
        with self.service.inference_lock:
            probabilities = predict_probabilities(
                self._network(model), frames, self.service.device, self.service.config.inference_batch
            )
        log.info(
            "obfuscation classify: %d frames with %s in %.2f s", len(frames), model.id, time.perf_counter() - started
        )
        return {
            "model": model.id,
            "classes": list(model.classes),
            "count": int(len(frames)),
            "probabilities": [[round(float(p), 6) for p in row] for row in probabilities],
            "predicted": [int(i) for i in probabilities.argmax(axis=1)],
        }

    def _model(self, model_id: str | None) -> TrainedModel:
        if not model_id:
            raise _HTTPError(422, "name the model to classify with: ?model=ID (see GET /v1/obfuscation/models)")
        with self._lock:
            model = self.models.get(model_id)
            known = ", ".join(self.models) or "none"
        if model is None:
            raise _HTTPError(
                404,
                f"obfuscation model {model_id[:40]!r} is not on this server (it has: {known}); "
                "train one with 'medprivacy obfuscate train', or ask the operator for a model store",
            )
        return model

    @staticmethod
    def _frames(decoded, limit: int | None) -> np.ndarray:
        raw, header = decoded
        if header["dtype"] != "uint8":
            raise _HTTPError(422, f"frames arrived as {header['dtype']}; obfuscated frames are uint8 codes")
        if raw.ndim == 4 and raw.shape[1] == 1:
            raw = raw[:, 0]
        if raw.ndim != 3 or raw.shape[0] < 1:
            raise _HTTPError(
                422, f"frames have shape {list(raw.shape)}; expected (N, 1, H, W) or (N, H, W) with N >= 1"
            )
        if not (MIN_SIDE <= min(raw.shape[1:]) and max(raw.shape[1:]) <= MAX_SIDE):
            raise _HTTPError(
                422, f"frames are {raw.shape[2]}x{raw.shape[1]}; sides must lie between {MIN_SIDE} and {MAX_SIDE}"
            )
        if limit is not None and raw.shape[0] > limit:
            raise _HTTPError(
                413, f"{raw.shape[0]} frames is more than this server trains on at once ({limit}); send fewer"
            )
        return np.ascontiguousarray(raw)

    def _audit(self, kind: str, frames: np.ndarray) -> None:
        # The server's own audit: refuses the request (503) rather than serving it without the copy it was asked for.
        self.service.audit(kind, frames)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "endpoints": {
                    "train": OBFUSCATION_TRAIN_PATH,
                    "jobs": OBFUSCATION_JOBS_PATH,
                    "models": OBFUSCATION_MODELS_PATH,
                    "classify": OBFUSCATION_CLASSIFY_PATH,
                },
                "models": len(self.models),
                "model_store": self.model_store is not None,
                "max_train_frames": self.limits.max_train_frames,
                "max_steps": self.limits.max_steps,
                "default_steps": self.limits.default_steps,
            }


def _json_object(body: bytes, shape: str) -> dict:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _HTTPError(422, f"request body is not JSON; send {shape}") from None
    except RecursionError:  # the parser recurses per nesting level: thousands of "[" must not be a 500
        raise _HTTPError(422, f"request body is JSON nested too deeply; send {shape}") from None
    if not isinstance(document, dict):
        raise _HTTPError(422, f"request body must be a JSON object: {shape}")
    return document


def _b64_tensor(text: str, name: str, max_elements: int):
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _HTTPError(422, f"{name} is not valid base64") from None
    try:
        return decode_tensor_raw(data, max_elements=max_elements)
    except InputError as exc:
        raise _HTTPError(422, f"{name} is not a valid MedPrivacy tensor: {exc}") from None


def _key_id(value, header: bool = False) -> str:
    where = f"the {OBFUSCATION_KEY_ID_HEADER} header" if header else "key_id"
    if not isinstance(value, str) or not _KEY_ID_RE.match(value.strip()):
        raise _HTTPError(
            422,
            f"{where} must be the key's id (hex, from 'medprivacy obfuscate keygen'); "
            "every request names the key its frames were obfuscated with",
        )
    return value.strip()
