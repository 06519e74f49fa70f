"""Wire format: round trips, quantisation bounds and refusal of corrupt or hostile data."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from medprivacy.errors import InputError
from medprivacy.transport import wire


@pytest.fixture
def patches() -> np.ndarray:
    rng = np.random.default_rng(0)
    array = rng.random((3, 1, 5, 6, 7), dtype=np.float32)
    array[0, 0, 0, 0, :3] = [0.0, 1.0, 0.5]  # the ends of the range and an exact rounding tie
    return array


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [("uint8", 1 / 510 + 1e-6), ("float16", 1e-3), ("float32", 0.0)])
def test_round_trip(patches, dtype, tolerance, compress):
    data = wire.encode_tensor(patches, dtype=dtype, compress=compress, meta={"lam": [0.7, 0.8]})
    decoded, meta = wire.decode_tensor(data)
    assert decoded.dtype == np.float32 and decoded.shape == patches.shape
    assert np.abs(decoded - patches).max() <= tolerance
    assert meta == {"lam": [0.7, 0.8]}
    assert decoded.flags.writeable


def test_uint8_codes_are_round_v_times_255(patches):
    raw, header = wire.decode_tensor_raw(wire.encode_tensor(patches, "uint8"))
    assert raw.dtype == np.uint8 and header["dtype"] == "uint8"
    np.testing.assert_array_equal(raw, np.rint(patches * 255).astype(np.uint8))
    assert wire.to_float32(raw)[0, 0, 0, 0, 1] == 1.0


def test_compression_shrinks_redundant_data():
    zeros = np.zeros((4, 1, 16, 16, 16), np.float32)
    assert len(wire.encode_tensor(zeros)) < len(wire.encode_tensor(zeros, compress=False)) // 10


def test_empty_and_scalar_shapes_round_trip():
    for array in (np.zeros((0, 1, 4, 4, 4), np.float32), np.array(0.25, np.float32)):
        decoded, _ = wire.decode_tensor(wire.encode_tensor(array, "float32"))
        assert decoded.shape == array.shape
        np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    "array, dtype, message",
    [
        (np.array([0.0, 1.5], np.float32), "uint8", r"in \[0, 1\]"),
        (np.array([np.nan], np.float32), "float16", "NaN"),
        (np.array([1e6], np.float32), "float16", "float16 range"),
        (np.array(["a"]), "float32", "dtype"),
        (np.zeros(2, np.float32), "int64", "unsupported wire dtype"),
    ],
)
def test_encode_refuses_values_it_cannot_represent(array, dtype, message):
    with pytest.raises(InputError, match=message):
        wire.encode_tensor(array, dtype)


def _frame(header: dict, payload: bytes, magic: bytes = wire.MAGIC, version: int = wire.WIRE_VERSION) -> bytes:
    header_bytes = json.dumps(header).encode()
    return struct.pack("<4sBI", magic, version, len(header_bytes)) + header_bytes + payload


_GOOD_HEADER = {"shape": [2, 3], "dtype": "float32", "compression": "none"}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "truncated"),
        (b"MPX", "truncated"),
        (_frame(_GOOD_HEADER, bytes(24), magic=b"PK\x03\x04"), "bad magic"),
        (_frame(_GOOD_HEADER, bytes(24), version=9), "wire version 9"),
        (struct.pack("<4sBI", wire.MAGIC, 1, 2**31) + b"{}", "header claims"),
        (struct.pack("<4sBI", wire.MAGIC, 1, 100) + b'{"shape"', "truncated inside its header"),
        (struct.pack("<4sBI", wire.MAGIC, 1, 3) + b"{x}", "not valid JSON"),
        (_frame([1, 2], b""), "not a JSON object"),
        (_frame({**_GOOD_HEADER, "shape": [2, -3]}, bytes(24)), "invalid shape"),
        (_frame({**_GOOD_HEADER, "shape": [2, 3.0]}, bytes(24)), "invalid shape"),
        (_frame({**_GOOD_HEADER, "shape": [1] * 9}, bytes(4)), "invalid shape"),
        (_frame({**_GOOD_HEADER, "dtype": "object"}, bytes(24)), "not allowed"),
        (_frame({**_GOOD_HEADER, "compression": "lzma"}, bytes(24)), "not supported"),
        (_frame({**_GOOD_HEADER, "dtype": "uint8"}, bytes(6)), "quantisation"),
        (_frame({**_GOOD_HEADER, "meta": [1]}, bytes(24)), "meta"),
        (_frame(_GOOD_HEADER, bytes(23)), "payload is 23 bytes"),
        (_frame(_GOOD_HEADER, bytes(25)), "payload is 25 bytes"),
        (_frame({**_GOOD_HEADER, "compression": "zlib"}, b"not zlib at all"), "not valid zlib"),
        (_frame({**_GOOD_HEADER, "compression": "zlib"}, zlib.compress(bytes(24))[:-3]), "different size"),
        (_frame({**_GOOD_HEADER, "compression": "zlib"}, zlib.compress(bytes(28))), "different size"),
        (_frame({**_GOOD_HEADER, "compression": "zlib"}, zlib.compress(bytes(24)) + b"x"), "different size"),
        (_frame(_GOOD_HEADER, np.full(6, np.inf, "<f4").tobytes()), "NaN or infinite"),
    ],
)
def test_decode_refuses_corrupt_data(data, message):
    with pytest.raises(InputError, match=message) as info:
        wire.decode_tensor(data)
    assert "\n" not in str(info.value)


def test_every_truncation_of_a_valid_tensor_is_refused(patches):
    data = wire.encode_tensor(patches[:1, :, :2], "uint8")
    for cut in range(len(data)):
        with pytest.raises(InputError):
            wire.decode_tensor(data[:cut])


def test_element_limit_is_checked_before_decompressing():
    # 1 GiB of zeros compresses to about a megabyte; the limit must refuse it before inflating anything.
    header = {
        "shape": [1024, 1024, 1024],
        "dtype": "uint8",
        "compression": "zlib",
        "quantization": {"scheme": "linear", "low": 0.0, "high": 1.0, "levels": 255},
    }
    bomb = _frame(header, zlib.compress(bytes(1 << 20)))
    with pytest.raises(InputError, match="more than the 1000000 allowed"):
        wire.decode_tensor(bomb, max_elements=1_000_000)
    # Without a limit it is still refused: the stream inflates to less than the header promises.
    with pytest.raises(InputError, match="different size"):
        wire.decode_tensor(bomb)


def test_header_size_limit_on_encode():
    with pytest.raises(InputError, match="header"):
        wire.encode_tensor(np.zeros(1, np.float32), "float32", meta={"x": "y" * (wire.MAX_HEADER_BYTES + 1)})
    with pytest.raises(InputError, match="JSON"):
        wire.encode_tensor(np.zeros(1, np.float32), "float32", meta={"x": object()})


def test_raw_encoding_sends_codes_as_they_are():
    codes = np.arange(256, dtype=np.uint8).reshape(4, 64)
    raw, header = wire.decode_tensor_raw(wire.encode_tensor_raw(codes, meta={"k": 1}))
    np.testing.assert_array_equal(raw, codes)
    assert header["meta"] == {"k": 1}
    decoded, _ = wire.decode_tensor(wire.encode_tensor_raw(codes))
    assert decoded[0, 0] == 0.0 and decoded[-1, -1] == 1.0
    half = np.array([0.5, 2.0], np.float16)
    assert wire.decode_tensor_raw(wire.encode_tensor_raw(half))[0].dtype == np.float16
    with pytest.raises(InputError, match="unsupported wire dtype"):
        wire.encode_tensor_raw(np.zeros(2, np.int32))
