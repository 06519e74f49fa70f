"""ObfuscationPrivacy core: the site key (permissions, integrity), the transform (determinism, independence across
keys, non-bijectivity), frames in and out of real files, datasets, the classifier and the attack measures.

The VAE is the tiny untrained one of ``tiny_obfuscation_models_dir``: these tests check mechanics, not privacy.
"""

from __future__ import annotations

import json
import os
import random
import stat

import numpy as np
import pytest
from conftest import OBF_SIZE

from medprivacy.errors import InputError
from medprivacy.obfuscation import attacks, data, io as oio
from medprivacy.obfuscation.classifier import (
    TrainSettings,
    binary_metrics,
    check_dataset,
    predict_probabilities,
    train_classifier,
)
from medprivacy.obfuscation.dataset import dataset_files, obfuscate_dataset
from medprivacy.obfuscation.key import KEY_FILE, VAE_FILE, MappingParams, SiteKey, random_mapping
from medprivacy.obfuscation.keygen import create_site_key, default_params
from medprivacy.obfuscation.transform import Obfuscator, keystream_normals


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory, tiny_obfuscation_models_dir):
    return create_site_key(tmp_path_factory.mktemp("keys") / "site", models_dir=tiny_obfuscation_models_dir).directory


@pytest.fixture(scope="module")
def obfuscator(key_dir):
    return Obfuscator(SiteKey.load(key_dir))


def angiograms(count: int = 6, size: int = 48) -> np.ndarray:
    return np.stack([data.render_angio(seed, size).image for seed in range(900_000, 900_000 + count)])


# --- the key -----------------------------------------------------------------------------------------------------


def test_keygen_writes_a_private_folder_of_private_files(key_dir):
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    for name in (KEY_FILE, VAE_FILE):
        assert stat.S_IMODE(os.stat(key_dir / name).st_mode) == 0o600
    key = SiteKey.load(key_dir)
    assert len(key.key_id) == 16 and key.params == default_params((OBF_SIZE, OBF_SIZE))
    document = json.loads((key_dir / KEY_FILE).read_text())
    # The key id is public (servers see it); nothing else in the file may equal it or leak the secret.
    assert document["key_id"] == key.key_id and key.key_id not in document["secret"]


def test_the_mapping_is_many_to_one_with_balanced_shuffled_codes(key_dir):
    key = SiteKey.load(key_dir)
    params = key.params
    table = key.table
    assert len(table) == params.levels and len(set(table.tolist())) == params.codes < params.levels
    # Not a bijection: every code has levels/codes preimages, so the inverse is not a function.
    preimages = {int(code): np.flatnonzero(table == code) for code in set(table.tolist())}
    assert all(len(levels) == params.levels // params.codes for levels in preimages.values())
    # Shuffled: neighbouring intensities rarely share a code, and the order is not the identity's.
    assert (table[1:] != table[:-1]).mean() > 0.5
    assert not np.array_equal(np.argsort(table, kind="stable"), np.arange(params.levels))


def test_random_mapping_comes_from_the_csprng_and_seeded_generators_are_reproducible():
    params = MappingParams(32, 8, 1.0, 0.5, (32, 32))
    fresh = {tuple(random_mapping(params)[0]) for _ in range(5)}
    assert len(fresh) == 5
    assert np.array_equal(random_mapping(params, random.Random(3))[0], random_mapping(params, random.Random(3))[0])
    with pytest.raises(InputError, match="many-to-one"):
        MappingParams(8, 8, 1.0, 0.5, (32, 32)).check()


def test_existing_key_is_never_replaced_without_force(key_dir, tiny_obfuscation_models_dir):
    with pytest.raises(InputError, match="already exists.*--force"):
        create_site_key(key_dir, models_dir=tiny_obfuscation_models_dir)


def _copy_key(key_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(key_dir, copy)
    os.chmod(copy, 0o700)
    return copy


def test_tampered_damaged_or_exposed_keys_are_refused(key_dir, tmp_path):
    with pytest.raises(InputError, match="no obfuscation key .*keygen"):
        SiteKey.load(tmp_path / "missing")

    copy = _copy_key(key_dir, tmp_path)
    document = json.loads((copy / KEY_FILE).read_text())
    assignment = document["mapping"]["assignment"]
    assignment[0], assignment[1] = assignment[1], (assignment[1] + 1) % document["mapping"]["codes"]
    (copy / KEY_FILE).write_text(json.dumps(document))
    os.chmod(copy / KEY_FILE, 0o600)
    with pytest.raises(InputError, match="integrity check"):
        SiteKey.load(copy)

    copy = _copy_key(key_dir, tmp_path / "b")
    (copy / KEY_FILE).write_text((key_dir / KEY_FILE).read_text()[:200])
    with pytest.raises(InputError, match="damaged"):
        SiteKey.load(copy)

    copy = _copy_key(key_dir, tmp_path / "c")
    weights = bytearray((copy / VAE_FILE).read_bytes())
    weights[-1] ^= 1
    (copy / VAE_FILE).write_bytes(bytes(weights))
    with pytest.raises(InputError, match="does not match the key"):
        SiteKey.load(copy)

    copy = _copy_key(key_dir, tmp_path / "d")
    os.chmod(copy, 0o750)
    with pytest.raises(InputError, match="chmod 700"):
        SiteKey.load(copy)
    os.chmod(copy, 0o700)
    os.chmod(copy / KEY_FILE, 0o644)
    with pytest.raises(InputError, match="chmod 600"):
        SiteKey.load(copy)


# --- the transform -----------------------------------------------------------------------------------------------


def test_same_key_and_frame_give_the_same_codes_other_keys_independent_ones(
    key_dir, obfuscator, tmp_path, tiny_obfuscation_models_dir
):
    frames = angiograms()
    first = obfuscator.obfuscate(frames)
    assert first.dtype == np.uint8 and first.shape == (len(frames), OBF_SIZE, OBF_SIZE)
    again = Obfuscator(SiteKey.load(key_dir)).obfuscate(frames)
    np.testing.assert_array_equal(first, again)
    # Frame by frame or all at once, in any order: each frame's randomness depends on the key and the frame only.
    np.testing.assert_array_equal(obfuscator.obfuscate(frames[::-1])[::-1], first)
    np.testing.assert_array_equal(obfuscator.obfuscate(frames[2:3])[0], first[2])

    other = Obfuscator(create_site_key(tmp_path / "other", models_dir=tiny_obfuscation_models_dir))
    second = other.obfuscate(frames)
    codes = obfuscator.key.params.codes
    # Independent keys agree on about 1/codes of the pixels (chance), nowhere near everywhere.
    agreement = float((first == second).mean())
    assert abs(agreement - 1.0 / codes) < 0.1, agreement
    assert set(np.unique(first)) <= set(obfuscator.key.code_values.tolist())


def test_per_frame_noise_is_a_keyed_csprng_stream():
    normals = keystream_normals(b"k" * 32, 20001)
    np.testing.assert_array_equal(normals, keystream_normals(b"k" * 32, 20001))
    assert len(normals) == 20001 and abs(normals.mean()) < 0.03 and abs(normals.std() - 1.0) < 0.03
    assert not np.array_equal(normals[:100], keystream_normals(b"j" * 32, 100))


def test_unusable_frames_give_one_line_errors(obfuscator):
    with pytest.raises(InputError, match="frame 1 is empty"):
        obfuscator.obfuscate(np.stack([angiograms(1)[0], np.full((48, 48), 7.0)]))
    # Runs are prepared a batch at a time; the message still counts frames from the start of the run.
    with pytest.raises(InputError, match="frame 70 is empty"):
        obfuscator.obfuscate(np.concatenate([np.repeat(angiograms(1), 70, axis=0), np.full((1, 48, 48), 7.0)]))
    with pytest.raises(InputError, match="NaN"):
        obfuscator.obfuscate(np.full((1, 48, 48), np.nan))
    with pytest.raises(InputError, match=r"\(T, H, W\)"):
        obfuscator.obfuscate(np.zeros((48, 48)))


def test_any_frame_size_and_pixel_type_ends_at_the_key_frame_size(obfuscator):
    frames = angiograms(2, size=96)
    for pixels in (
        np.round(frames * 255).astype(np.uint8),
        np.round(frames * 4095).astype(np.uint16),
        (frames * 3000 - 1000).astype(np.int16),
        frames,
    ):
        codes = obfuscator.obfuscate(pixels)
        assert codes.shape == (2, OBF_SIZE, OBF_SIZE)


# --- files -------------------------------------------------------------------------------------------------------


def _write_dicom(path, pixels: np.ndarray, multiframe: bool) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    from medprivacy.imageio import save_dicom

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "XA", "Doe^Jane", "SECRET-ID-42"
    ds.Rows, ds.Columns = pixels.shape[1:]
    if multiframe:
        ds.NumberOfFrames = pixels.shape[0]
        ds.FrameTime = 66.7
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels if multiframe else pixels[0], dtype="<u2").tobytes()
    save_dicom(ds, path)


def test_runs_from_every_format_keep_order_and_field_of_view_and_lose_all_metadata(obfuscator, tmp_path):
    import SimpleITK as sitk

    run = np.round(data.render_run(900_001, frames=5, size=64) * 4095).astype(np.uint16)
    # Each frame's noise is keyed by its exact pixels, so the same pixels in any container give the same codes.
    expected = obfuscator.obfuscate(run)
    files = {}
    files["dicom"] = tmp_path / "run.dcm"
    _write_dicom(files["dicom"], run, multiframe=True)
    image = sitk.GetImageFromArray(run)
    image.SetSpacing((0.25, 0.25, 0.0667))
    image.SetOrigin((-8.0, 4.0, 0.0))
    for name in ("run.nrrd", "run.nii.gz", "run.tif"):
        sitk.WriteImage(image, str(tmp_path / name))
        files[name] = tmp_path / name
    for name, path in files.items():
        frames = oio.read_frames(path)
        assert frames.count == 5, name
        codes = obfuscator.obfuscate(frames.pixels)
        np.testing.assert_array_equal(codes, expected, err_msg=name)
        out = tmp_path / "out" / oio.output_name(path)
        out.parent.mkdir(exist_ok=True)
        oio.write_frames(codes, out, frames)
        written = sitk.ReadImage(str(out))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), codes)
        # Same field of view: the first pixel's outer corner and the extent do not move.
        spacing = np.array(written.GetSpacing())
        np.testing.assert_allclose(spacing[:2] * OBF_SIZE, np.array(frames.spacing[:2]) * 64, rtol=1e-6)
        corner_in = np.array(frames.origin[:2]) - np.array(frames.spacing[:2]) / 2
        np.testing.assert_allclose(np.array(written.GetOrigin()[:2]) - spacing[:2] / 2, corner_in, atol=1e-6)
        assert written.GetSpacing()[2] == pytest.approx(frames.spacing[2])
        keys = " ".join(written.GetMetaDataKeys()) + " ".join(written.GetMetaData(k) for k in written.GetMetaDataKeys())
        assert "Doe" not in keys and "SECRET" not in keys
    assert oio.output_name(files["dicom"]) == "run.nrrd" and oio.output_name(tmp_path / "a.png") == "a.png"


def test_single_frames_and_bad_files_give_one_line_errors(tmp_path):
    import SimpleITK as sitk

    frame = np.round(data.render_angio(900_002, 48).image * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(frame), str(tmp_path / "a.png"))
    assert oio.read_frames(tmp_path / "a.png").pixels.shape == (1, 48, 48)
    _write_dicom(tmp_path / "b.dcm", np.round(frame[None] * 16.0).astype(np.uint16), multiframe=False)
    assert oio.read_frames(tmp_path / "b.dcm").pixels.shape == (1, 48, 48)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([frame] * 3, -1), isVector=True), str(tmp_path / "rgb.png"))
    with pytest.raises(InputError, match="colour"):
        oio.read_frames(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(InputError, match="cannot read broken.png") as caught:
        oio.read_frames(tmp_path / "broken.png")
    assert "\n" not in str(caught.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported format"):
        oio.read_frames(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="PNG holds one frame"):
        oio.write_frames(np.zeros((2, 32, 32), np.uint8), tmp_path / "two.png")


def test_dataset_folder_csv_and_their_mistakes(tmp_path, obfuscator):
    import SimpleITK as sitk

    root = tmp_path / "dataset"
    for label, seeds in (("LCA", (900_000, 900_002)), ("RCA", (900_001,))):
        (root / label).mkdir(parents=True)
        for seed in seeds:
            sitk.WriteImage(
                sitk.GetImageFromArray(np.round(data.render_angio(seed, 48).image * 255).astype(np.uint8)),
                str(root / label / f"{seed}.png"),
            )
    (root / "LCA" / ".DS_Store").write_text("x")
    files = dataset_files(root)
    assert files.classes == ["LCA", "RCA"] and files.counts() == {"LCA": 2, "RCA": 1}
    codes, labels = obfuscate_dataset(files, obfuscator)
    assert codes.shape == (3, OBF_SIZE, OBF_SIZE) and labels.tolist() == [0, 0, 1]

    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\ndataset/LCA/900000.png,left\ndataset/RCA/900001.png,right\n")
    listed = dataset_files(csv_path)
    assert listed.classes == ["left", "right"] and listed.labels == [0, 1]

    (tmp_path / "one" / "only").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.uint8)), str(tmp_path / "one" / "only" / "a.png"))
    with pytest.raises(InputError, match="only the class folder 'only'.*at least two classes"):
        dataset_files(tmp_path / "one")
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png\n")
    with pytest.raises(InputError, match="row 1"):
        dataset_files(bad)


# --- classifier and measures ---------------------------------------------------------------------------------------


def test_code_classifier_learns_from_code_statistics_and_refuses_plain_frames():
    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    # Class 1 frames hold code 200 in their upper half more often: a statistical, not a per-pixel, signal.
    frames = rng.choice(np.array([0, 100, 200], np.uint8), size=(80, 32, 32), p=[0.45, 0.45, 0.1])
    frames[labels == 1, :16] = rng.choice(np.array([0, 100, 200], np.uint8), size=(40, 16, 32), p=[0.3, 0.3, 0.4])
    result = train_classifier(
        frames, labels, ["a", "b"], TrainSettings(steps=60, validate_every=20, validation_fraction=0.2)
    )
    assert result.arch["code_values"] == [0, 100, 200] and result.metrics["validation_frames"] == 16
    metrics = binary_metrics(predict_probabilities(result.net, frames)[:, 1], labels)
    assert metrics["accuracy"] > 0.9 and metrics["auc"] > 0.9

    with pytest.raises(InputError, match="distinct values.*obfuscate them"):
        check_dataset(rng.integers(0, 256, (4, 32, 32), dtype=np.uint8), np.array([0, 1, 0, 1]), ["a", "b"])
    with pytest.raises(InputError, match="at least two classes"):
        check_dataset(frames[:4], np.zeros(4, np.int64), ["a", "b"])


def test_binary_metrics_and_attack_measures():
    metrics = binary_metrics(np.array([0.9, 0.8, 0.3, 0.1, 0.6]), np.array([1, 1, 0, 0, 0]))
    assert metrics == {"accuracy": 0.8, "auc": 1.0, "sensitivity": 1.0, "specificity": 0.6667, "frames": 5}
    frames = np.stack([data.render_angio(seed, 48).image for seed in (900_000, 900_001)])
    same = attacks.scores(frames, frames)
    assert same["ssim"] == pytest.approx(1.0) and same["vessel_dice"] == pytest.approx(1.0)
    unrelated = attacks.scores(frames[::-1], frames)
    assert unrelated["ssim"] < 0.5 and unrelated["vessel_dice"] < 0.4


def test_key_recovery_from_leaked_pairs_is_exact_without_noise():
    # The b-keyfit estimate is only as good as its view of the VAE output: noise-free, it recovers the whole table.
    levels, codes = 32, 8
    table = np.repeat(np.arange(codes), levels // codes).astype(np.uint8) * 30
    random.Random(1).shuffle(table)
    plain = np.tile(np.linspace(0, 1, 64, endpoint=False), (64, 1))[None]
    leaked = table[np.floor(plain * levels).astype(int)]
    estimate, explained = attacks.estimate_table(plain, leaked, levels)
    np.testing.assert_array_equal(estimate, table)
    assert explained == 1.0


def test_keygen_can_fine_tune_the_vae_on_site_frames_which_then_stays_in_the_key(tmp_path, tiny_obfuscation_models_dir):
    import SimpleITK as sitk

    from medprivacy.nets.registry import file_sha256, load_manifest

    site = tmp_path / "site-frames"
    site.mkdir()
    run = np.round(data.render_run(900_003, frames=20, size=48) * 4095).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(run), str(site / "run.nrrd"))
    key = create_site_key(tmp_path / "key", models_dir=tiny_obfuscation_models_dir, vae_from=[site], vae_steps=3)
    assert key.vae["source"].startswith("fine-tuned from the shipped obf-vae on 20 site frames")
    shipped = load_manifest(tiny_obfuscation_models_dir)["models"]["obf-vae"]["sha256"]
    assert file_sha256(key.vae_path) != shipped and len(key.vae["latent_scale"]) == 8
    codes = Obfuscator(key).obfuscate(run[:2])
    assert codes.shape == (2, OBF_SIZE, OBF_SIZE)
    sitk.WriteImage(sitk.GetImageFromArray(run[:3]), str(tmp_path / "short.nrrd"))
    with pytest.raises(InputError, match="only 3 frames.*at least 16"):
        create_site_key(
            tmp_path / "key2", models_dir=tiny_obfuscation_models_dir, vae_from=[tmp_path / "short.nrrd"], vae_steps=1
        )
