"""Core Mixup-Privacy math, patch grid, reference bank, I/O and training on real (small) data."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medprivacy.errors import InputError
from medprivacy.labels import NUM_CLASSES
from medprivacy.mixup.mixing import flip_patches, mix, naive_unmix, one_hot, plan_mixing
from medprivacy.mixup.patches import PatchGrid, brain_bounding_box


def test_mixing_then_naive_unmixing_of_exact_maps_is_identity():
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES, size=(6, 8, 8, 8))
    reference = rng.integers(0, NUM_CLASSES, size=(6, 8, 8, 8))
    lam = rng.uniform(0.35, 0.65, size=6).astype(np.float32)
    mixed_map = mix(one_hot(target, NUM_CLASSES), one_hot(reference, NUM_CLASSES), lam)
    recovered = naive_unmix(mixed_map, one_hot(reference, NUM_CLASSES), lam)
    np.testing.assert_allclose(recovered, one_hot(target, NUM_CLASSES), atol=1e-5)
    assert np.array_equal(recovered.argmax(1), target)


def test_every_copy_has_its_own_lambda_and_reference_and_copies_are_shuffled():
    rng = np.random.default_rng(1)
    locations, tta, bank = 200, 8, 1000
    plan = plan_mixing([locations] * tta, bank, rng, (0.35, 0.65))
    assert len(plan) == locations * tta
    # each location appears exactly k times, once per copy
    counts = np.bincount(plan.location, minlength=locations)
    assert (counts == tta).all()
    for loc in range(0, locations, 17):
        rows = plan.location == loc
        assert sorted(plan.copy[rows]) == list(range(tta))
        assert len(set(np.round(plan.lam[rows], 6))) == tta  # independent λ per copy
        assert len(set(plan.reference_index[rows])) >= tta - 2  # independent references (collisions rare)
    assert plan.lam.min() >= 0.35 and plan.lam.max() <= 0.65
    # λ and reference are independent of the location and of each other
    assert abs(np.corrcoef(plan.lam, plan.location)[0, 1]) < 0.1
    assert abs(np.corrcoef(plan.lam, plan.reference_index)[0, 1]) < 0.1
    # shuffled: consecutive rows seldom come from the same location (unshuffled would be 7/8 of them)
    assert np.mean(plan.location[1:] == plan.location[:-1]) < 0.05


def test_copies_on_shifted_grids_keep_their_own_patch_counts():
    plan = plan_mixing([3, 5, 4], 100, np.random.default_rng(5))
    assert len(plan) == 12
    for copy, count in enumerate((3, 5, 4)):
        assert sorted(plan.location[plan.copy == copy]) == list(range(count))


def test_flips_apply_per_row_and_are_involutions():
    rng = np.random.default_rng(2)
    patches = rng.random((5, 4, 5, 6)).astype(np.float32)
    flips = rng.random((5, 3)) < 0.5
    flipped = flip_patches(patches, flips)
    assert np.array_equal(flip_patches(flipped, flips), patches)
    flips[0] = [True, False, True]
    assert np.array_equal(flip_patches(patches, flips)[0], patches[0][::-1, :, ::-1])


def test_patch_grid_covers_every_voxel_of_the_box_and_stitches_back_exactly():
    rng = np.random.default_rng(3)
    volume = rng.random((37, 41, 29)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[3:35, 5:40, 2:27] = True
    box = brain_bounding_box(mask, margin=0)
    grid = PatchGrid.over_box(volume.shape, box, (16, 16, 16))
    coverage = grid.coverage()
    assert (coverage[3:35, 5:40, 2:27] >= 1).all()
    stitched = grid.stitch(grid.extract(volume)[:, None], background=np.zeros(1, np.float32))[0]
    covered = coverage > 0
    np.testing.assert_allclose(stitched[covered], volume[covered], rtol=1e-6)
    assert (stitched[~covered] == 0).all()


def test_every_tta_copy_grid_covers_the_whole_brain_and_shifts_the_patch_borders():
    from medprivacy.mixup.model_space import TTA_GRID_SHIFTS, analysis_mask, copy_grid, patch_grid

    mask = analysis_mask()
    patch = (48, 48, 48)
    assert copy_grid(patch, 0) == patch_grid(patch)
    grids = [copy_grid(patch, c) for c in range(len(TTA_GRID_SHIFTS))]
    for grid in grids:
        assert (grid.coverage()[mask] >= 1).all()
        # no patch is wasted on voxels that are never kept
        assert all(mask[grid.slices(i)].any() for i in range(len(grid)))
    starts = [set(grid.starts) for grid in grids]
    assert all(a != b for i, a in enumerate(starts) for b in starts[i + 1 :])

    # Context: with the first eight copies, every brain voxel away from the volume's edge lies at least a quarter
    # patch inside some patch (along all three axes at once); copy 0 alone leaves voxels on its patch borders.
    def depth(grids_used):
        best = np.zeros(mask.shape, np.int16)
        index = np.arange(patch[0])
        inside = np.minimum(index, patch[0] - 1 - index)
        patch_depth = np.minimum(
            np.minimum(inside[:, None, None], inside[None, :, None]), inside[None, None, :]
        ).astype(np.int16)
        for grid in grids_used:
            for i in range(len(grid)):
                region = grid.slices(i)
                best[region] = np.maximum(best[region], patch_depth)
        return best

    away_from_edge = np.zeros(mask.shape, bool)
    away_from_edge[12:-12, 12:-12, 12:-12] = True
    wanted = mask & away_from_edge
    assert depth(grids[:1])[wanted].min() == 0
    assert depth(grids[:8])[wanted].min() >= patch[0] // 4 - 1
    assert copy_grid(patch, len(TTA_GRID_SHIFTS)) == grids[0]


def test_weighted_accumulation_averages_overlapping_patches_towards_their_centres():
    from medprivacy.mixup.patches import ScoreAccumulator, importance_weights

    weights = importance_weights((8, 8, 8))
    assert weights.max() == 1.0 and weights.min() > 0 and weights[4, 4, 4] > weights[0, 4, 4]
    shape = (8, 8, 16)
    first = PatchGrid(shape, (8, 8, 8), ((0, 0, 0),))
    second = PatchGrid(shape, (8, 8, 8), ((0, 0, 4),))
    acc = ScoreAccumulator(2, shape, (8, 8, 8))
    acc.add(first, 0, np.stack([np.full((8, 8, 8), 0.2), np.full((8, 8, 8), 0.8)]).astype(np.float32))
    acc.add(second, 0, np.stack([np.full((8, 8, 8), 0.6), np.full((8, 8, 8), 0.4)]).astype(np.float32))
    scores = acc.result(background=np.array([1.0, 0.0]))
    np.testing.assert_allclose(scores[:, 3, 3, 2], [0.2, 0.8], rtol=1e-6)  # first patch only
    np.testing.assert_allclose(scores[:, 3, 3, 10], [0.6, 0.4], rtol=1e-6)  # second patch only
    w1, w2 = weights[3, 3, 7], weights[3, 3, 3]  # voxel x=7: near the first patch's border, the second's centre
    np.testing.assert_allclose(scores[0, 3, 3, 7], (0.2 * w1 + 0.6 * w2) / (w1 + w2), rtol=1e-5)
    np.testing.assert_allclose(scores.sum(0)[:, :, :12], 1.0, rtol=1e-5)  # still probabilities
    np.testing.assert_allclose(scores[:, 3, 3, 13], [1.0, 0.0])  # covered by nothing: background


def test_copies_mixed_with_more_of_the_target_count_more_in_the_average():
    from medprivacy.mixup.mixing import COPY_WEIGHT_POWER, copy_weights, naive_unmix
    from medprivacy.mixup.patches import ScoreAccumulator

    lam = np.array([0.35, 0.65], np.float32)
    weights = copy_weights(lam)
    np.testing.assert_allclose(weights, lam**COPY_WEIGHT_POWER)
    assert COPY_WEIGHT_POWER >= 2  # at least the inverse variance: eq. 4 divides the server's error by λ
    # the same server error becomes a larger unmixing error at small λ
    truth = np.zeros((2, 2, 1, 1, 1), np.float32)
    truth[:, 1] = 1.0
    reference = np.zeros_like(truth)
    reference[:, 0] = 1.0
    exact = lam.reshape(-1, 1, 1, 1, 1) * truth + (1 - lam.reshape(-1, 1, 1, 1, 1)) * reference
    error = np.float32(0.05) * np.array([1, -1], np.float32).reshape(1, 2, 1, 1, 1)
    errors = np.abs(naive_unmix(exact + error, reference, lam) - truth)[:, 0, 0, 0, 0]
    assert errors[0] > 1.8 * errors[1]

    shape = (4, 4, 4)
    grid = PatchGrid(shape, (4, 4, 4), ((0, 0, 0),))
    acc = ScoreAccumulator(2, shape, (4, 4, 4))
    acc.add(grid, 0, np.stack([np.zeros(shape), np.ones(shape)]).astype(np.float32), weights[0])
    acc.add(grid, 0, np.stack([np.ones(shape), np.zeros(shape)]).astype(np.float32), weights[1])
    scores = acc.result(background=np.array([1.0, 0.0]))
    np.testing.assert_allclose(scores[0], weights[1] / weights.sum(), rtol=1e-5)


def test_patch_larger_than_volume_is_refused():
    with pytest.raises(ValueError, match="larger than the volume"):
        PatchGrid.over_box((10, 10, 10), ((0, 10),) * 3, (16, 16, 16))


def test_normalisation_is_robust_and_rejects_empty_images():
    from medprivacy.mixup.intensity import normalize_intensity

    rng = np.random.default_rng(4)
    volume = rng.uniform(100, 900, size=(20, 20, 20)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # one hot voxel must not squash the others
    mask = np.ones_like(volume, bool)
    out = normalize_intensity(volume, mask)
    assert out.max() == 1.0 and np.median(out) > 0.4
    with pytest.raises(ValueError):
        normalize_intensity(np.zeros_like(volume), mask)


def test_keygen_creates_a_private_bank_and_load_refuses_a_shared_folder(tmp_path):
    from medprivacy.mixup.bank import BANK_FILE, META_FILE, ReferenceBank, generate_bank

    key_dir = tmp_path / "key"
    bank = generate_bank(key_dir, subjects=1, patches=12, patch_size=(16, 16, 16), deformation=0.3)
    assert len(bank) == 12 and bank.patch_size == (16, 16, 16)
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for name in (BANK_FILE, META_FILE):
        assert stat.S_IMODE((key_dir / name).stat().st_mode) == 0o600
    # reference patches are mostly brain: an empty reference would upload the patient's own pixels
    assert ((bank.labels > 0).mean(axis=(1, 2, 3)) >= 0.85).all()
    loaded = ReferenceBank.load(key_dir)
    np.testing.assert_array_equal(loaded.labels, bank.labels)
    import json

    assert not any(
        "seed" in key for key in json.loads((key_dir / META_FILE).read_text(encoding="utf-8"))
    )  # seeds are never stored
    with pytest.raises(InputError, match="already exists"):
        generate_bank(key_dir, subjects=1, patches=4, patch_size=(16, 16, 16))
    os.chmod(key_dir, 0o755)
    with pytest.raises(InputError, match="chmod 700"):
        ReferenceBank.load(key_dir)
    with pytest.raises(InputError, match="keygen"):
        ReferenceBank.load(tmp_path / "nowhere")


def test_two_keygens_differ(tmp_path):
    from medprivacy.mixup.bank import generate_bank

    a = generate_bank(tmp_path / "a", subjects=1, patches=4, patch_size=(16, 16, 16), deformation=0.3)
    b = generate_bank(tmp_path / "b", subjects=1, patches=4, patch_size=(16, 16, 16), deformation=0.3)
    assert not np.array_equal(a.images, b.images)


def test_read_image_names_the_problem(tmp_path):
    from medprivacy.mixup.io import read_image

    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="is damaged .*gzip"):
        read_image(corrupt)
    corrupt = tmp_path / "corrupt.nrrd"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read"):
        read_image(corrupt)
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkFloat32) + 1, str(flat))
    with pytest.raises(InputError, match="2D"):
        read_image(flat)
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, 32, sitk.sitkInt16), str(empty))
    with pytest.raises(InputError, match="empty"):
        read_image(empty)
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3), str(rgb))
    with pytest.raises(InputError, match="components"):
        read_image(rgb)
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)


def test_dicom_series_folder_is_read_as_a_volume(tmp_path):
    from medprivacy.mixup.io import read_image

    volume = sitk.GetImageFromArray((np.arange(8 * 20 * 24).reshape(8, 20, 24) % 251).astype(np.int16))
    volume.SetSpacing((0.9, 0.9, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_k = volume[:, :, k]
        slice_k.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # series instance UID
        slice_k.SetMetaData("0020|0032", "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_k.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_k.SetMetaData("0020|0013", str(k))
        slice_k.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    image = read_image(tmp_path)
    assert image.GetSize() == (24, 20, 8)
    assert image.GetSpacing()[2] == pytest.approx(2.0, abs=1e-3)


def test_labelmap_writers_are_atomic_and_seg_nrrd_names_segments(tmp_path):
    from medprivacy.mixup.io import write_labelmap

    labels = sitk.GetImageFromArray(np.random.default_rng(5).integers(0, 4, size=(10, 11, 12)).astype(np.uint8))
    labels.SetSpacing((1.0, 1.2, 1.5))
    write_labelmap(labels, tmp_path / "a.nii.gz")
    write_labelmap(labels, tmp_path / "a.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "a.seg.nrrd"]  # no temp leftovers
    seg = sitk.ReadImage(str(tmp_path / "a.seg.nrrd"))
    assert seg.GetMetaData("Segment1_Name") == "Gray matter"
    assert seg.GetMetaData("Segment1_LabelValue") == "2"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(labels))
    with pytest.raises(InputError, match="unsupported output"):
        write_labelmap(labels, tmp_path / "a.png")
    with pytest.raises(InputError, match="does not exist"):
        write_labelmap(labels, tmp_path / "missing" / "a.nii.gz")


def test_image_already_on_the_model_grid_is_not_registered():
    from medprivacy.data.template import load_template
    from medprivacy.mixup.geometry import to_model_grid

    template = load_template().image
    resampled, transform = to_model_grid(template)
    assert transform is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(template))


def test_registration_recovers_a_moved_head_and_the_round_trip_keeps_labels(sample_brain):
    """The sample is the template moved by up to 10° / 12 mm in an oblique 1×1×1.3 mm grid."""
    from medprivacy.data.template import load_template, tissue_labels
    from medprivacy.mixup.evaluate import dice_per_class
    from medprivacy.mixup.geometry import probabilities_to_input_grid, to_model_grid

    image, labels = sample_brain.image, sample_brain.labels
    _, transform = to_model_grid(image)
    model_labels = sitk.GetArrayFromImage(
        to_model_grid(labels, transform=transform, interpolator=sitk.sitkNearestNeighbor)[0]
    )
    template = load_template()
    template_labels = tissue_labels((template.brain_mask).astype(np.float32), template.gm, template.wm)
    aligned = dice_per_class(model_labels, template_labels)
    # without registration the subject overlaps the template far less (head motion + its own anatomy)
    assert aligned["Gray matter"] > 0.65 and aligned["White matter"] > 0.65
    one_hot_scores = np.stack([(model_labels == c).astype(np.float32) for c in range(NUM_CLASSES)])
    back = probabilities_to_input_grid(one_hot_scores, transform, image)
    round_trip = dice_per_class(back, sitk.GetArrayFromImage(labels))
    assert round_trip["mean"] > 0.93


def test_training_can_draw_references_the_way_keygen_does():
    """With oversampling, training mixes with the most textured of N draws, the patches a keygen bank holds."""
    from medprivacy.mixup.sampling import keep_most_textured
    from medprivacy.mixup.train import PatchSampler

    rng = np.random.default_rng(3)
    images = np.stack([rng.normal(0, s, (4, 4, 4)) for s in (0.1, 3.0, 0.5, 2.0)]).astype(np.float32)
    labels = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 4), np.uint8)
    kept_images, kept_labels = keep_most_textured(images, labels, 2)
    assert sorted(kept_labels[:, 0, 0, 0].tolist()) == [1, 3]  # the two widest spreads, each with its own labels
    assert np.array_equal(kept_images[kept_labels[:, 0, 0, 0] == 1][0], images[1])

    volume = np.zeros((48, 48, 48), np.float32)
    volume[8:40, 8:40, 8:40] = rng.random((32, 32, 32)) * np.linspace(0, 1, 32)[:, None, None]
    brain = np.zeros(volume.shape, np.uint8)
    brain[8:40, 8:40, 8:40] = 2
    uniform = PatchSampler([(volume, brain)], 8, np.random.default_rng(0)).references(200)[0]
    textured = PatchSampler([(volume, brain)], 8, np.random.default_rng(0), reference_oversampling=4).references(200)[0]
    spread = lambda patches: np.median(patches.reshape(len(patches), -1).std(axis=1))  # noqa: E731
    assert spread(textured) > 1.2 * spread(uniform)


def test_train_smoke_run_writes_loadable_models_and_manifest(tmp_path):
    """A few steps of the real training command on tiny data; CI never retrains the shipped models."""
    out = tmp_path / "models"
    env = dict(os.environ, MEDPRIVACY_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "train",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--threads",
            "1",
            "--quiet",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from medprivacy.nets import load_manifest, load_model

    manifest = load_manifest(out)
    assert set(manifest["models"]) == {"mixup-seg", "mixup-unmix", "plain-seg"}
    assert manifest["training"]["command"].startswith("medprivacy mixup train --preset smoke")
    assert "baseline_mean" in manifest["training"]["validation_patch_metrics"]
    unmix, spec = load_model("mixup-unmix", out)
    assert spec.extra["paired_with"]["mixup-seg"] == manifest["models"]["mixup-seg"]["sha256"]

    # a second stage continues from those weights and keeps the chain of commands in the manifest
    stage2 = tmp_path / "stage2"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "train",
            "--preset",
            "smoke",
            "--init-from",
            str(out),
            "--out",
            str(stage2),
            "--threads",
            "1",
            "--reference-oversampling",
            "4",
            "--iterations",
            "4",
            "--stop-after",
            "2",
            "--quiet",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_manifest(stage2)["training"]["config"]["reference_oversampling"] == 4
    # --stop-after ends early on the longer schedule, as a stage that was cut short did
    assert load_manifest(stage2)["training"]["iterations_done"] == 2
    assert load_manifest(stage2)["training"]["config"]["iterations"] == 4
    chain = load_manifest(stage2)["training"]["continued_from"]
    assert chain["command"] == manifest["training"]["command"]
    assert chain["weights_sha256"]["mixup-seg"] == manifest["models"]["mixup-seg"]["sha256"]
    # calibration fits decision weights for both paths on validation subjects, leaving the weights untouched
    weights_before = {name: entry["sha256"] for name, entry in load_manifest(stage2)["models"].items()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "calibrate",
            "--models",
            str(stage2),
            "--subjects",
            "1",
            "--tta",
            "2",
            "--reference-subjects",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    calibrated = load_manifest(stage2)
    assert {name: entry["sha256"] for name, entry in calibrated["models"].items()} == weights_before
    for name in ("plain-seg", "mixup-unmix"):
        factors = calibrated["models"][name]["decision_weights"]
        assert len(factors) == 4 and factors[0] == 1.0
        record = calibrated["training"]["calibration"][name]
        assert record["decision_weights"] == factors and record["dice_after"] >= record["dice_before"]
    assert calibrated["training"]["calibration"]["command"].startswith("medprivacy mixup calibrate --models")
    assert (
        load_model("mixup-unmix", stage2)[1].extra["decision_weights"]
        == calibrated["models"]["mixup-unmix"]["decision_weights"]
    )

    # a tampered weight file is refused, not silently used
    (out / "plain_seg.safetensors").write_bytes((out / "plain_seg.safetensors").read_bytes()[:-8] + b"\0" * 8)
    from medprivacy.errors import VersionMismatchError

    with pytest.raises(VersionMismatchError, match="do not match the manifest"):
        load_model("plain-seg", out)


def test_train_accepts_an_nnunet_msd_dataset_folder(tmp_path):
    """imagesTr/ + labelsTr/ + dataset.json, as a researcher would point --dataset at their own data."""
    import json

    from medprivacy.data.synth import synthesize_subject
    from medprivacy.data.template import load_template

    root = tmp_path / "Dataset001_Brain"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for case in range(2):
        subject = synthesize_subject(990_000 + case, deformation=0.3)
        for array, folder, suffix in ((subject.image, "imagesTr", "_0000"), (subject.labels, "labelsTr", "")):
            image = sitk.GetImageFromArray(array)
            image.CopyInformation(load_template().image)
            sitk.WriteImage(image, str(root / folder / f"brain_{case:03d}{suffix}.nii.gz"))
        training.append(
            {"image": f"./imagesTr/brain_{case:03d}_0000.nii.gz", "label": f"./labelsTr/brain_{case:03d}.nii.gz"}
        )
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}, "training": training})
    )
    out = tmp_path / "models"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "train",
            "--preset",
            "smoke",
            "--dataset",
            str(root),
            "--out",
            str(out),
            "--threads",
            "1",
            "--quiet",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from medprivacy.nets import load_manifest

    assert "user dataset" in load_manifest(out)["training"]["data"]

    (root / "dataset.json").unlink()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "train",
            "--preset",
            "smoke",
            "--dataset",
            str(root),
            "--out",
            str(out),
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=600,
    )
    assert result.returncode == 2 and "dataset.json" in result.stderr


def test_the_papers_unet_plus_plus_is_selectable():
    import torch

    from medprivacy.mixup.train import TrainConfig
    from medprivacy.nets import build_network

    config = TrainConfig.preset("gpu-paper")
    assert config.arch == "unetplusplus"
    arch = dict(config.segmentation_arch(), features=[4, 4, 8, 8, 16, 4])  # same network family, tiny for CPU
    net = build_network(arch)
    assert type(net.inner).__name__ == "BasicUNetPlusPlus"
    assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


def test_outputs_follow_the_umask_not_mkstemps_0600(tmp_path):
    from medprivacy.mixup.io import write_labelmap

    old = os.umask(0o022)
    try:
        write_labelmap(sitk.Image(8, 8, 8, sitk.sitkUInt8), tmp_path / "labels.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "labels.nii.gz").stat().st_mode) == 0o644


def test_decision_weights_recover_a_class_that_averaging_suppressed():
    from medprivacy.mixup.calibrate import fit_decision_weights

    rng = np.random.default_rng(7)
    truth = rng.integers(0, NUM_CLASSES, size=20_000)
    scores = np.full((NUM_CLASSES, truth.size), 0.1, np.float32)
    scores[truth, np.arange(truth.size)] = 0.7
    # where the truth is class 1 its score lost to background: 0.35 background, 0.3 class 1
    ones = truth == 1
    scores[:, ones] = np.array([0.35, 0.3, 0.2, 0.15], np.float32)[:, None]
    factors, before, after = fit_decision_weights(
        [scores[:, :10_000], scores[:, 10_000:]], [truth[:10_000], truth[10_000:]]
    )
    assert factors[0] == 1.0 and 0.35 / 0.3 < factors[1] < 0.7 / 0.1
    assert before < 0.8 and after == pytest.approx(1.0)


def test_finish_labelmap_applies_decision_weights_inside_the_brain_only():
    from medprivacy.data.template import load_template
    from medprivacy.mixup.model_space import analysis_mask
    from medprivacy.mixup.pipeline import finish_labelmap, prepare_scan

    prepared = prepare_scan(load_template().image, (48, 48, 48))  # on the model grid: no registration
    scores = np.empty((NUM_CLASSES,) + prepared.volume.shape, np.float32)
    scores[:] = np.array([0.3, 0.25, 0.25, 0.2], np.float32).reshape(-1, 1, 1, 1)
    mask = analysis_mask()
    plain = sitk.GetArrayFromImage(finish_labelmap(prepared, scores))
    assert (plain == 0).all()
    weighted = sitk.GetArrayFromImage(finish_labelmap(prepared, scores, [1.0, 1.5, 1.0, 1.0]))
    assert (weighted[mask] == 1).all() and (weighted[~mask] == 0).all()


def test_decision_weights_fitted_on_the_scan_grid_label_it_as_the_labelmap_does():
    """Calibration fits factors on scores resampled to the scan's grid; scaling them there must give exactly the
    labels that finish_labelmap writes (linear resampling commutes with per-class factors)."""
    from medprivacy.data.template import load_template
    from medprivacy.mixup.geometry import scores_to_input_grid
    from medprivacy.mixup.pipeline import background_outside_analysis, finish_labelmap, prepare_scan

    template = load_template().image
    scan = sitk.Image([96, 110, 80], sitk.sitkFloat32)  # a coarser, anisotropic grid over the same head
    scan.SetSpacing((2.0, 2.0, 2.4))
    scan.SetOrigin(template.GetOrigin())
    scan.SetDirection(template.GetDirection())
    shift = sitk.TranslationTransform(3, (3.0, -2.0, 4.0))  # model grid → scan, as registration returns
    prepared = prepare_scan(template, (48, 48, 48))
    prepared.image, prepared.transform = scan, shift
    rng = np.random.default_rng(3)
    coarse_shape = tuple(-(-n // 16) for n in prepared.volume.shape)
    coarse = rng.uniform(0.1, 1.0, size=(NUM_CLASSES,) + coarse_shape).astype(np.float32)
    scores = np.stack([sitk.GetArrayFromImage(sitk.Expand(sitk.GetImageFromArray(c), (16, 16, 16))) for c in coarse])
    scores = scores[:, : prepared.volume.shape[0], : prepared.volume.shape[1], : prepared.volume.shape[2]]
    factors = np.array([1.0, 0.65, 1.4, 0.8], np.float32)
    on_scan = scores_to_input_grid(background_outside_analysis(scores), shift, scan)
    assert on_scan.shape == (NUM_CLASSES,) + sitk.GetArrayFromImage(scan).shape
    labels = sitk.GetArrayFromImage(finish_labelmap(prepared, scores, factors))
    fitted = np.argmax(on_scan * factors.reshape(-1, 1, 1, 1), axis=0)
    assert (labels == fitted).mean() > 0.999  # ties aside
    assert len(np.unique(labels)) == NUM_CLASSES
