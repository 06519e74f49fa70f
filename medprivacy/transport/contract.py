"""The HTTP contract between client and server, defined once: API version, headers, endpoint paths.

Both ends import these names (``transport.client`` and ``transport.watermark_client`` and
``transport.obfuscation_client`` to call, ``server.app`` and ``server.watermark`` and ``server.obfuscation`` to
route), so a path or a header can never differ between them. The tensor encoding carried in the bodies is
``transport.wire`` (its own ``WIRE_VERSION``). Bump ``API_VERSION`` (``medprivacy.API_VERSION``) whenever a path, a
header or the meaning of a request or answer changes.
"""

from __future__ import annotations

from .. import API_VERSION

__all__ = [
    "API_HEADER",
    "API_VERSION",
    "BASELINE_PATH",
    "HEALTH_PATH",
    "INFO_PATH",
    "MIXUP_PATH",
    "OBFUSCATION_CLASSIFY_PATH",
    "OBFUSCATION_JOBS_PATH",
    "OBFUSCATION_KEY_ID_HEADER",
    "OBFUSCATION_MODELS_PATH",
    "OBFUSCATION_PREFIX",
    "OBFUSCATION_TRAIN_PATH",
    "RESPONSE_DTYPE_HEADER",
    "RESPONSE_DTYPES",
    "SEGMENT_PATHS",
    "WATERMARK_CLASSIFY_PATH",
    "WATERMARK_LESIONS_PATH",
    "WATERMARK_OPTIMIZE_PATH",
    "WATERMARK_PREFIX",
]

#: Request header carrying the client's API_VERSION; the server answers 409 when it differs (absent: allowed).
API_HEADER = "X-MedPrivacy-API"
#: Request header choosing how probabilities come back: "uint8" codes (default) or "float16".
RESPONSE_DTYPE_HEADER = "X-MedPrivacy-Response-Dtype"
RESPONSE_DTYPES = ("uint8", "float16")

HEALTH_PATH = "/v1/health"
INFO_PATH = "/v1/info"
MIXUP_PATH = "/v1/mixup/segment"
BASELINE_PATH = "/v1/baseline/segment"
#: Segmentation endpoints by the name clients use for them.
SEGMENT_PATHS = {"mixup": MIXUP_PATH, "baseline": BASELINE_PATH}

WATERMARK_PREFIX = "/v1/watermark/"
WATERMARK_CLASSIFY_PATH = WATERMARK_PREFIX + "classify"
WATERMARK_LESIONS_PATH = WATERMARK_PREFIX + "lesions"
WATERMARK_OPTIMIZE_PATH = WATERMARK_PREFIX + "optimize"

OBFUSCATION_PREFIX = "/v1/obfuscation/"
OBFUSCATION_TRAIN_PATH = OBFUSCATION_PREFIX + "train"
OBFUSCATION_JOBS_PATH = OBFUSCATION_PREFIX + "jobs"
OBFUSCATION_MODELS_PATH = OBFUSCATION_PREFIX + "models"
OBFUSCATION_CLASSIFY_PATH = OBFUSCATION_PREFIX + "classify"
#: Request header naming the public id of the key obfuscated frames were made with.
OBFUSCATION_KEY_ID_HEADER = "X-MedPrivacy-Key-Id"
