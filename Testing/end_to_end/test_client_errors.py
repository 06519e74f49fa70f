"""Client failure modes: every one becomes a single line from medprivacy.errors that names the fix.

Failures our server cannot produce on demand (a hung peer, a gateway answering 503, a non-MedPrivacy web server)
come from tiny stand-ins in this file; they imitate the network, not our server's logic.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import TINY_PATCH

from medprivacy import API_VERSION
from medprivacy.errors import AuthError, CancelledError, InputError, ServerError, VersionMismatchError
from medprivacy.server.local import free_port
from medprivacy.transport.client import InferenceClient


def _patches(count: int) -> np.ndarray:
    return np.random.default_rng(3).random((count, 1, *TINY_PATCH), dtype=np.float32)


class _Canned(BaseHTTPRequestHandler):
    """Answers every request with the class attributes; counts the requests it saw."""

    status = 200
    body = b""
    content_type = "application/json"
    extra_headers: dict = {}
    hits: list

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).hits.append((self.command, self.path, dict(self.headers)))
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def canned_server():
    """``canned_server(status=..., body=..., content_type=..., extra_headers=...)`` -> (url, hits)."""
    servers = []

    def start(**attributes):
        handler = type("Handler", (_Canned,), {"hits": [], **attributes})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.hits

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_unreachable_server_fails_fast_with_a_hint():
    client = InferenceClient(
        f"http://127.0.0.1:{free_port()}", token="secret-token-value", connect_timeout=0.5, retries=1
    )
    started = time.monotonic()
    with pytest.raises(
        ServerError,
        match=r"cannot reach http://127\.0\.0\.1:\d+ \(.*refused\); check the URL and that the server is running",
    ) as info:
        client.segment(_patches(1))
    assert time.monotonic() - started < 5
    assert "secret-token-value" not in str(info.value) and "\n" not in str(info.value)


def test_unknown_host_is_reported_as_unreachable():
    with pytest.raises(ServerError, match="cannot reach http://medprivacy-test.invalid:8765"):
        InferenceClient("http://medprivacy-test.invalid:8765", retries=0, connect_timeout=2).health()


def test_read_timeout_names_the_timeout_and_is_not_resent():
    accepted = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts and never answers: a hung server

        def accept_forever() -> None:
            try:
                while True:
                    accepted.append(silent.accept()[0])
            except OSError:
                pass

        threading.Thread(target=accept_forever, daemon=True).start()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerError, match=r"did not answer within 0\.3 s \(read timeout\); raise the read timeout"):
            InferenceClient(url, read_timeout=0.3, retries=2).segment(_patches(1))
        assert len(accepted) == 1
        for connection in accepted:
            connection.close()


def test_cancel_before_sending_anything(live_server):
    event = threading.Event()
    event.set()
    client = live_server.client()
    with pytest.raises(CancelledError, match="after 0 of 2 patches"):
        client.segment(_patches(2), cancel=event)
    with pytest.raises(CancelledError):
        client.segment(_patches(2), cancel=lambda: True)
    assert client.bytes_sent == 0


def test_cancel_between_requests(live_server):
    client = live_server.client(request_patches=1)
    calls = []
    with pytest.raises(CancelledError, match="after 1 of 3 patches"):
        client.segment(_patches(3), progress=lambda done, total: calls.append(done), cancel=lambda: bool(calls))
    assert calls == [1] and client.bytes_sent > 0


def test_gateway_errors_are_retried_for_post(canned_server):
    url, hits = canned_server(status=503, body=b'{"detail": "upstream busy"}', extra_headers={"Retry-After": "0"})
    with pytest.raises(ServerError, match="answered HTTP 503: upstream busy"):
        InferenceClient(url, retries=1).segment(_patches(1))
    assert [h[0] for h in hits] == ["POST"] * 2


def test_client_errors_are_not_retried_and_carry_the_detail(canned_server):
    url, hits = canned_server(status=400, body=b'{"detail": "bad thing; do the fix"}')
    with pytest.raises(ServerError, match="answered HTTP 400: bad thing; do the fix"):
        InferenceClient(url, retries=3).segment(_patches(1))
    assert len(hits) == 1


def test_non_medprivacy_server_is_named(canned_server):
    url, _ = canned_server(body=b"<html>hello</html>", content_type="text/html")
    with pytest.raises(ServerError, match="did not answer JSON; check that the URL points at a MedPrivacy server"):
        InferenceClient(url, retries=0).info()
    with pytest.raises(ServerError, match="answered text/html instead of a tensor"):
        InferenceClient(url, retries=0).segment(_patches(1))


def test_unknown_path_is_named(canned_server):
    url, _ = canned_server(status=404, body=b'{"detail": "Not Found"}')
    with pytest.raises(ServerError, match=r"/v1/mixup/segment does not exist \(HTTP 404 Not Found\)"):
        InferenceClient(url, retries=0).segment(_patches(1))


def test_redirect_is_not_followed(canned_server):
    url, hits = canned_server(status=307, extra_headers={"Location": "http://elsewhere.invalid/v1/info"})
    with pytest.raises(ServerError, match="redirects to http://elsewhere.invalid/v1/info; use that URL"):
        InferenceClient(url, token="tok", retries=0).info()
    assert len(hits) == 1


def test_other_api_version_in_info(canned_server):
    url, _ = canned_server(body=json.dumps({"api_version": API_VERSION + 1}).encode())
    with pytest.raises(
        VersionMismatchError,
        match=f"speaks MedPrivacy API version {API_VERSION + 1} but this client speaks {API_VERSION}",
    ):
        InferenceClient(url, retries=0).check_connection()


def test_headers_sent(canned_server, tmp_path, monkeypatch):
    url, hits = canned_server(body=json.dumps({"api_version": API_VERSION}).encode())
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    monkeypatch.setenv("MEDPRIVACY_TOKEN", "env-token")
    InferenceClient(url, token_file=token_file).info()
    InferenceClient(url).info()
    InferenceClient(url, token="arg-token", token_file=token_file).info()
    assert [h[2]["Authorization"] for h in hits] == ["Bearer file-token", "Bearer env-token", "Bearer arg-token"]
    assert hits[0][2]["X-MedPrivacy-API"] == str(API_VERSION)
    assert "env-token" not in repr(InferenceClient(url))


def test_unreadable_answer_is_a_server_error(canned_server):
    url, _ = canned_server(body=b"MPXT garbage", content_type="application/x-medprivacy-tensor")
    with pytest.raises(ServerError, match="sent an unreadable answer"):
        InferenceClient(url, retries=0).segment(_patches(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url": "ftp://host"}, "must look like https://host:port"),
        ({"url": "https://user:pw@host"}, "must not contain a user name or password"),
        ({"url": "http://127.0.0.1:1", "request_patches": 0}, "request_patches must be at least 1"),
        (
            {"url": "http://127.0.0.1:1", "ca_bundle": "/nonexistent/ca.pem"},
            "CA bundle /nonexistent/ca.pem does not exist",
        ),
        ({"url": "http://127.0.0.1:1", "token_file": "/nonexistent/token"}, "cannot read token file"),
        ({"url": "http://127.0.0.1:1", "token": "has space"}, "spaces or non-ASCII"),
    ],
)
def test_bad_client_settings_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        InferenceClient(**kwargs)


@pytest.mark.parametrize(
    "patches, kwargs, message",
    [
        (np.zeros((2, 16, 16, 16), np.float32), {}, "shape"),
        (np.zeros((0, 1, 16, 16, 16), np.float32), {}, "shape"),
        (np.full((1, 1, 16, 16, 16), 2.0, np.float32), {}, r"values in \[0, 1\]"),
        (np.zeros((1, 1, 16, 16, 16), np.float32), {"endpoint": "plain"}, "unknown endpoint"),
        (np.zeros((1, 1, 16, 16, 16), np.float32), {"upload_dtype": "float64"}, "upload dtype"),
        (np.zeros((1, 1, 16, 16, 16), np.float32), {"cancel": 3}, "cancel must be"),
    ],
)
def test_bad_segment_arguments_are_input_errors(patches, kwargs, message):
    with pytest.raises(InputError, match=message):
        InferenceClient(f"http://127.0.0.1:{free_port()}", retries=0).segment(patches, **kwargs)


def test_auth_errors_are_auth_errors(live_server_with_token):
    # AuthError is a ServerError, so callers that only catch ServerError still show the message.
    with pytest.raises(AuthError):
        live_server_with_token.client(token=None).check_connection()
    assert issubclass(AuthError, ServerError) and issubclass(VersionMismatchError, ServerError)
