"""MedLocker endpoints over real HTTP: classify, lesions, optimize, a user's TorchScript classifier, auth, bad input.

The models are seeded, untrained, deliberately tiny versions of the served architectures (32x32 inputs): they test
transport and endpoint mechanics, not watermark strength.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import CLASSIFIERS, LABELS, SIZE, build_watermark_models, open_and_token_servers

from medprivacy.errors import AuthError, InputError, ServerError
from medprivacy.transport.watermark_client import WatermarkClient, exact_image_tensor
from medprivacy.transport.wire import CONTENT_TYPE, encode_tensor, encode_tensor_raw
from medprivacy.watermark import blending
from medprivacy.watermark.boxes import MaskParams, Placement, lesion_boxes

#: The paper's search shape, shrunk to a few evaluations.
FAST = {"population": 4, "generations": 1, "local_iterations": 1}
SCRIPTED_SIZE = (24, 24)
#: torch deprecates TorchScript in favour of torch.export, but it is the format operators hand over today.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def build_scripted_classifier(path: Path) -> Path:
    """A user's own 3-class TorchScript classifier."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(5)
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    return path


@pytest.fixture(scope="module")
def wm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm-models")
    return build_watermark_models(root / "models"), build_scripted_classifier(root / "mine.pt")


@pytest.fixture(scope="module")
def servers(wm_files):
    """An open MedLocker-only server with a user TorchScript classifier, and one that requires a token."""
    models, script = wm_files
    with open_and_token_servers(
        dict(args=["--extra-classifier", f"mine={script}:{SCRIPTED_SIZE[0]}x{SCRIPTED_SIZE[1]}"], models_dir=models),
        dict(args=[], models_dir=models),
    ) as pair:
        yield pair


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def _client(handle, **kwargs) -> WatermarkClient:
    kwargs.setdefault("token", handle.token)
    return WatermarkClient(handle.url, retries=0, **kwargs)


def _rgb(height=40, width=56, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _post(handle, path, body, headers=None, params=None):
    content_type = "application/json" if path.endswith("/optimize") else CONTENT_TYPE
    with requests.Session() as session:
        session.trust_env = False
        return session.post(
            handle.url + path,
            data=body,
            headers={"Content-Type": content_type, **(headers or {})},
            params=params,
            timeout=60,
        )


def _optimize_body(image, logo=None, mask=None, **params) -> bytes:
    logo = blending.default_logo(64) if logo is None else logo
    document = {
        "image": base64.b64encode(exact_image_tensor(image)).decode(),
        "logo": base64.b64encode(encode_tensor_raw(np.moveaxis(logo, -1, 0)[None])).decode(),
        "params": params,
    }
    if mask is not None:
        document["mask"] = base64.b64encode(encode_tensor_raw(mask.astype(np.uint8)[None, None])).decode()
    return json.dumps(document).encode()


def _detail(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


# --- info, classify, lesions -----------------------------------------------------------------------------------


def test_info_lists_the_watermark_models_with_their_task(server):
    info = _client(server).info()
    models = info["models"]
    assert set(models) == {*CLASSIFIERS, "wm-lesion-seg", "mine"}  # a MedLocker-only server: no mixup-seg needed
    for name in CLASSIFIERS:
        assert models[name]["task"] == "classify" and models[name]["endpoint"] == "/v1/watermark/classify"
        assert (
            models[name]["patch_size"] == SIZE
            and models[name]["labels"] == LABELS
            and models[name]["out_channels"] == 2
        )
    assert (
        models["wm-lesion-seg"]["task"] == "segment-lesion"
        and models["wm-lesion-seg"]["endpoint"] == "/v1/watermark/lesions"
    )
    assert models["mine"] == {
        **models["mine"],
        "task": "classify",
        "arch": "torchscript",
        "patch_size": list(SCRIPTED_SIZE),
        "out_channels": 3,
    }
    assert len(models["mine"]["sha256"]) == 64
    # The Mixup endpoint says what is missing rather than failing.
    response = _post(server, "/v1/mixup/segment", encode_tensor(np.zeros((1, 1, 16, 16, 16))))
    assert response.status_code == 404 and "no mixup-seg model" in _detail(response)


def test_classify_gives_probabilities_per_model_at_any_image_size(server):
    client = _client(server)
    images = np.stack([blending.unit_view(_rgb(seed=s)) for s in range(3)])
    answer = client.classify(images)
    assert answer["count"] == 3 and set(answer["models"]) == {*CLASSIFIERS, "mine"}
    for name, result in answer["models"].items():
        probs = np.array(result["probabilities"])
        assert probs.shape == (3, 3 if name == "mine" else 2) and (probs >= 0).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert result["predicted"] == list(probs.argmax(axis=1))
    # A subset by query, float16 upload, and a gray image (repeated to three channels by the server).
    subset = client.classify(images[:1], models=["wm-cls-vit"], upload_dtype="float16")
    assert set(subset["models"]) == {"wm-cls-vit"}
    np.testing.assert_allclose(
        subset["models"]["wm-cls-vit"]["probabilities"], answer["models"]["wm-cls-vit"]["probabilities"][:1], atol=2e-3
    )
    gray = client.classify(images[:1, :1], models=["wm-cls-resnet18"])
    rgb_of_gray = client.classify(np.repeat(images[:1, :1], 3, axis=1), models=["wm-cls-resnet18"])
    np.testing.assert_allclose(
        gray["models"]["wm-cls-resnet18"]["probabilities"],
        rgb_of_gray["models"]["wm-cls-resnet18"]["probabilities"],
        atol=1e-6,
    )


def test_user_torchscript_classifier_answers_like_the_file(server, wm_files):
    import torch
    import torch.nn.functional as F

    images = np.stack([blending.unit_view(_rgb(50, 70, seed=s)) for s in range(2)])
    answer = _client(server).classify(images, models=["mine"])
    net = torch.jit.load(str(wm_files[1]), map_location="cpu")
    sent = torch.from_numpy(np.rint(images * 255) / 255).float()  # what the uint8 upload carries
    with torch.inference_mode():
        expected = torch.softmax(
            net(F.interpolate(sent, size=SCRIPTED_SIZE, mode="bilinear", antialias=True, align_corners=False)), dim=1
        )
    np.testing.assert_allclose(answer["models"]["mine"]["probabilities"], expected.numpy(), atol=1e-5)
    assert answer["models"]["mine"]["labels"] == {"0": "class 0", "1": "class 1", "2": "class 2"}


def test_lesions_give_a_probability_mask_at_the_image_size(server):
    image = blending.unit_view(_rgb(45, 61, seed=3))
    mask = _client(server).lesions(image)
    assert mask.shape == (45, 61) and mask.dtype == np.float32 and 0 <= mask.min() <= mask.max() <= 1
    response = _post(
        server, "/v1/watermark/lesions", encode_tensor(image[None]), headers={"X-MedPrivacy-Response-Dtype": "uint8"}
    )
    from medprivacy.transport.wire import decode_tensor

    as_uint8, _ = decode_tensor(response.content)
    assert as_uint8.shape == (1, 1, 45, 61) and np.abs(as_uint8[0, 0] - mask).max() < 0.01


# --- optimize --------------------------------------------------------------------------------------------------


def test_optimize_keep_out_and_keep_in_respect_the_lesion_boxes(server):
    client = _client(server)
    image = _rgb(64, 80, seed=4)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[20:36, 30:50] = True
    logo = blending.default_logo(64)
    size = tuple(blending.fitted_size(image.shape, logo.shape, 4.0))
    mask_params = {"kernel": 1, "iterations": 0, "min_area": 0}
    boxes = lesion_boxes(mask, MaskParams(kernel=1, iterations=0, min_area=0))
    for mode in ("keep-out", "keep-in"):
        for seed in range(3):
            answer = client.optimize(
                image, logo, mask=mask, mode=mode, mask_params=mask_params, seed=seed, models=list(CLASSIFIERS), **FAST
            )
            params = answer["params"]
            placement = Placement(mode, image.shape, size, boxes)
            assert placement.feasible(params["x"], params["y"]), (mode, params)
            if mode == "keep-out":
                assert not placement.overlaps_lesion(params["x"], params["y"])
            else:  # on the lesion box or touching its edge (boxes.py)
                assert any(
                    params["x"] <= b.x1
                    and b.x <= params["x"] + size[1]
                    and params["y"] <= b.y1
                    and b.y <= params["y"] + size[0]
                    for b in boxes
                )
            assert 100 <= params["alpha"] <= 255 and params["sl"] == 4.0
            assert answer["lesion_boxes"] == [list(b) for b in boxes] and answer["lesion_source"] == "mask"
            assert answer["logo_size"] == list(size) and answer["mode"] == mode
    # Budget: Np for the start, Np hops, at most Np children.
    assert 4 < answer["evaluations"] <= 12 and answer["stop_reason"] in ("generations", "fooled")
    assert [h["generation"] for h in answer["history"]] == [0, 1] or answer["fooled"]
    assert answer["models"] == list(CLASSIFIERS) and answer["weights"] == [0.25] * 4
    for name in CLASSIFIERS:
        assert set(answer["before"][name]) == {"labels", "probabilities", "predicted"}
        assert np.isclose(sum(answer["after"][name]["probabilities"][0]), 1.0, atol=1e-5)
    # No label: each model is pushed away from its own clean answer, and the answer says which that was.
    assert answer["target_source"] == "clean-prediction" and answer["target"] is None
    assert answer["targets"] == {name: answer["before"][name]["predicted"][0] for name in CLASSIFIERS}


def test_optimize_is_seeded_and_reports_what_the_watermarked_image_gets(server):
    """The 'after' predictions equal /classify on the image rendered locally from the returned parameters (16-bit)."""
    client = _client(server)
    image = np.random.default_rng(6).integers(0, 65536, (48, 40), dtype=np.uint16)
    logo = blending.default_logo(64)
    first = client.optimize(
        image, logo, mode="wap", seed=11, label=1, weights=[0.7, 0.3], models=["wm-cls-resnet18", "wm-cls-vit"], **FAST
    )
    again = client.optimize(
        image, logo, mode="wap", seed=11, label=1, weights=[0.7, 0.3], models=["wm-cls-resnet18", "wm-cls-vit"], **FAST
    )
    assert first["params"] == again["params"] and first["objective"] == again["objective"]
    assert first["target"] == 1 and first["target_source"] == "label" and first["lesion_boxes"] == []
    assert first["targets"] == {"wm-cls-resnet18": 1, "wm-cls-vit": 1}
    params = first["params"]
    protected, _ = blending.watermark(image, logo, params["alpha"], params["x"], params["y"], params["sl"])
    classified = client.classify(
        blending.unit_view(protected)[None], models=["wm-cls-resnet18", "wm-cls-vit"], upload_dtype="float16"
    )
    objective = 0.0
    for name, weight in (("wm-cls-resnet18", 0.7), ("wm-cls-vit", 0.3)):
        after = np.array(first["after"][name]["probabilities"][0])
        np.testing.assert_allclose(after, classified["models"][name]["probabilities"][0], atol=2e-3)
        objective += weight * after[1]
    assert abs(objective - first["objective"]) < 1e-4


def test_without_a_label_each_model_moves_away_from_its_own_clean_answer(server):
    """Two classifiers that disagree on the clean image: neither is pushed towards the other's answer."""
    client = _client(server)
    models = ["wm-cls-resnet18", "wm-cls-vit"]
    for seed in range(200):
        image = _rgb(40, 48, seed=seed)
        clean = client.classify(blending.unit_view(image)[None], models=models)["models"]
        answers = {m: clean[m]["predicted"][0] for m in models}
        if len(set(answers.values())) == 2:
            break
    else:
        pytest.fail("no image on which the two tiny classifiers disagree")
    answer = client.optimize(image, blending.default_logo(64), mode="wap", models=models, seed=3, **FAST)
    assert answer["target_source"] == "clean-prediction" and answer["target"] is None
    assert answer["targets"] == answers
    after = {m: np.array(answer["after"][m]["probabilities"][0]) for m in models}
    # eq. 8 with each model's own target, on the rendered image
    assert abs(answer["objective"] - sum(0.5 * after[m][answers[m]] for m in models)) < 1e-4
    assert answer["fooled"] == all(answer["after"][m]["predicted"][0] != answers[m] for m in models)
    labelled = client.optimize(image, blending.default_logo(64), mode="wap", models=models, seed=3, label=1, **FAST)
    assert labelled["target_source"] == "label" and labelled["targets"] == {m: 1 for m in models}


def test_optimize_with_the_server_segmenter_and_a_user_model(server):
    client = _client(server)
    image = _rgb(40, 40, seed=8)
    answer = client.optimize(
        image,
        blending.default_logo(64),
        mode="keep-out",
        lesions="server",
        mask_threshold=0.99,
        models=["mine"],
        seed=0,
        **FAST,
    )
    assert answer["lesion_source"] == "server" and answer["models"] == ["mine"]
    assert len(answer["before"]["mine"]["probabilities"][0]) == 3


def test_incremental_rendering_matches_rendering_whole_images(wm_files):
    """The search scores candidates from the logo area alone; that must equal blend_batch + resize + classify."""
    from medprivacy.server.app import ServerConfig, create_app
    from medprivacy.server.watermark.scoring import CandidateScorer
    from medprivacy.watermark.optimizer import ensemble_objective

    app = create_app(ServerConfig(models_dir=wm_files[0], device="cpu", inference_batch=5))
    wm = app.state.service.watermark
    models = [wm.models.classifiers[n] for n in ("wm-cls-resnet18", "wm-cls-vit")]
    rng = np.random.default_rng(9)
    # 8-bit RGB with its full range; 16-bit gray with the full range and with a 12-bit CT-like window that clips
    cases = (
        (rng.integers(0, 256, (70, 53, 3), dtype=np.uint8), (0, 255)),
        (rng.integers(0, 65536, (29, 47), dtype=np.uint16), (0, 65535)),
        (rng.integers(0, 4096, (29, 47), dtype=np.uint16), (1000, 3000)),
    )
    for image, window in cases:
        fitted = blending.fit_logo(blending.default_logo(64), image.shape, 2.5)
        max_x, max_y = image.shape[1] - fitted.size[1], image.shape[0] - fitted.size[0]
        params = np.column_stack([rng.uniform(0, 255, 7), rng.integers(0, max_x + 1, 7), rng.integers(0, max_y + 1, 7)])
        params[0, 1:], params[1, 1:] = (0, 0), (max_x, max_y)  # both corners
        scorer = CandidateScorer(wm, models, image, fitted, window, threading.Event())
        scorer.target, scorer.weights = 1, np.array([0.5, 0.5])
        objective, _ = scorer(params.astype(np.float64))
        rendered = blending.blend_batch(image, fitted, params, window)
        probs = wm.classify_array(models, np.stack([blending.unit_view(r, window) for r in rendered]))
        expected, _ = ensemble_objective(np.stack([probs[m.name] for m in models]), 1, [0.5, 0.5])
        np.testing.assert_allclose(objective, expected, atol=1e-5)


# --- auth and bad input ----------------------------------------------------------------------------------------


def test_token_is_required_when_set(servers):
    token_server = servers[1]
    images = blending.unit_view(_rgb())[None]
    with pytest.raises(AuthError, match="requires a token"):
        _client(token_server, token=None).classify(images)
    with pytest.raises(AuthError, match="rejected the token"):
        _client(token_server, token="wrong").optimize(_rgb(), blending.default_logo(64), mode="wap", **FAST)
    for path in ("/v1/watermark/classify", "/v1/watermark/lesions", "/v1/watermark/optimize"):
        assert _post(token_server, path, b"").status_code == 401
    assert set(_client(token_server).classify(images)["models"]) == set(CLASSIFIERS)


@pytest.mark.parametrize(
    "body, params, headers, status, message",
    [
        (encode_tensor(np.zeros((1, 3, 8, 8)), "float32"), None, {}, 422, "send uint8 or float16"),
        (encode_tensor(np.zeros((3, 8, 8))), None, {}, 422, "expected (N, 3, H, W)"),
        (encode_tensor(np.zeros((1, 3, 8, 8))), {"models": "wm-cls-vit,nope"}, {}, 422, "unknown classifier(s) 'nope'"),
        (encode_tensor(np.full((1, 3, 8, 8), 2.0), "float16"), None, {}, 422, "scaled to [0, 1]"),
        (b"GIF89a", None, {}, 422, "not a valid MedPrivacy tensor"),
        (encode_tensor(np.zeros((1, 3, 8, 8))), None, {"X-MedPrivacy-API": "999"}, 409, "version 999"),
    ],
)
def test_classify_refuses_bad_input_with_one_line(server, body, params, headers, status, message):
    response = _post(server, "/v1/watermark/classify", body, headers=headers, params=params)
    assert response.status_code == status and message in _detail(response)


def _optimize_cases():
    image = _rgb(40, 48)
    no_lesion = np.zeros(image.shape[:2], dtype=bool)
    logo_doc = json.loads(_optimize_body(image))
    return [
        (b"{not json", "request body is not valid JSON"),
        (json.dumps({"image": logo_doc["image"]}).encode(), "request body has no 'logo'; it is required"),
        (
            json.dumps({**logo_doc, "extra": 1}).encode(),
            "unknown field 'extra' in the request body; accepted there: image, logo, mask, params",
        ),
        (
            _optimize_body(image, popsize=3),
            "unknown field 'params.popsize' in the request body; accepted there: mode, lesions",
        ),
        (_optimize_body(image, sl=0.5, mode="wap"), "is larger than the image"),
        (_optimize_body(image, mode="sideways"), "unknown placement mode 'sideways'"),
        (_optimize_body(image, mask=no_lesion, mode="keep-in", **FAST), "no lesion found in the mask"),
        (_optimize_body(image, mask=np.zeros((4, 4), bool)), "lesion mask has shape [4, 4]"),
        (_optimize_body(image, lesions="mask"), "has no mask"),
        (_optimize_body(image, mode="wap", label=7, **FAST), "label 7 must be a class index between 0 and 1"),
        (
            _optimize_body(image, mode="wap", population=0),
            "params.population: input should be greater than or equal to 1 (got 0)",
        ),
        (_optimize_body(image, mode="wap", max_evaluations=10**9), "this server's limit"),
        (
            _optimize_body(image, mode="wap", weights=[1.0], models=list(CLASSIFIERS)),
            "weights must be a list of 4 numbers",
        ),
        (_optimize_body(image, mode="wap", models=["wm-cls-vit", "mine"]), "different numbers of classes"),
        (_optimize_body(image, mode="wap", alpha_range=[200, 100]), "alpha bounds (200.0, 100.0)"),
        (
            json.dumps(
                {**logo_doc, "image": base64.b64encode(encode_tensor(np.zeros((1, 3, 8, 8)), "float16")).decode()}
            ).encode(),
            "float16, which cannot carry exact pixels",
        ),
        (json.dumps({**logo_doc, "logo": "!!!"}).encode(), "logo is not valid base64"),
    ]


@pytest.mark.parametrize("case", range(len(_optimize_cases())))
def test_optimize_refuses_bad_input_with_one_line(server, case):
    body, message = _optimize_cases()[case]
    response = _post(server, "/v1/watermark/optimize", body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert message in _detail(response)


def test_client_errors_are_one_line(server):
    client = _client(server)
    with pytest.raises(
        ServerError, match=r"HTTP 422: the logo \(80x80 px at sl=0.5\) is larger than the image \(40x48\)"
    ):
        client.optimize(_rgb(40, 48), blending.default_logo(64), sl=0.5, mode="wap")
    with pytest.raises(InputError, match="8- or 16-bit"):
        client.optimize(np.zeros((8, 8), dtype=np.float32), blending.default_logo(64))


def test_extra_classifier_option_is_checked():
    from medprivacy.server.watermark import parse_extra_classifier

    with pytest.raises(InputError, match="must look like NAME=model.pt"):
        parse_extra_classifier("no-equals-sign")
    with pytest.raises(InputError, match="does not exist"):
        parse_extra_classifier("x=/nonexistent/model.pt")


def test_extra_classifier_that_is_not_torchscript_stops_startup(tmp_path, wm_files):
    from medprivacy.server.watermark import WatermarkModels, parse_extra_classifier

    notes = tmp_path / "notes.pt"
    notes.write_text("not a model")
    models = WatermarkModels({}, tmp_path, (parse_extra_classifier(f"bad={notes}:16x16"),))
    with pytest.raises(InputError, match="--extra-classifier bad: .* is not a TorchScript file"):
        models.ensure_loaded(models.classifiers["bad"], "cpu")
    with pytest.raises(InputError, match="already a model of this server"):
        WatermarkModels({"wm-cls-vit": {}}, tmp_path, (parse_extra_classifier(f"wm-cls-vit={wm_files[1]}"),))
