"""The inference server over real HTTP(S): endpoints, validation, auth, TLS, size limits, audit copies, refusals."""

from __future__ import annotations

import argparse
import os
import subprocess
import threading

import numpy as np
import pytest
import requests
from conftest import TINY_LABELS, TINY_PATCH, launch_server

from medprivacy import API_VERSION, __version__
from medprivacy.errors import AuthError, InputError, ServerError
from medprivacy.server.local import SERVE_COMMAND, free_port
from medprivacy.transport import wire
from medprivacy.transport.client import InferenceClient


def _patches(count: int, size=TINY_PATCH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, *size), dtype=np.float32)


@pytest.fixture(scope="module")
def tls_and_small_servers(tiny_models_dir, tls_cert):
    """An HTTPS server and one with a 10 KiB request limit (3 patches exceed it), started side by side."""
    tls = launch_server(
        ["--ssl-certfile", tls_cert.cert, "--ssl-keyfile", tls_cert.key],
        models_dir=tiny_models_dir,
        ca_bundle=tls_cert.cert,
    )
    small = launch_server(["--max-request-mb", "0.01"], models_dir=tiny_models_dir)
    try:
        yield tls.wait_ready(), small.wait_ready()
    finally:
        tls.stop()
        small.stop()


def _raw_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.headers["Content-Type"] = wire.CONTENT_TYPE
    return session


def test_health_and_info(live_server):
    client = live_server.client()
    assert client.health() == {"status": "ok"}
    info = client.info()
    assert info["api_version"] == API_VERSION and info["server_version"] == __version__
    assert info["device"] == "cpu" and info["baseline_enabled"] is True and info["auth_required"] is False
    assert info["torch_version"] and info["max_request_bytes"] == 256 * 1024 * 1024
    assert set(info["models"]) == {"mixup-seg", "plain-seg"}
    mixup = info["models"]["mixup-seg"]
    assert (
        mixup["endpoint"] == "/v1/mixup/segment" and info["models"]["plain-seg"]["endpoint"] == "/v1/baseline/segment"
    )
    assert mixup["patch_size"] == TINY_PATCH and mixup["labels"] == TINY_LABELS
    assert mixup["arch"] == "unet" and mixup["in_channels"] == 1 and mixup["out_channels"] == 4
    assert len(mixup["sha256"]) == 64
    line = client.check_connection()
    assert line.startswith(f"connected to {live_server.url} — server {__version__}") and "auth off" in line


def test_mixup_segment_returns_probabilities_and_audits_exactly_what_arrived(live_server):
    patches = _patches(5)
    before = set(live_server.audit_files())
    client = live_server.client(request_patches=3)
    seen = []
    probs = client.segment(patches, progress=lambda done, total: seen.append((done, total)))
    assert probs.shape == (5, 4, *TINY_PATCH) and probs.dtype == np.float32
    assert probs.min() >= 0 and np.allclose(probs.sum(axis=1), 1, atol=4 / 255)
    assert seen == [(3, 5), (5, 5)]
    assert client.bytes_sent > 0 and client.bytes_received > 0

    new = sorted(set(live_server.audit_files()) - before)
    assert len(new) == 2 and all(path.name.endswith("-mixup.npy") for path in new)
    received = np.concatenate([np.load(path, allow_pickle=False) for path in new])
    assert received.dtype == np.uint8
    np.testing.assert_array_equal(received, np.rint(patches * 255).astype(np.uint8))
    assert not any(p.name.endswith(".tmp") for p in live_server.audit_dir.iterdir())


def test_float16_upload_and_response(live_server):
    patches = _patches(2, seed=1)
    before = set(live_server.audit_files())
    client = live_server.client()
    as_uint8 = client.segment(patches)
    as_float16 = client.segment(patches, upload_dtype="float16", response_dtype="float16")
    assert np.allclose(as_float16.sum(axis=1), 1, atol=1e-2)
    assert np.abs(as_uint8 - as_float16).max() < 0.03
    (latest,) = sorted(set(live_server.audit_files()) - before)[-1:]
    np.testing.assert_array_equal(np.load(latest), patches.astype(np.float16))


def test_baseline_endpoint_when_enabled(live_server):
    before = set(live_server.audit_files())
    probs = live_server.client().segment(_patches(2), endpoint="baseline")
    assert probs.shape == (2, 4, *TINY_PATCH)
    assert [p.name.endswith("-baseline.npy") for p in sorted(set(live_server.audit_files()) - before)] == [True]


def test_wrong_patch_size_is_refused_with_the_expected_size(live_server):
    with pytest.raises(ServerError, match=r"HTTP 422: patches are 8x16x16 voxels but model mixup-seg expects 16x16x16"):
        live_server.client().segment(_patches(1, size=(8, 16, 16)))


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (
            wire.encode_tensor(np.zeros((1, 1, *TINY_PATCH))),
            {"X-MedPrivacy-API": "999"},
            409,
            "version 999 but this server speaks version 1",
        ),
        (
            wire.encode_tensor(np.zeros((1, 1, *TINY_PATCH))),
            {"X-MedPrivacy-Response-Dtype": "int8"},
            422,
            "must be uint8 or float16",
        ),
        (wire.encode_tensor(np.zeros((1, 1, *TINY_PATCH)), "float32"), {}, 422, "send uint8 or float16"),
        (wire.encode_tensor(np.zeros((1, 2, *TINY_PATCH))), {}, 422, "single-channel"),
        (wire.encode_tensor(np.zeros((0, 1, *TINY_PATCH))), {}, 422, "no patches"),
        (b"GIF89a", {}, 422, "not a valid MedPrivacy tensor"),
        (
            wire.encode_tensor(np.zeros((1, 1, *TINY_PATCH))),
            {"Content-Type": "text/plain"},
            415,
            "takes Content-Type application/x-medprivacy-tensor, not text/plain",
        ),
        (wire.encode_tensor(np.full((1, 1, *TINY_PATCH), 2.0), "float16"), {}, 422, "patch values span [2, 2]"),
        (wire.encode_tensor(np.full((1, 1, *TINY_PATCH), -1.0), "float16"), {}, 422, "patch values span [-1, -1]"),
        (
            wire.encode_tensor(np.full((1, 1, *TINY_PATCH), 65504.0), "float16"),
            {},
            422,
            "send intensities scaled to [0, 1]",
        ),
    ],
)
def test_raw_requests_get_one_line_json_errors(live_server, body, headers, status, message):
    with _raw_session() as session:
        response = session.post(live_server.url + "/v1/mixup/segment", data=body, headers=headers, timeout=30)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail


def test_api_version_mismatch_maps_to_version_error(live_server):
    from medprivacy.errors import VersionMismatchError

    client = live_server.client()
    client._session.headers["X-MedPrivacy-API"] = "0"
    with pytest.raises(VersionMismatchError, match="upgrade the older side"):
        client.segment(_patches(1))


def test_concurrent_requests_are_all_answered(live_server):
    results, errors = [], []

    def work(seed: int) -> None:
        try:
            results.append(live_server.client().segment(_patches(4, seed=seed), response_dtype="float16"))
        except Exception as exc:  # collected and asserted below: a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 3


def test_token_is_required_and_checked(live_server_with_token):
    server = live_server_with_token
    with pytest.raises(AuthError, match="requires a token; pass --token-file or set MEDPRIVACY_TOKEN"):
        server.client(token=None).info()
    with pytest.raises(AuthError, match="rejected the token") as rejected:
        server.client(token="not-the-token").segment(_patches(1))
    assert server.token not in str(rejected.value)
    assert server.client().info()["auth_required"] is True
    assert server.client().segment(_patches(1)).shape == (1, 4, *TINY_PATCH)
    with _raw_session() as session:
        assert session.get(server.url + "/v1/health", timeout=10).status_code == 200  # health stays open
        missing = session.get(server.url + "/v1/info", timeout=10)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        wrong = session.post(
            server.url + "/v1/mixup/segment", headers={"Authorization": "Bearer x"}, data=b"", timeout=10
        )
        assert wrong.status_code == 403
    assert server.token not in server.log()


def test_baseline_disabled_names_the_flag(live_server_with_token):
    assert set(live_server_with_token.client().info()["models"]) == {"mixup-seg"}
    with pytest.raises(
        ServerError, match=r"baseline endpoint is disabled on this server; start it with --enable-baseline"
    ):
        live_server_with_token.client().segment(_patches(1), endpoint="baseline")


def test_nothing_is_written_without_audit_dir(live_server_with_token, tiny_models_dir):
    server = live_server_with_token
    models_before = sorted(p.name for p in tiny_models_dir.iterdir())
    server.client().segment(_patches(3))
    assert list(server.cwd.iterdir()) == [] and list(server.tmpdir.iterdir()) == []
    assert sorted(p.name for p in tiny_models_dir.iterdir()) == models_before


def test_request_over_the_size_limit_is_refused(tls_and_small_servers):
    server = tls_and_small_servers[1]
    with pytest.raises(
        ServerError, match=r"request too large .*lower request_patches or ask the operator to raise --max-request-mb"
    ):
        server.client().segment(_patches(3))
    # Without Content-Length (chunked upload) the limit is enforced while reading.
    body = wire.encode_tensor(_patches(3))
    with _raw_session() as session:
        response = session.post(server.url + "/v1/mixup/segment", data=iter([body[:5000], body[5000:]]), timeout=30)
    assert response.status_code == 413 and "limit of 10485 bytes" in response.json()["detail"]
    # Once the client knows the limit it refuses locally instead of uploading.
    client = server.client()
    client.info()
    with pytest.raises(ServerError, match="over the server's limit of 10485"):
        client.segment(_patches(3))
    assert client.bytes_sent == 0
    assert server.client().segment(_patches(1)).shape[0] == 1


def test_tls_is_verified_with_the_given_ca_bundle(tls_and_small_servers):
    server = tls_and_small_servers[0]
    assert server.url.startswith("https://127.0.0.1:")
    assert server.client().check_connection().startswith(f"connected to {server.url}")
    assert server.client().segment(_patches(1)).shape == (1, 4, *TINY_PATCH)
    with pytest.raises(ServerError, match="could not be verified .*pass --ca-bundle with the server's CA certificate"):
        server.client(ca_bundle=None).info()


def test_https_url_for_a_plain_http_server(live_server):
    with pytest.raises(
        ServerError, match="TLS handshake with .* failed .*if the server runs without --ssl-certfile use http://"
    ):
        InferenceClient(live_server.url.replace("http://", "https://"), retries=0).info()


def test_non_loopback_bind_without_token_is_refused(tiny_models_dir):
    result = subprocess.run(
        [*SERVE_COMMAND, "--host", "0.0.0.0", "--port", str(free_port()), "--models-dir", str(tiny_models_dir)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "MEDPRIVACY_TOKEN"},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "refusing to bind 0.0.0.0 without a token" in lines[0] and "--token-file" in lines[0]


def _serve_args(*argv: str) -> argparse.Namespace:
    from medprivacy.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_refuses_bad_configurations(tmp_path, tls_cert, monkeypatch):
    from medprivacy.server import cli

    monkeypatch.delenv("MEDPRIVACY_TOKEN", raising=False)
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    cases = [
        (("--ssl-certfile", str(tls_cert.cert)), "needs both --ssl-certfile and --ssl-keyfile"),
        (("--ssl-keyfile", str(tls_cert.key)), "needs both --ssl-certfile and --ssl-keyfile"),
        (("--token-file", str(empty)), "is empty"),
        (("--token-file", str(tmp_path / "missing")), "cannot read token file"),
        (("--host", "192.0.2.1"), "refusing to bind 192.0.2.1 without a token"),
        (("--host", "example.org"), "refusing to bind example.org without a token"),
        (("--max-request-mb", "0"), "must be positive"),
    ]
    for argv, message in cases:
        with pytest.raises(InputError, match=message):
            cli.run(_serve_args(*argv))
    monkeypatch.setenv("MEDPRIVACY_TOKEN", "two words")
    with pytest.raises(InputError, match="spaces or non-ASCII"):
        cli.run(_serve_args("--host", "0.0.0.0"))


def test_serve_refuses_cuda_without_cuda(tiny_models_dir):
    import torch

    from medprivacy.server import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InputError, match="--device cuda was asked but torch .* sees no CUDA GPU"):
        cli.run(_serve_args("--device", "cuda", "--models-dir", str(tiny_models_dir)))


def test_serve_refuses_a_busy_port(tiny_models_dir, live_server):
    from medprivacy.server import cli

    port = live_server.url.rsplit(":", 1)[1]
    with pytest.raises(InputError, match=f"cannot listen on 127.0.0.1:{port}"):
        cli.run(_serve_args("--port", port, "--models-dir", str(tiny_models_dir)))


def test_missing_model_is_refused_at_startup(tmp_path):
    from conftest import build_tiny_models

    from medprivacy.server import ServerConfig, create_app

    build_tiny_models(tmp_path, names=("mixup-seg",))
    with pytest.raises(InputError, match="has no 'plain-seg' entry"):
        create_app(ServerConfig(models_dir=tmp_path, enable_baseline=True))
    assert create_app(ServerConfig(models_dir=tmp_path)).state.service.models["mixup"].spec.name == "mixup-seg"
