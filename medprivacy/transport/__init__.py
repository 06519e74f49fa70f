"""Client side of the remote inference: binary tensor wire format and the HTTP client.

The client is imported lazily (``from medprivacy.transport.client import InferenceClient``) by callers that need
it, so code that only encodes tensors does not pay for importing requests.
"""

from __future__ import annotations

from .wire import (
    CONTENT_TYPE,
    WIRE_VERSION,
    decode_tensor,
    decode_tensor_raw,
    encode_tensor,
    encode_tensor_raw,
    to_float32,
)

__all__ = [
    "CONTENT_TYPE",
    "WIRE_VERSION",
    "decode_tensor",
    "decode_tensor_raw",
    "encode_tensor",
    "encode_tensor_raw",
    "to_float32",
    "InferenceClient",
]


def __getattr__(name: str):
    if name == "InferenceClient":
        from .client import InferenceClient

        return InferenceClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
