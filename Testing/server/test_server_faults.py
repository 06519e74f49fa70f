"""The server under a hostile or unlucky client, over real sockets against real uvicorn: never a 5xx for bad input,
no connection held by a client that stalls, no traceback for a client that leaves, memory bounded under load.

The fuzz test sends a seeded mix of broken requests to every endpoint (broken tensors, headers, query strings,
JSON documents and parameters at and beyond their bounds) and allows no answer of 500 or more.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from conftest import REPO_ROOT, TINY_PATCH, build_tiny_models, build_watermark_models, launch_server
from faults import glibc_heaps

from medprivacy.transport.watermark_client import WatermarkClient, exact_image_tensor
from medprivacy.transport.wire import CONTENT_TYPE, MAGIC, encode_tensor, encode_tensor_raw
from medprivacy.watermark import blending

STALL_TIMEOUT = 2.0
FUZZ_REQUESTS = 800


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The tiny Mixup models and the tiny MedLocker models in one folder: one server with every endpoint."""
    folder = tmp_path_factory.mktemp("all-models")
    build_tiny_models(folder)
    return build_watermark_models(folder, classifiers=("wm-cls-resnet18", "wm-cls-vit"))


@pytest.fixture(scope="module")
def servers(models_dir, tmp_path_factory):
    """(every endpoint with baseline and audit copies, the same with a 2 s request timeout), started together."""
    audit = tmp_path_factory.mktemp("fault-audit")
    full = launch_server(["--enable-baseline", "--audit-dir", audit], models_dir=models_dir)
    try:
        impatient = launch_server(["--request-timeout", str(STALL_TIMEOUT)], models_dir=models_dir)
    except BaseException:
        full.stop()
        raise
    try:
        yield full.wait_ready(), impatient.wait_ready()
    finally:
        full.stop()
        impatient.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return session


def _host_port(handle) -> tuple[str, int]:
    host, port = handle.url.split("//")[1].rsplit(":", 1)
    return host, int(port)


def _server_problems(handle) -> list[str]:
    return [
        line
        for line in handle.log().splitlines()
        if "Traceback" in line or " ERROR " in line or "Exception in ASGI" in line
    ]


# --- 3. fuzz: no 5xx, ever -----------------------------------------------------------------------------------------

_HUGE = [
    10**12,
    10**19,
    2**64,
    1e300,
    -1e300,
    1e-300,
    -1,
    0,
    1.5,
    "7",
    True,
    None,
    [],
    {},
    [1, 2, 3],
    {"a": 1},
    "x" * 5000,
]


def _raw_tensor(
    shape, dtype="uint8", compression="zlib", payload=None, header_extra=None, magic=MAGIC, version=1
) -> bytes:
    header = {"shape": shape, "dtype": dtype, "compression": compression, **(header_extra or {})}
    if dtype == "uint8" and "quantization" not in header:
        header["quantization"] = {"scheme": "linear", "low": 0.0, "high": 1.0, "levels": 255}
    header_bytes = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if payload is None:
        count = int(np.prod(shape)) if all(isinstance(n, int) and 0 <= n < 10**6 for n in shape) else 0
        payload = np.zeros(
            min(count, 10**6), dtype={"uint8": "u1", "float16": "<f2", "float32": "<f4"}.get(dtype, "u1")
        ).tobytes()
        if compression == "zlib":
            payload = zlib.compress(payload)
    return struct.pack("<4sBI", magic, version, len(header_bytes)) + header_bytes + payload


def _broken_tensor(rng, images: bool = False) -> bytes:
    """A wire body that is wrong in one of many ways, or (one time in four) fine: patches, or ``images``
    (N, C, H, W)."""
    kind = int(rng.integers(0, 20))
    shape = (
        (int(rng.integers(1, 4)), int(rng.choice([1, 3])), int(rng.integers(8, 48)), int(rng.integers(8, 48)))
        if images
        else (int(rng.integers(1, 5)), 1, *TINY_PATCH)
    )
    good = encode_tensor(rng.random(shape, dtype=np.float32), ["uint8", "float16"][int(rng.integers(0, 2))])
    if kind == 0:
        return b""
    if kind == 1:
        return rng.bytes(int(rng.integers(1, 4000)))
    if kind == 2:  # truncated
        return good[: int(rng.integers(1, len(good)))]
    if kind == 3:  # flipped bytes
        data = bytearray(good)
        for i in rng.integers(0, len(data), 8):
            data[i] ^= 0xFF
        return bytes(data)
    if kind == 4:  # a header that is not our JSON
        header = [b"[" * 30000 + b"]" * 30000, b"{" * 5000, b"null", b"[]", b'{"shape": "x"}', b"\xff\xfe", b"1e999"][
            int(rng.integers(0, 7))
        ]
        return struct.pack("<4sBI", MAGIC, 1, len(header)) + header
    if kind == 5:  # a shape that promises far more than is sent (a decompression bomb in disguise)
        return _raw_tensor([int(v) for v in rng.integers(1, 10**6, 5)], payload=zlib.compress(b"\0" * 1000))
    if kind == 6:  # shapes of the wrong rank and size
        rank = int(rng.integers(0, 9))
        return _raw_tensor([int(v) for v in rng.integers(0, 18, rank)])
    if kind == 7:
        return _raw_tensor([1, 1, *TINY_PATCH], dtype=["float64", "int8", "bool", "object", 7][int(rng.integers(0, 5))])
    if kind == 8:
        return _raw_tensor([1, 1, *TINY_PATCH], compression=["gzip", "bz2", None, 1][int(rng.integers(0, 4))])
    if kind == 9:  # float16 values outside [0, 1], NaN, infinity
        value = [np.nan, np.inf, -np.inf, -1.0, 2.0, 65504.0][int(rng.integers(0, 6))]
        payload = zlib.compress(np.full((1, 1, *TINY_PATCH), value, dtype="<f2").tobytes())
        return _raw_tensor([1, 1, *TINY_PATCH], dtype="float16", payload=payload)
    if kind == 10:
        return _raw_tensor([1, 1, *TINY_PATCH], header_extra={"meta": [1, 2]})
    if kind == 11:
        return _raw_tensor([1, 1, *TINY_PATCH], magic=b"NOPE")
    if kind == 12:
        return _raw_tensor([1, 1, *TINY_PATCH], version=int(rng.integers(2, 256)))
    if kind == 13:  # MedLocker-sized images, sometimes fine
        shape = [
            int(rng.integers(0, 3)),
            int(rng.choice([1, 2, 3, 4])),
            int(rng.integers(0, 40)),
            int(rng.integers(0, 40)),
        ]
        return _raw_tensor(shape, dtype=["uint8", "float16"][int(rng.integers(0, 2))])
    if kind == 14:
        return _raw_tensor([1, 1, *TINY_PATCH], header_extra={"quantization": {"scheme": "log"}})
    return good


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _optimize_document(rng) -> bytes:
    """An optimize request with one or more fields broken, most often a parameter beyond its bounds."""
    height, width = int(rng.integers(24, 48)), int(rng.integers(24, 48))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    logo = blending.default_logo(32)
    document = {
        "image": _b64(exact_image_tensor(image)),
        "logo": _b64(encode_tensor_raw(np.moveaxis(logo, -1, 0)[None])),
        # Searches that do get through stay tiny, so a fuzz run takes seconds.
        "params": {
            "mode": "wap",
            "population": 2,
            "generations": 1,
            "local_iterations": 1,
            "max_evaluations": 6,
            "seed": 0,
        },
    }
    keys = [
        "mode",
        "lesions",
        "mask_threshold",
        "mask_params",
        "models",
        "weights",
        "sl",
        "population",
        "generations",
        "crossover_rate",
        "step",
        "local_iterations",
        "alpha_range",
        "alpha_step",
        "mutation",
        "seed",
        "label",
        "max_evaluations",
        "window",
        "popsize",
    ]
    for _ in range(int(rng.integers(1, 4)) if rng.random() < 0.75 else 0):
        key = keys[int(rng.integers(0, len(keys)))]
        choice = int(rng.integers(0, 4))
        if choice == 0:
            value = _HUGE[int(rng.integers(0, len(_HUGE)))]
        elif choice == 1 and key == "mask_params":
            value = {
                k: _HUGE[int(rng.integers(0, len(_HUGE)))]
                for k in ("kernel", "iterations", "min_area", "gamma")[: int(rng.integers(1, 5))]
            }
        elif choice == 1:
            value = [_HUGE[int(rng.integers(0, len(_HUGE)))] for _ in range(int(rng.integers(0, 4)))]
        elif choice == 2:
            value = {
                "mode": "keep-in",
                "lesions": "server",
                "mutation": "random",
                "models": ["wm-cls-vit", "wm-cls-resnet18"],
                "window": [0, 255],
                "alpha_range": [255, 100],
                "label": 1,
                "sl": 0.01,
                "mask_threshold": 0.999,
            }.get(key, 1)
        else:
            value = "".join(chr(int(c)) for c in rng.integers(32, 0x2FF, int(rng.integers(0, 20))))
        document["params"][key] = value
    broken = int(rng.integers(0, 12))
    if broken == 0:
        document["image"] = _b64(_broken_tensor(rng))
    elif broken == 1:
        document["logo"] = ["!!!", "", _b64(b"x"), _b64(_broken_tensor(rng))][int(rng.integers(0, 4))]
    elif broken == 2:
        mask = rng.integers(0, 2, (int(rng.integers(1, 50)), int(rng.integers(1, 50)))).astype(np.uint8)
        document["mask"] = _b64(encode_tensor_raw(mask[None, None]))
    elif broken == 3:
        document[["extra", "params", "image", "mask"][int(rng.integers(0, 4))]] = _HUGE[
            int(rng.integers(0, len(_HUGE)))
        ]
    elif broken == 4:
        return ("[" * int(rng.integers(100, 200000))).encode()
    elif broken == 5:
        return json.dumps(document).encode()[: int(rng.integers(1, 200))]
    elif broken == 6:  # nested deeper than Python's own json module could even write
        depth = int(rng.integers(100, 5000))
        document["params"]["mask_params"] = "NESTED"
        return json.dumps(document).replace('"NESTED"', '{"a": ' * depth + "1" + "}" * depth).encode()
    elif broken == 7:
        return json.dumps(document, allow_nan=True).replace('"seed": 0', '"seed": NaN').encode()
    return json.dumps(document, allow_nan=True).encode()


def _fuzz_requests(count: int, seed: int = 12):
    """(method, path, headers, params, body) for every endpoint, seeded."""
    rng = np.random.default_rng(seed)
    endpoints = [
        "/v1/mixup/segment",
        "/v1/baseline/segment",
        "/v1/watermark/classify",
        "/v1/watermark/lesions",
        "/v1/watermark/optimize",
        "/v1/health",
        "/v1/info",
    ]
    for index in range(count):
        path = endpoints[index % len(endpoints)]
        method = "GET" if path in ("/v1/health", "/v1/info") else "POST"
        headers: dict[str, str] = {}
        params: dict[str, str] | None = None
        body: bytes | None = None
        if method == "POST":
            body = (
                _optimize_document(rng)
                if path.endswith("optimize")
                else _broken_tensor(rng, images="watermark" in path)
            )
            headers["Content-Type"] = "application/json" if path.endswith("optimize") else CONTENT_TYPE
        roll = rng.random()
        if roll < 0.08:
            headers["Content-Type"] = [
                "text/plain",
                "",
                "application/json; charset=latin-1",
                CONTENT_TYPE + "x",
                "multipart/form-data; boundary=x",
            ][int(rng.integers(0, 5))]
        elif roll < 0.14:
            headers["X-MedPrivacy-API"] = ["0", "2", "x" * 300, "1 ", "-1", "\u00e9"][int(rng.integers(0, 6))]
        elif roll < 0.20:
            headers["X-MedPrivacy-Response-Dtype"] = ["float32", "int8", "", "UINT8", "x" * 100][
                int(rng.integers(0, 5))
            ]
        elif roll < 0.27:
            key = ["models", "model", "x", "models", "model"][int(rng.integers(0, 5))]
            value = ["wm-cls-vit", "nope", "", ",,,", "a" * 20000, "wm-cls-vit,wm-cls-vit", "\u00e9\u00e8"][
                int(rng.integers(0, 7))
            ]
            params = [(key, value)] + ([(key, value)] if rng.random() < 0.3 else [])
        elif roll < 0.31:
            headers["Authorization"] = ["Bearer ", "Basic abc", "Bearer " + "x" * 5000][int(rng.integers(0, 3))]
        elif roll < 0.35 and method == "POST":
            method = ["GET", "PUT", "DELETE", "PATCH"][int(rng.integers(0, 4))]
        elif roll < 0.37:
            path = ["/v1", "/v2/info", "/v1/watermark", "/v1/mixup/segment/..", "/" + "a" * 3000][
                int(rng.integers(0, 5))
            ]
        yield method, path, headers, params, body


def test_fuzz_every_endpoint_never_answers_5xx(server):
    statuses: Counter = Counter()
    by_endpoint: dict[str, Counter] = {}
    started = time.monotonic()
    with _session() as session:
        for method, path, headers, params, body in _fuzz_requests(FUZZ_REQUESTS):
            response = session.request(method, server.url + path, headers=headers, params=params, data=body, timeout=60)
            statuses[response.status_code] += 1
            by_endpoint.setdefault(path if path.startswith("/v1/") and len(path) < 40 else "other", Counter())[
                response.status_code
            ] += 1
            assert response.status_code < 500, (method, path, headers, params, (body or b"")[:300], response.text[:500])
            if response.status_code >= 400:
                detail = response.json().get("detail")
                assert isinstance(detail, str) and "\n" not in detail and detail, response.text[:300]
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {sum(statuses.values())} requests in {elapsed:.1f} s, statuses {dict(sorted(statuses.items()))}")
    for path, counts in sorted(by_endpoint.items()):
        print(f"  {path}: {dict(sorted(counts.items()))}")
    assert sum(statuses.values()) >= 750
    for path in (
        "/v1/mixup/segment",
        "/v1/baseline/segment",
        "/v1/watermark/classify",
        "/v1/watermark/lesions",
        "/v1/watermark/optimize",
    ):
        assert by_endpoint[path][200] >= 5, path  # the mix reaches the models too, not only the validators
    assert not _server_problems(server)
    assert server.client().health() == {"status": "ok"}


@pytest.mark.parametrize(
    "params",
    [
        {"population": 1e300},
        {"population": 10**12},
        {"step": 10**19},
        {"step": 1e300},
        {"mask_params": {"kernel": 1e300}},
    ],
)
def test_optimize_parameters_beyond_their_bounds_are_refused_and_the_connection_lives(server, params):
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    document = {
        "image": _b64(exact_image_tensor(image)),
        "logo": _b64(encode_tensor_raw(np.moveaxis(blending.default_logo(32), -1, 0)[None])),
        "params": {"mode": "wap", **params},
    }
    with _session() as session:
        for body in (json.dumps(document).encode(), b'{"image": ' + b"[" * 100000):
            response = session.post(
                server.url + "/v1/watermark/optimize",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            assert response.status_code == 422, response.text[:300]
        # Same keep-alive connection: still there, still answering.
        assert session.get(server.url + "/v1/health", timeout=10).json() == {"status": "ok"}


# --- 4, 5. clients that leave or stall ------------------------------------------------------------------------------


def test_client_leaving_mid_upload_is_one_info_line(server):
    host, port = _host_port(server)
    before = len(server.log().splitlines())
    for path in ("/v1/mixup/segment", "/v1/watermark/optimize"):
        kind = "application/json" if path.endswith("optimize") else CONTENT_TYPE
        with socket.create_connection((host, port)) as peer:
            peer.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: 1000000\r\n\r\n".encode()
                + b"\0" * 5000
            )
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.log().count("disconnected during the upload") < 2:
        time.sleep(0.1)
    new = server.log().splitlines()[before:]
    assert sum("disconnected during the upload" in line and " INFO " in line for line in new) == 2, "\n".join(new)
    assert not [line for line in new if "Traceback" in line or " ERROR " in line], "\n".join(new)


def test_stalled_and_trickling_requests_are_dropped(servers):
    impatient = servers[1]
    host, port = _host_port(impatient)
    peers = []
    # Seven uploads that declare 200 MB and send 4 bytes, one that never finishes its headers, one that sends nothing.
    for _ in range(7):
        peer = socket.create_connection((host, port))
        peer.sendall(
            f"POST /v1/mixup/segment HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: "
            "200000000\r\n\r\nMPXT".encode()
        )
        peers.append(("body", peer))
    half = socket.create_connection((host, port))
    half.sendall(b"POST /v1/mixup/segment HTTP/1.1\r\nHost: x\r\n")
    peers.append(("headers", half))
    peers.append(("silent", socket.create_connection((host, port))))
    # One trickling upload: a byte every 0.2 s never stalls long enough for the timeout, but is far below 1 KiB/s.
    trickle = socket.create_connection((host, port))
    trickle.sendall(
        f"POST /v1/watermark/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: "
        "100000\r\n\r\n".encode()
    )
    started = time.monotonic()
    everyone = [p for _, p in peers] + [trickle]
    received = {index: b"" for index in range(len(everyone))}
    closed: set[int] = set()
    for peer in everyone:
        peer.settimeout(0.05)
    while time.monotonic() - started < 4 * STALL_TIMEOUT + 6 and len(closed) < len(everyone):
        try:
            trickle.sendall(b"\0")
        except OSError:
            pass
        for index, peer in enumerate(everyone):
            if index in closed:
                continue
            try:
                data = peer.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if data:
                received[index] += data
            else:
                closed.add(index)
        time.sleep(0.15)
    answers = received
    elapsed = time.monotonic() - started
    kinds = [k for k, _ in peers] + ["trickle"]
    assert len(closed) == len(kinds), (
        f"still open after {elapsed:.0f} s: {[kinds[i] for i in range(len(kinds)) if i not in closed]}"
    )
    for index, data in answers.items():
        assert data.startswith(b"HTTP/1.1 408 "), (kinds[index], data[:200])
    assert b"stalled" in answers[0] and b"too slowly" in answers[len(kinds) - 1] and b"request headers" in answers[7]
    for _, peer in peers:
        peer.close()
    trickle.close()
    assert not _server_problems(impatient)
    assert WatermarkClient(impatient.url, retries=0).health() == {"status": "ok"}


# --- 9. memory: the worker threads share one malloc arena ------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc arenas are a Linux matter")
def test_worker_threads_share_a_bounded_number_of_malloc_arenas(server):
    """Per-thread glibc arenas are what made RSS grow from 463 to 1716 MiB under 8 clients; the server caps them."""
    failures = []

    def work(seed: int) -> None:
        try:
            client = WatermarkClient(server.url, retries=0)
            rng = np.random.default_rng(seed)
            for _ in range(12):
                client.segment(rng.random((24, 1, *TINY_PATCH), dtype=np.float32))
                client.classify(rng.random((4, 3, 48, 48), dtype=np.float32))
        except Exception as exc:  # reported below: a thread's exception would otherwise vanish
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert glibc_heaps(server.process.pid) <= 1  # the main arena plus at most one shared by all workers
    assert "memory: glibc malloc limited to 2 arenas" in server.log()


# --- 10. audit copies of every endpoint that receives images -------------------------------------------------------


def test_audit_dir_keeps_what_every_image_endpoint_received(server):
    audit = server.audit_dir
    before = set(audit.glob("*.npy"))
    client = WatermarkClient(server.url, retries=0)
    images = np.random.default_rng(5).random((2, 3, 40, 48), dtype=np.float32)
    client.classify(images)
    client.lesions(images[0])
    pixels = np.random.default_rng(6).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), dtype=bool)
    mask[10:20, 10:20] = True
    client.optimize(
        pixels,
        blending.default_logo(32),
        mask=mask,
        mode="keep-out",
        population=2,
        generations=0,
        seed=0,
        mask_params={"kernel": 1, "iterations": 0, "min_area": 0},
    )
    new = {p.name.split("-", 2)[-1]: p for p in set(audit.glob("*.npy")) - before}  # stamp-counter-kind.npy
    assert set(new) == {"classify.npy", "lesions.npy", "optimize-image.npy", "optimize-mask.npy"}, sorted(new)
    np.testing.assert_array_equal(np.load(new["classify.npy"]), np.rint(images * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.load(new["lesions.npy"]), np.rint(images[:1] * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.load(new["optimize-image.npy"]), pixels)
    np.testing.assert_array_equal(np.load(new["optimize-mask.npy"]), mask.astype(np.uint8))


# --- 10. a silent server, a slow one ----------------------------------------------------------------------------


def _passphrase_file(folder) -> str:
    path = folder / "passphrase.txt"
    path.write_text("correct horse battery staple\n")
    return str(path)


def _cli(*args, timeout):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "medprivacy.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def test_a_silent_server_is_recognised_in_seconds(tmp_path):
    """A peer that accepts connections and never answers: found at the first call, not after the 30-minute timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(4)], daemon=True).start()
    image = tmp_path / "a.png"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 48), np.uint8) + 7), str(image))
    started = time.monotonic()
    try:
        result = _cli(
            "watermark",
            "protect",
            image,
            "-o",
            tmp_path / "out",
            "--key",
            tmp_path / "k.mlkey",
            "--passphrase-file",
            _passphrase_file(tmp_path),
            "--server",
            f"http://127.0.0.1:{listener.getsockname()[1]}",
            timeout=60,
        )
    finally:
        listener.close()
    elapsed = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "accepted the connection but did not answer /v1/info within 10 s" in lines[0]
    assert elapsed < 30


class _InfoThenSilence(BaseHTTPRequestHandler):
    """Answers /v1/info like a MedLocker server, then never answers a search."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "api_version": 1,
                "max_request_bytes": 10**8,
                "models": {"wm-cls": {"task": "classify", "labels": {"0": "no lesion", "1": "lesion"}}},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(5)

    def log_message(self, *args) -> None:
        pass


def test_the_timeout_message_names_the_option_to_raise(tmp_path):
    stand_in = ThreadingHTTPServer(("127.0.0.1", 0), _InfoThenSilence)
    threading.Thread(target=stand_in.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    image = tmp_path / "a.png"
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 48), np.uint8) + 7), str(image))
    try:
        result = _cli(
            "watermark",
            "protect",
            image,
            "-o",
            tmp_path / "out",
            "--key",
            tmp_path / "k.mlkey",
            "--passphrase-file",
            _passphrase_file(tmp_path),
            "--server",
            f"http://127.0.0.1:{stand_in.server_address[1]}",
            "--timeout",
            "1",
            "--lesions",
            "none",
            timeout=60,
        )
    finally:
        stand_in.shutdown()
        stand_in.server_close()
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "did not answer within 1 s (read timeout); raise --timeout (now 1 s)" in lines[0]
    assert not (tmp_path / "k.mlkey").exists() and not list((tmp_path / "out").glob("*"))
