"""The Slicer logics' worker path on real MRML nodes (slicer-core) against real local servers and real worker
processes: the same results as the in-process calls, nodes in, nodes out, and nothing left behind.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e .[dev])")

import slicer_support  # noqa: E402
from conftest import start_server  # noqa: E402

from medprivacy.labels import TISSUE_SEGMENTS  # noqa: E402

MixupPrivacy = slicer_support.load_module()
MedLockerWatermark = slicer_support.load_module(slicer_support.WATERMARK_MODULE_DIR)
ObfuscationPrivacy = slicer_support.load_module(slicer_support.OBFUSCATION_MODULE_DIR)


@pytest.fixture(scope="module")
def mixup_key(live_server, tmp_path_factory) -> Path:
    logic = MixupPrivacy.MixupPrivacyLogic(slicer_support.make_scene().scene)
    patch_size = tuple(live_server.client().info()["models"]["mixup-seg"]["patch_size"])
    folder = tmp_path_factory.mktemp("slicer-worker-key") / "key"
    bank = logic.generate_key_in_worker(folder, subjects=1, patches=64, patch_size=patch_size)
    assert tuple(bank.patch_size) == patch_size and len(bank) == 64
    return folder


def _our_temporary_folders() -> set[str]:
    folder = Path(tempfile.gettempdir())
    return {p.name for pattern in ("medprivacy-mixup-*", "medprivacy-request-*") for p in folder.glob(pattern)}


def test_worker_segmentation_equals_the_in_process_one(scene, live_server, mixup_key):
    from medprivacy.data.template import load_template

    logic = MixupPrivacy.MixupPrivacyLogic(scene)
    image = load_template().image
    options = dict(key_dir=mixup_key, tta=2, unmix="naive", seed=0)
    here = logic.compute(image, live_server.url, **options)
    there = logic.compute_in_worker(image, live_server.url, keep_uploaded=True, **options)
    import SimpleITK as sitk

    np.testing.assert_array_equal(sitk.GetArrayFromImage(there.labelmap), sitk.GetArrayFromImage(here.labelmap))
    assert there.stats["patches_sent"] == here.stats["patches_sent"] and there.uploaded is not None
    node = logic.sitk_to_volume_node(image, "brain")
    segmentation = logic.apply_result(there, node, show_uploaded=True)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3 and logic.last_uploaded_node is not None


def test_start_segmentation_loads_the_result_into_the_scene_and_cancel_adds_nothing(scene, live_server, mixup_key):
    from medprivacy.data.template import load_template

    logic = MixupPrivacy.MixupPrivacyLogic(scene)
    node = logic.sitk_to_volume_node(load_template().image, "brain T1")
    before = _our_temporary_folders()
    done, errors, stages = [], [], []
    worker = logic.start_segmentation(
        node,
        live_server.url,
        key_dir=mixup_key,
        tta=2,
        unmix="naive",
        seed=0,
        on_progress=lambda text, fraction: stages.append(fraction),
        on_done=done.append,
        on_error=lambda *error: errors.append(error),
    )
    while worker.poll(0.05):
        pass
    assert not errors and len(done) == 1 and stages, errors
    segmentation = done[0]
    names = sorted(segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(3))
    assert names == sorted(name for name, _color in TISSUE_SEGMENTS.values())
    labels = logic.segmentation_to_labelmap_array(segmentation, node)
    assert labels.shape == tuple(reversed(node.GetImageData().GetDimensions())) and labels.max() > 0
    assert _our_temporary_folders() == before, "the exported scan or the result stayed on disk"

    nodes = scene.GetNumberOfNodes()
    worker = logic.start_segmentation(
        node,
        live_server.url,
        key_dir=mixup_key,
        tta=16,
        unmix="naive",
        on_done=done.append,
        on_error=lambda *error: errors.append(error),
    )
    started = time.monotonic()
    while worker.poll(0.05) and time.monotonic() - started < 1.5:
        pass
    worker.cancel()
    while worker.poll(0.05):
        pass
    assert [kind for _message, kind in errors] == ["cancelled"] and len(done) == 1
    assert scene.GetNumberOfNodes() == nodes
    assert _our_temporary_folders() == before


def test_a_result_that_cannot_reach_the_scene_is_one_error_and_leaves_nothing(scene, live_server, mixup_key):
    # The input node goes away while the worker runs: the answer cannot be placed, so on_error gets one line (not a
    # traceback in a Qt slot), no node is added and the worker's files are removed.
    from medprivacy.data.template import load_template

    logic = MixupPrivacy.MixupPrivacyLogic(scene)
    node = logic.sitk_to_volume_node(load_template().image, "brain T1")
    before = _our_temporary_folders()
    done, errors = [], []
    worker = logic.start_segmentation(
        node,
        live_server.url,
        key_dir=mixup_key,
        tta=2,
        unmix="naive",
        seed=0,
        on_done=done.append,
        on_error=lambda *error: errors.append(error),
    )
    scene.RemoveNode(node)
    nodes = scene.GetNumberOfNodes()
    while worker.poll(0.05):
        pass
    assert not done and len(errors) == 1 and errors[0][1] == "input", errors
    assert "removed from the scene" in errors[0][0] and "\n" not in errors[0][0]
    assert scene.GetNumberOfNodes() == nodes
    assert _our_temporary_folders() == before


def test_obfuscation_in_worker_equals_in_process(scene, tiny_obfuscation_models_dir, tmp_path):
    from ObfuscationPrivacyLib.testing import ObfuscationPrivacyTestMixin

    logic = ObfuscationPrivacy.ObfuscationPrivacyLogic(scene, tiny_obfuscation_models_dir)
    description = logic.generate_key_in_worker(tmp_path / "key")
    assert description == logic.describe_key(tmp_path / "key")
    frames = ObfuscationPrivacyTestMixin.angiography_run(3)
    stages = []
    codes, key_id = logic.obfuscate_frames_in_worker(
        frames, tmp_path / "key", lambda text, fraction: stages.append(fraction)
    )
    expected, expected_id = logic.obfuscate_frames(frames, tmp_path / "key")
    np.testing.assert_array_equal(codes, expected)
    assert key_id == expected_id and stages
    with pytest.raises(MixupPrivacy.InputError) as raised:
        logic.obfuscate_frames_in_worker(frames, tmp_path / "no-key-here")
    assert "\n" not in str(raised.value)


def test_obfuscation_training_and_classification_in_worker(scene, tiny_obfuscation_models_dir, tmp_path):
    from ObfuscationPrivacyLib.testing import ObfuscationPrivacyTestMixin

    mixin = ObfuscationPrivacyTestMixin()
    logic = ObfuscationPrivacy.ObfuscationPrivacyLogic(scene, tiny_obfuscation_models_dir)
    key_dir = mixin.key_folder(tmp_path, tiny_obfuscation_models_dir)
    dataset = mixin.write_dataset(tmp_path)
    with start_server([], models_dir=tiny_obfuscation_models_dir) as server:
        stages = []
        job = logic.train_from_folder_in_worker(
            dataset, key_dir, server.url, steps=8, progress=lambda text, fraction: stages.append(fraction)
        )
        assert job["status"] == "done" and job["model"].startswith("obf-") and stages and max(stages) <= 1.0
        frames = mixin.angiography_run(3)
        there = logic.classify_frames_in_worker(frames, key_dir, server.url, job["model"])
        here = logic.classify_frames(frames, key_dir, server.url, job["model"])
        assert there["classes"] == here["classes"] == ["LCA", "RCA"]
        np.testing.assert_allclose(there["probabilities"], here["probabilities"], atol=1e-6)

        # Cancel (SIGTERM) while the server trains: the worker cancels the job there before it exits.
        polls = []
        with pytest.raises(MixupPrivacy.CancelledError):
            logic.train_from_folder_in_worker(
                dataset,
                key_dir,
                server.url,
                steps=20000,
                progress=lambda text, fraction: polls.append(text.startswith("training on the server")),
                cancel=lambda: sum(polls) >= 2,
            )
        client = logic.client(server.url)
        try:
            job_id = client.jobs()[-1]["job"]
            deadline = time.monotonic() + 60
            while client.job(job_id)["status"] not in ("cancelled", "done", "failed") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.job(job_id)["status"] == "cancelled"
        finally:
            client.close()


def test_watermark_folder_in_worker_equals_in_process_and_cancel_keeps_a_key_that_restores(
    scene, tiny_watermark_models_dir, tmp_path
):
    import SimpleITK as sitk

    from MedLockerWatermarkLib.testing import PASSPHRASE, TEST_SCRYPT_LOG2_N, MedLockerWatermarkTestMixin, tiny_search
    from medprivacy.watermark import io as mio
    from medprivacy.watermark.keyfile import load_key, unlock

    logic = MedLockerWatermark.MedLockerWatermarkLogic(scene)
    inputs = tmp_path / "in"
    inputs.mkdir()
    originals = {f"{kind}.png": MedLockerWatermarkTestMixin.sample_pixels(kind)[0] for kind in ("gray8", "rgb")}
    for name, pixels in originals.items():
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=pixels.ndim == 3), str(inputs / name))
    options = dict(
        passphrase=PASSPHRASE,
        settings=tiny_search(mode="wap"),
        scrypt_log2_n=TEST_SCRYPT_LOG2_N,
        logo=logic.load_logo(None),
    )
    before = {p.name for p in Path(tempfile.gettempdir()).glob("medprivacy-*")}
    with start_server([], models_dir=tiny_watermark_models_dir) as server:
        stages = []
        there = logic.protect_folder_in_worker(
            inputs,
            tmp_path / "there",
            tmp_path / "there.mlkey",
            server.url,
            progress=lambda text, fraction: stages.append(fraction),
            **options,
        )
        here = logic.protect_folder(inputs, tmp_path / "here", tmp_path / "here.mlkey", server.url, **options)
        assert there.protected == here.protected == 2 and stages and stages[-1] == 1.0
        key = load_key(tmp_path / "there.mlkey", passphrase=PASSPHRASE)
        for name, pixels in originals.items():
            # The same seeded search on the same server: the worker writes exactly what the logic writes.
            protected = mio.read_image(tmp_path / "there" / name).pixels
            np.testing.assert_array_equal(protected, mio.read_image(tmp_path / "here" / name).pixels)
            np.testing.assert_array_equal(unlock(protected, key), pixels)

        # A bad request is one line from the worker, before the server works.
        with pytest.raises(MixupPrivacy.InputError) as raised:
            logic.protect_folder_in_worker(inputs, tmp_path / "again", tmp_path / "there.mlkey", server.url, **options)
        assert "already exists" in str(raised.value) and "\n" not in str(raised.value)

        # Cancel (SIGTERM) once the first image is done (progress comes before each image: 0, then 1/2): the
        # finished image stays, and the key on disk restores it.
        with pytest.raises(MixupPrivacy.CancelledError):
            logic.protect_folder_in_worker(
                inputs,
                tmp_path / "partial",
                tmp_path / "partial.mlkey",
                server.url,
                progress=lambda text, fraction: stages.append(fraction),
                cancel=lambda: stages[-1] == 0.5,
                **options,
            )
        first = sorted(originals)[0]
        assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == [first]
        partial = load_key(tmp_path / "partial.mlkey", passphrase=PASSPHRASE)
        assert partial.names() == [first]
        np.testing.assert_array_equal(
            unlock(mio.read_image(tmp_path / "partial" / first).pixels, partial), originals[first]
        )
    assert {p.name for p in Path(tempfile.gettempdir()).glob("medprivacy-*")} == before, "a request or logo stayed"
