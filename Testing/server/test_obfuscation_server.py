"""ObfuscationPrivacy endpoints over real HTTP: training jobs (progress, cancel, disconnects, model store), classify
with the training key only, and one-line errors for every bad request.

Frames are synthetic codes whose class shows in their code statistics, so a few training steps learn them; the
tests check the server's mechanics, not privacy.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import numpy as np
import pytest
import requests
from conftest import open_and_token_servers, start_server

from medprivacy.errors import AuthError, CancelledError, ServerError
from medprivacy.transport.obfuscation_client import ObfuscationClient
from medprivacy.transport.wire import CONTENT_TYPE, encode_tensor_raw

KEY = "0123456789abcdef"
OTHER_KEY = "fedcba9876543210"
CLASSES = ["LCA", "RCA"]


def codes(count: int = 48, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames of codes 0/100/200; class 1 has code 200 far more often in its upper half."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    frames = rng.choice(np.array([0, 100, 200], np.uint8), size=(count, size, size), p=[0.45, 0.45, 0.1])
    frames[labels == 1, : size // 2] = rng.choice(
        np.array([0, 100, 200], np.uint8), size=(int(labels.sum()), size // 2, size), p=[0.3, 0.3, 0.4]
    )
    return frames, labels


@pytest.fixture(scope="module")
def servers(tiny_models_dir, tmp_path_factory):
    """An open server, and one that requires a token and runs in an empty folder with an empty TMPDIR."""
    cwd, tmpdir = tmp_path_factory.mktemp("obf-server-cwd"), tmp_path_factory.mktemp("obf-server-tmp")
    with open_and_token_servers(
        dict(args=[], models_dir=tiny_models_dir),
        dict(args=[], env={"TMPDIR": str(tmpdir)}, models_dir=tiny_models_dir, cwd=cwd),
    ) as pair:
        yield pair


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def _client(handle, **kwargs) -> ObfuscationClient:
    kwargs.setdefault("token", handle.token)
    return ObfuscationClient(handle.url, retries=0, **kwargs)


@pytest.fixture(scope="module")
def trained(server):
    client = _client(server)
    frames, labels = codes()
    job = client.submit_training(frames, labels, CLASSES, KEY, name="unit test", steps=40, validation_fraction=0.25)
    assert job["status"] in ("queued", "running") and job["dataset"]["classes"] == {"LCA": 24, "RCA": 24}
    states = []
    done = client.wait(job["job"], progress=states.append, poll=0.2)
    assert done["status"] == "done" and done["model"].startswith("obf-")
    return done


def _post(handle, path, body, headers=None, params=None):
    headers = dict(headers or {})
    headers.setdefault("Content-Type", "application/json" if path.endswith("/train") else CONTENT_TYPE)
    with requests.Session() as session:
        session.trust_env = False
        return session.post(handle.url + path, data=body, headers=headers, params=params, timeout=60)


def _train_body(frames, labels, classes=CLASSES, key_id=KEY, **extra) -> bytes:
    document = {
        "frames": base64.b64encode(encode_tensor_raw(frames)).decode(),
        "labels": [int(v) for v in labels],
        "classes": classes,
        "key_id": key_id,
        **extra,
    }
    return json.dumps(document).encode()


def _detail(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def test_training_job_reports_progress_and_its_model_classifies_frames_of_its_key(server, trained):
    client = _client(server)
    assert trained["progress"]["step"] == 40 and trained["progress"]["fraction"] == 1.0
    assert 0.0 <= trained["progress"]["validation_accuracy"] <= 1.0
    models = {m["id"]: m for m in client.models()}
    model = models[trained["model"]]
    assert (
        model["classes"] == CLASSES
        and model["frame_size"] == [32, 32]
        and model["key_id"] == KEY
        and model["name"] == "unit test"
    )
    frames, labels = codes(count=20, seed=1)
    answer = client.classify(frames, trained["model"], KEY, batch=8)
    assert answer["classes"] == CLASSES and answer["probabilities"].shape == (20, 2)
    np.testing.assert_allclose(answer["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert (answer["predicted"] == labels).mean() >= 0.8  # the signal is easy: 40 steps learn it
    assert client.info()["obfuscation"]["model_store"] is False


def test_classify_refuses_another_key_another_size_and_unknown_models(server, trained):
    client = _client(server)
    frames, _ = codes(count=2)
    with pytest.raises(ServerError, match=f"obfuscated with key {OTHER_KEY} but model .* trained on key {KEY}"):
        client.classify(frames, trained["model"], OTHER_KEY)
    with pytest.raises(ServerError, match="frames are 16x16 but model .* expects 32x32"):
        client.classify(frames[:, :16, :16], trained["model"], KEY)
    with pytest.raises(ServerError, match="'obf-000000000000' is not on this server"):
        client.classify(frames, "obf-000000000000", KEY)
    response = _post(server, "/v1/obfuscation/classify", encode_tensor_raw(frames), params={"model": trained["model"]})
    assert response.status_code == 422 and "X-MedPrivacy-Key-Id" in _detail(response)


def test_bad_training_requests_get_one_line_reasons_and_start_nothing(server):
    frames, labels = codes(count=8)
    before = len(_client(server).jobs())
    cases = [
        (_train_body(frames, np.zeros(8, int)), "at least two classes"),
        (_train_body(frames, labels[:5]), "8 frames but 5 labels"),
        (
            _train_body(np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8), labels),
            "obfuscate them with the site key",
        ),
        (_train_body(frames, labels, classes=["only"]), "at least two classes"),
        (_train_body(frames, labels, key_id="not a key"), "key_id must be"),
        (_train_body(frames[:, :30, :30], labels), "divisible by 4"),
        (_train_body(frames, labels, params={"steps": 10**6}), "steps"),
        (_train_body(frames, labels, params={"epochs": 3}), "params must be"),
        (b"{not json", "not JSON"),
        (json.dumps({"frames": "!!", "labels": [], "classes": CLASSES, "key_id": KEY}).encode(), "not valid base64"),
    ]
    for body, fragment in cases:
        response = _post(server, "/v1/obfuscation/train", body)
        assert response.status_code == 422, (fragment, response.text)
        assert fragment in _detail(response)
    assert len(_client(server).jobs()) == before


def test_cancel_stops_a_running_job_and_jobs_outlive_their_client(server):
    frames, labels = codes()
    # Submitted over a connection that is then closed: the job does not belong to the request.
    response = _post(server, "/v1/obfuscation/train", _train_body(frames, labels, params={"steps": 20000}))
    assert response.status_code == 202
    job_id = response.json()["job"]
    client = _client(server)
    deadline = time.monotonic() + 60
    while client.job(job_id)["progress"].get("step", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    queued = client.submit_training(frames, labels, CLASSES, KEY, steps=5)
    assert client.cancel(queued["job"])["status"] == "cancelled"  # never started
    assert client.cancel(job_id)["status"] in ("running", "cancelled")
    with pytest.raises(CancelledError):
        client.wait(job_id, poll=0.1, timeout=60)
    state = client.job(job_id)
    assert state["status"] == "cancelled" and state["model"] is None and state["progress"]["step"] < 20000
    with pytest.raises(ServerError, match="unknown on this server"):
        client.job("0" * 16)


def test_token_server_requires_the_token_for_every_obfuscation_endpoint(servers):
    token_server = servers[1]
    with pytest.raises(AuthError):
        ObfuscationClient(token_server.url, retries=0).models()
    assert _client(token_server).models() == []


def test_models_survive_a_restart_only_with_a_model_store(tiny_models_dir, tmp_path):
    store = tmp_path / "store"
    frames, labels = codes()
    with start_server(["--model-store", str(store)], models_dir=tiny_models_dir) as handle:
        client = _client(handle)
        done = client.wait(client.submit_training(frames, labels, CLASSES, KEY, steps=10)["job"], poll=0.2)
        expected = client.classify(frames[:4], done["model"], KEY)["probabilities"]
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert sorted(p.name for p in store.iterdir()) == sorted([f"{done['model']}.json", f"{done['model']}.safetensors"])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in store.iterdir())
    (store / "obf-badbadbadbad.json").write_text("{}")  # a damaged entry is skipped, not fatal
    with start_server(["--model-store", str(store)], models_dir=tiny_models_dir) as handle:
        client = _client(handle)
        assert [m["id"] for m in client.models()] == [done["model"]]
        np.testing.assert_allclose(
            client.classify(frames[:4], done["model"], KEY)["probabilities"], expected, atol=1e-6
        )
        assert "skipping obf-badbadbadbad.json" in handle.log()


def test_without_a_model_store_the_server_writes_nothing(servers):
    token_server = servers[1]
    client = _client(token_server)
    frames, labels = codes(count=16)
    done = client.wait(client.submit_training(frames, labels, CLASSES, KEY, steps=4)["job"], poll=0.2)
    assert done["status"] == "done"
    # No file anywhere (torch's optimisers create an empty torchinductor cache folder in TMPDIR; it stays empty).
    written = [p for folder in (token_server.cwd, token_server.tmpdir) for p in folder.rglob("*") if not p.is_dir()]
    assert written == []


def _fuzz_obfuscation_requests(count: int, frames: np.ndarray, labels: np.ndarray, model: str, seed: int = 14):
    """(method, path, headers, params, body), seeded: every obfuscation endpoint, each request broken in one way."""
    rng = np.random.default_rng(seed)
    good_tensor = encode_tensor_raw(frames[:4])
    endpoints = [
        "/v1/obfuscation/train",
        "/v1/obfuscation/classify",
        "/v1/obfuscation/jobs",
        "/v1/obfuscation/jobs/{id}",
        "/v1/obfuscation/models",
    ]
    for index in range(count):
        path = endpoints[index % len(endpoints)]
        method, headers, params, body = ("POST" if path.endswith(("train", "classify")) else "GET"), {}, None, None
        kind = int(rng.integers(0, 12))
        if path.endswith("/train"):
            headers["Content-Type"] = "application/json"
            document = {
                "frames": base64.b64encode(encode_tensor_raw(frames)).decode(),
                "labels": [int(v) for v in labels],
                "classes": CLASSES,
                "key_id": KEY,
                "params": {"steps": 1},
            }
            if kind == 0:
                body = rng.bytes(int(rng.integers(0, 3000)))
            elif kind == 1:
                body = json.dumps([document]).encode()
            elif kind == 2:
                document["frames"] = base64.b64encode(good_tensor[: int(rng.integers(1, len(good_tensor)))]).decode()
            elif kind == 3:
                document["labels"] = [["x"], None, 1e300, -1, 2**70][int(rng.integers(0, 5))]
            elif kind == 4:
                document["classes"] = [[], ["a"] * 5000, [1, 2], "LCA,RCA", ["", ""]][int(rng.integers(0, 5))]
            elif kind == 5:
                document["key_id"] = ["", "x" * 5000, None, 7, "\u00e9" * 16][int(rng.integers(0, 5))]
            elif kind == 6:
                key = ["steps", "batch_size", "learning_rate", "validation_fraction", "seed"][int(rng.integers(0, 5))]
                document["params"] = {key: [1e300, -1, 10**19, "x", None, float("nan")][int(rng.integers(0, 6))]}
            elif kind == 7:
                document["name"] = ["x" * 100_000, 5, None, ["a"]][int(rng.integers(0, 4))]
            elif kind == 8:
                document["frames"] = base64.b64encode(
                    encode_tensor_raw(rng.random((4, 32, 32), dtype=np.float32))
                ).decode()
            elif kind == 9:
                headers["Content-Type"] = ["text/plain", "", CONTENT_TYPE][int(rng.integers(0, 3))]
            elif kind == 10:
                body = b"[" * 20000 + b"]" * 20000
            else:
                document["extra"] = 1
            if body is None:
                body = json.dumps(document, allow_nan=True).encode()
        elif path.endswith("/classify"):
            headers["Content-Type"], params = CONTENT_TYPE, {"model": model}
            headers["X-MedPrivacy-Key-Id"] = KEY
            if kind == 0:
                body = rng.bytes(int(rng.integers(0, 3000)))
            elif kind == 1:
                body = good_tensor[: int(rng.integers(1, len(good_tensor)))]
            elif kind == 2:
                body = encode_tensor_raw(rng.random((2, 32, 32), dtype=np.float32))
            elif kind == 3:
                body = encode_tensor_raw(rng.integers(0, 3, (2, int(rng.integers(1, 16)), 600), dtype=np.uint8))
            elif kind == 4:
                body, params = good_tensor, {"model": ["", "x" * 5000, "obf-nope", "\u00e9"][int(rng.integers(0, 4))]}
            elif kind == 5:
                body, params = good_tensor, [("model", model), ("model", model)]
            elif kind == 6:
                body, params = good_tensor, None
            elif kind == 7:
                body = good_tensor
                headers["X-MedPrivacy-Key-Id"] = ["", "x" * 3000, OTHER_KEY, "\u00e9"][int(rng.integers(0, 4))]
            elif kind == 8:
                body, headers["Content-Type"] = good_tensor, "application/json"
            else:
                body = good_tensor
        elif path.endswith("{id}"):
            path = (
                "/v1/obfuscation/jobs/" + ["0" * 16, "x" * 3000, "..", "%00", "\u00e9", "-1"][int(rng.integers(0, 6))]
            )
            method = ["GET", "DELETE"][int(rng.integers(0, 2))]
        elif kind < 3:
            params = {["x", "model", "all"][kind]: "1"}
        if rng.random() < 0.08:
            method = ["PUT", "PATCH", "DELETE", "GET"][int(rng.integers(0, 4))]
        yield method, path, headers, params, body


def test_fuzz_every_obfuscation_endpoint_never_answers_5xx(server, trained):
    # The server-wide fuzz (test_server_faults.py) covers the other endpoints; this one breaks every obfuscation
    # request in one of many ways. Valid bodies ask for one training step, and whatever they queue is cancelled.
    frames, labels = codes(count=8)
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        session.trust_env = False
        for method, path, headers, params, body in _fuzz_obfuscation_requests(300, frames, labels, trained["model"]):
            response = session.request(method, server.url + path, headers=headers, params=params, data=body, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (method, path, headers, params, (body or b"")[:200], response.text[:500])
            if response.status_code >= 400:
                assert "\n" not in _detail(response) and _detail(response), response.text[:300]
    client = _client(server)
    for job in client.jobs():
        if job["status"] in ("queued", "running"):
            client.cancel(job["job"])
    assert statuses.get(200, 0) >= 20 and statuses.get(422, 0) >= 50, statuses
    log = server.log()
    problems = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
    assert not problems, log[log.find(problems[0]) :][:3000] if problems else ""
