"""Binary wire format for numpy tensors exchanged between client and server.

Layout::

    b"MPXT" | version (1 byte) | header length (uint32 little-endian) | JSON header | payload

The header names ``shape``, ``dtype`` ("uint8", "float16" or "float32"), ``compression`` ("zlib" or "none"),
for uint8 the ``quantization`` (v in [0, 1] stored as round(v * 255)), and an optional ``meta`` dict.
The payload is the C-order little-endian array, optionally zlib-compressed.

No pickle anywhere: a tensor from the network is data, and unpickling data from a peer would let that peer run
code. Decoding trusts nothing: every field is checked and the decompressed size is bounded before it is allocated,
so a few kilobytes of zlib cannot expand into gigabytes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

import numpy as np

from ..errors import InputError
from ..quantization import LEVELS, to_codes, to_float32

__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "WIRE_VERSION",
    "decode_tensor",
    "decode_tensor_raw",
    "encode_tensor",
    "encode_tensor_raw",
    "to_float32",
]

MAGIC = b"MPXT"
WIRE_VERSION = 1
CONTENT_TYPE = "application/x-medprivacy-tensor"

#: A header is a shape, a few names and a small meta dict; anything bigger is not ours.
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
#: Level 1 keeps encoding far cheaper than the network transfer it saves; higher levels gain little on noisy
#: mixed patches and cost several times the CPU.
ZLIB_LEVEL = 1

_PREFIX = struct.Struct("<4sBI")
_DTYPES = {"uint8": np.dtype("u1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
_UINT8_QUANTIZATION = {"scheme": "linear", "low": 0.0, "high": 1.0, "levels": LEVELS}
_COMPRESSIONS = ("zlib", "none")
#: Rounding to float16 adds up to half a unit in the last place; allow that much outside [0, 1] before refusing.
_RANGE_SLACK = 1e-3


def encode_tensor(
    array: np.ndarray,
    dtype: str = "uint8",
    compress: bool = True,
    meta: dict[str, Any] | None = None,
) -> bytes:
    """Serialise ``array`` as ``dtype``; uint8 requires values in [0, 1] and stores round(v * 255)."""
    if dtype not in _DTYPES:
        raise InputError(f"unsupported wire dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise InputError(f"cannot send an array of dtype {array.dtype}; convert it to float32 first")
    return encode_tensor_raw(_to_wire_dtype(array, dtype), compress=compress, meta=meta)


def encode_tensor_raw(raw: np.ndarray, compress: bool = True, meta: dict[str, Any] | None = None) -> bytes:
    """Serialise an array already in its wire dtype (uint8 codes k meaning k/255, float16 or float32) as is."""
    raw = np.asarray(raw)
    dtype = raw.dtype.name
    if dtype not in _DTYPES:
        raise InputError(f"unsupported wire dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    if raw.ndim > MAX_NDIM:
        raise InputError(f"cannot send a {raw.ndim}-D array; at most {MAX_NDIM} dimensions are supported")
    payload = raw.astype(_DTYPES[dtype], copy=False).tobytes(order="C")
    header: dict[str, Any] = {
        "shape": [int(n) for n in raw.shape],
        "dtype": dtype,
        "compression": "zlib" if compress else "none",
    }
    if dtype == "uint8":
        header["quantization"] = dict(_UINT8_QUANTIZATION)
    if meta:
        header["meta"] = meta
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"tensor meta data cannot be written as JSON ({exc}); pass only str/number/list/dict values"
        ) from None
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise InputError(f"tensor header is {len(header_bytes)} bytes (limit {MAX_HEADER_BYTES}); send less meta data")
    if compress:
        payload = zlib.compress(payload, ZLIB_LEVEL)
    return b"".join((_PREFIX.pack(MAGIC, WIRE_VERSION, len(header_bytes)), header_bytes, payload))


def _to_wire_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise InputError("tensor contains NaN or infinite values; fix the input image before sending it")
    if dtype == "uint8":
        if array.size:
            low, high = float(array.min()), float(array.max())
            if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
                raise InputError(
                    f"uint8 encoding needs values in [0, 1] but got [{low:.4g}, {high:.4g}]; "
                    "normalise intensities first or send float16/float32"
                )
        return to_codes(array)
    if dtype == "float16" and array.size and float(np.abs(array).max()) > float(np.finfo(np.float16).max):
        raise InputError("values exceed the float16 range (65504); rescale them or send float32")
    return array.astype(_DTYPES[dtype], copy=False)


def decode_tensor_raw(data: bytes, max_elements: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode without dequantising: the array exactly as it travelled (uint8 codes, float16 or float32).

    Returns ``(array, header)``; the header carries ``dtype`` and ``meta``. The array is writable and owns its
    memory. Raises InputError with one line for anything malformed.
    """
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise InputError(f"tensor data is truncated ({len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix)")
    magic, version, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise InputError(
            "data is not a MedPrivacy tensor (bad magic bytes); check that client and server are MedPrivacy"
        )
    if version != WIRE_VERSION:
        raise InputError(
            f"tensor wire version {version} is not supported (this side reads version {WIRE_VERSION}); "
            "upgrade the older side"
        )
    if header_len > MAX_HEADER_BYTES:
        raise InputError(f"tensor header claims {header_len} bytes (limit {MAX_HEADER_BYTES}); the data is corrupt")
    body_start = _PREFIX.size + header_len
    if len(view) < body_start:
        raise InputError("tensor data is truncated inside its header; resend it")
    try:
        header = json.loads(bytes(view[_PREFIX.size : body_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested 30000 deep
        raise InputError("tensor header is not valid JSON; the data is corrupt") from None
    shape, dtype = _check_header(header)
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise InputError(
            f"tensor has {count} elements, more than the {max_elements} allowed; send fewer patches per request"
        )
    expected = count * dtype.itemsize
    payload = view[body_start:]
    if header["compression"] == "zlib":
        payload = _inflate_exactly(payload, expected)
    elif len(payload) != expected:
        raise InputError(
            f"tensor payload is {len(payload)} bytes but shape {shape} of {header['dtype']} needs {expected}; "
            "the data is truncated or corrupt"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise InputError("tensor contains NaN or infinite values; the sender produced invalid data")
    return array, header


def _check_header(header: Any) -> tuple[tuple[int, ...], np.dtype]:
    if not isinstance(header, dict):
        raise InputError("tensor header is not a JSON object; the data is corrupt")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise InputError(
            f"tensor header has an invalid shape {str(shape)[:80]}; "
            f"expected a list of at most {MAX_NDIM} non-negative integers"
        )
    name = header.get("dtype")
    if name not in _DTYPES:
        raise InputError(f"tensor dtype {str(name)[:40]!r} is not allowed; expected one of {', '.join(_DTYPES)}")
    if header.get("compression") not in _COMPRESSIONS:
        raise InputError(
            f"tensor compression {str(header.get('compression'))[:40]!r} is not supported; expected zlib or none"
        )
    if name == "uint8" and header.get("quantization") != _UINT8_QUANTIZATION:
        raise InputError("uint8 tensor uses an unknown quantisation; both sides must map [0, 1] to 0..255")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError("tensor meta data is not a JSON object; the data is corrupt")
    return tuple(shape), _DTYPES[name]


def _inflate_exactly(payload: memoryview, expected: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # max_length bounds memory by what the header promised (+1 to detect a longer stream).
        out = inflater.decompress(payload, expected + 1)
    except zlib.error:
        raise InputError("tensor payload is not valid zlib data; the data is corrupt") from None
    if len(out) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise InputError(
            f"tensor payload decompresses to a different size than its header promises ({expected} bytes); "
            "the data is truncated or corrupt"
        )
    return out


def decode_tensor(data: bytes, max_elements: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode to float32 (uint8 back to [0, 1]); returns ``(array, meta)``."""
    raw, header = decode_tensor_raw(data, max_elements=max_elements)
    return to_float32(raw, header["dtype"]), dict(header.get("meta", {}))
