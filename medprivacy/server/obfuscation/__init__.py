"""ObfuscationPrivacy endpoints: train a classifier on obfuscated frames as a background job, and classify with it.

The server never sees a readable frame: clients send uint8 codes made with their site key (``medprivacy.obfuscation``),
plus the key's public ``key_id`` so that frames from another key are refused instead of silently misclassified.
A trained model is bound to the key of its training frames.

Endpoints (same bearer token, size limit, API-version header and one-line JSON errors as the rest of the server):

``POST /v1/obfuscation/train``
    JSON ``{"frames": <base64 wire tensor (N, 1, H, W) or (N, H, W) uint8>, "labels": [int, ...], "classes":
    [name, ...], "key_id": "...", "name": "optional label", "params": {"steps", "batch_size", "learning_rate",
    "validation_fraction", "seed"}}``. Checks everything it can at once (one class only, label out of range, frame
    size, limits) and answers 202 ``{"job": id, "status": "queued", ...}``. Jobs run one at a time, in the order
    received, on the server's device; they do not depend on the request, so a client that disconnects (or crashes)
    loses nothing: it asks for the job again later.
``GET /v1/obfuscation/jobs`` and ``GET /v1/obfuscation/jobs/{id}``
    State (queued, running, done, failed, cancelled), progress (step, steps, loss, validation accuracy), the model
    id when done, a one-line error when failed.
``DELETE /v1/obfuscation/jobs/{id}``
    Cancel: a queued job never starts, a running one stops at its next step.
``GET /v1/obfuscation/models``
    The trained models: id, classes, frame size, key id, validation accuracy, training frames, created.
``POST /v1/obfuscation/classify?model=ID``
    Body: a wire tensor (N, 1, H, W) or (N, H, W) uint8; header ``X-MedPrivacy-Key-Id``. Answer: ``{"model",
    "classes", "probabilities": [[...], ...], "predicted": [...]}``.

Storage: trained models live in memory and are gone when the server stops, unless the operator gives
``--model-store DIR``: then each finished model is written there (safetensors + JSON, atomically, 0600 in a 0700
folder) and loaded again at the next start. Nothing a client sends is written anywhere, except the audit copy
(``--audit-dir``) an operator asks for.
"""

from __future__ import annotations

from .routes import add_obfuscation_routes
from .service import ObfuscationLimits, ObfuscationService

__all__ = ["ObfuscationLimits", "ObfuscationService", "add_obfuscation_routes"]
