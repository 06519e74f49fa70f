"""Client for the ObfuscationPrivacy endpoints (``/v1/obfuscation/*``); see ``medprivacy.server.obfuscation``.

``ObfuscationClient`` is an ``InferenceClient`` (same TLS, token, timeouts, retries and one-line errors). It only
ever sends what ``Obfuscator.obfuscate`` returned (uint8 codes) and the key's public id, never a readable frame.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CancelledError, InputError, ServerError
from .client import Cancel, InferenceClient, cancel_check
from .contract import (
    OBFUSCATION_CLASSIFY_PATH,
    OBFUSCATION_JOBS_PATH,
    OBFUSCATION_KEY_ID_HEADER,
    OBFUSCATION_MODELS_PATH,
    OBFUSCATION_PREFIX,
    OBFUSCATION_TRAIN_PATH,
)
from .wire import CONTENT_TYPE, encode_tensor_raw

FINISHED = ("done", "failed", "cancelled")


class ObfuscationClient(InferenceClient):
    """Talks to the ObfuscationPrivacy endpoints of one server. Not thread-safe: one client per worker thread."""

    def submit_training(
        self,
        frames: np.ndarray,
        labels: Sequence[int],
        classes: Sequence[str],
        key_id: str,
        name: str = "",
        **params: Any,
    ) -> dict[str, Any]:
        """Queue a training job on obfuscated uint8 frames (N, H, W); returns the job's description (``job`` id)."""
        frames = _codes(frames)
        labels = [int(v) for v in labels]
        if len(labels) != len(frames):
            raise InputError(f"there are {len(frames)} frames but {len(labels)} labels")
        document = {
            "frames": base64.b64encode(encode_tensor_raw(frames[:, None])).decode("ascii"),
            "labels": labels,
            "classes": [str(c) for c in classes],
            "key_id": key_id,
            "name": name,
            "params": {k: v for k, v in params.items() if v is not None},
        }
        body = json.dumps(document).encode("utf-8")
        limit = (self._server_info or {}).get("max_request_bytes")
        if isinstance(limit, int) and len(body) > limit:
            raise ServerError(
                f"the training set makes a {len(body)}-byte request, over the limit of {limit} bytes of {self.url}; "
                "send fewer frames or ask the operator to raise --max-request-mb"
            )
        response = self._request(
            "POST", OBFUSCATION_TRAIN_PATH, data=body, headers={"Content-Type": "application/json"}
        )
        self._count(body, response)
        return self._answer(response, "job", OBFUSCATION_TRAIN_PATH)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._answer(self._request("GET", f"{OBFUSCATION_JOBS_PATH}/{job_id}"), "status", OBFUSCATION_JOBS_PATH)

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._answer(self._request("GET", OBFUSCATION_JOBS_PATH), "jobs", OBFUSCATION_JOBS_PATH)["jobs"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._answer(
            self._request("DELETE", f"{OBFUSCATION_JOBS_PATH}/{job_id}"), "status", OBFUSCATION_JOBS_PATH
        )

    def models(self) -> list[dict[str, Any]]:
        return list(
            self._answer(self._request("GET", OBFUSCATION_MODELS_PATH), "models", OBFUSCATION_MODELS_PATH)["models"]
        )

    def wait(
        self,
        job_id: str,
        progress: Callable[[dict], Any] | None = None,
        cancel: Cancel = None,
        poll: float = 1.0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it ends; returns its final description. A cancel request (``cancel``) cancels the job on
        the server and raises CancelledError; a failed job raises ServerError with the server's one-line reason."""
        is_cancelled = cancel_check(cancel)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.job(job_id)
            if progress is not None:
                progress(state)
            if state["status"] in FINISHED:
                break
            if is_cancelled():
                self.cancel(job_id)
                raise CancelledError(f"training job {job_id} cancelled on the server")
            if deadline is not None and time.monotonic() > deadline:
                raise ServerError(
                    f"training job {job_id} on {self.url} did not finish within {timeout:g} s; it goes on: "
                    f"ask for it later with 'medprivacy obfuscate job {job_id}'"
                )
            time.sleep(poll)
        if state["status"] == "failed":
            raise ServerError(f"training job {job_id} failed on {self.url}: {state.get('error') or 'no reason given'}")
        if state["status"] == "cancelled":
            raise CancelledError(f"training job {job_id} was cancelled")
        return state

    def classify(self, frames: np.ndarray, model: str, key_id: str, batch: int = 512) -> dict[str, Any]:
        """Class probabilities of obfuscated uint8 frames (N, H, W) under ``model``: ``{"classes", "probabilities",
        "predicted"}`` over all N, sent ``batch`` frames per request."""
        frames = _codes(frames)
        probabilities, classes = [], None
        for start in range(0, len(frames), batch):
            body = encode_tensor_raw(frames[start : start + batch, None])
            response = self._request(
                "POST",
                OBFUSCATION_CLASSIFY_PATH,
                data=body,
                params={"model": model},
                headers={"Content-Type": CONTENT_TYPE, OBFUSCATION_KEY_ID_HEADER: key_id},
            )
            self._count(body, response)
            answer = self._answer(response, "probabilities", OBFUSCATION_CLASSIFY_PATH)
            classes = answer.get("classes")
            probabilities.extend(answer["probabilities"])
        array = np.asarray(probabilities, dtype=np.float64)
        if array.shape[0] != len(frames) or not isinstance(classes, list) or array.shape[1] != len(classes):
            raise ServerError(
                f"{self.url} answered {array.shape[0]} results for {len(frames)} frames; "
                "check that client and server versions match"
            )
        return {"model": model, "classes": classes, "probabilities": array, "predicted": array.argmax(axis=1)}

    def _answer(self, response, field: str, path: str) -> dict[str, Any]:
        answer = self._json(response)
        if not isinstance(answer, dict) or field not in answer:
            raise ServerError(
                f"{self.url} answered {path} without {field!r}; check that client and server versions match"
            )
        return answer

    def _count(self, body: bytes, response) -> None:
        self.bytes_sent += len(body)
        self.bytes_received += len(response.content)

    def _raise_for_status(self, response, path: str) -> None:
        from .client import error_detail

        # The obfuscation endpoints' 404/409/422 details already name the problem and the fix.
        if path.startswith(OBFUSCATION_PREFIX) and response.status_code in (404, 409, 422, 503):
            detail = error_detail(response)
            if detail:
                raise ServerError(f"{self.url}: {detail}")
        super()._raise_for_status(response, path)


def _codes(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise InputError(
            f"obfuscated frames must be uint8 (N>0, H, W), got {frames.dtype} {frames.shape}; "
            "obfuscate them with the site key first"
        )
    return np.ascontiguousarray(frames)
