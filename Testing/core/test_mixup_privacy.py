"""Defences of the private path against a curious server (privacy.py) and the audit that measures them (audit/)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medprivacy.mixup.mixing import ORIENTATIONS, orient, plan_mixing, unorient
from medprivacy.mixup.patches import PatchGrid, ScoreAccumulator
from medprivacy.mixup.privacy import LEVELS, privacy_settings


def test_the_48_cube_orientations_are_distinct_invertible_and_nested():
    probe = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    turned = [orient(probe, code) for code in range(len(ORIENTATIONS))]
    assert len({t.tobytes() for t in turned}) == 48
    for code, t in enumerate(turned):
        np.testing.assert_array_equal(unorient(t, code), probe)
    # the first 8 codes are the flips (a subgroup: composing two of them stays inside), code 0 the identity
    np.testing.assert_array_equal(turned[0], probe)
    flips = {t.tobytes() for t in turned[:8]}
    assert all(orient(orient(probe, a), b).tobytes() in flips for a in range(8) for b in range(8))
    # channels in front are carried along: (C, D, H, W) turns like (D, H, W)
    stacked = np.stack([probe, probe + 1])
    np.testing.assert_array_equal(orient(stacked, 29)[1], orient(probe + 1, 29))


def test_a_plan_draws_orientations_from_the_requested_group_and_adds_decoys():
    plan = plan_mixing(
        [40, 50], 100, np.random.default_rng(0), target_orientations=48, reference_orientations=48, decoys=30
    )
    assert len(plan) == 120 and plan.is_decoy.sum() == 30
    assert (plan.location[plan.is_decoy] == -1).all()
    assert len(set(plan.target_orientation.tolist())) > 30 and plan.target_orientation.max() < 48
    paper = plan_mixing([40], 100, np.random.default_rng(0))
    assert (paper.target_orientation == 0).all() and paper.reference_orientation.max() < 8
    with pytest.raises(ValueError):
        plan_mixing([4], 10, np.random.default_rng(0), target_orientations=6)


def test_lattice_patches_reach_past_the_edge_and_stitch_and_accumulate_exactly():
    rng = np.random.default_rng(1)
    volume = rng.random((30, 33, 28)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[0:25, 4:33, 3:20] = True  # touches the low z and high y edges, as the brain region does
    grid = PatchGrid.lattice(volume.shape, ((0, 25), (4, 33), (3, 20)), (8, 8, 8), (5, 2, 7), mask)
    assert min(s[0] for s in grid.starts) < 0 and max(s[1] + 8 for s in grid.starts) > 33
    coverage = grid.coverage()
    assert (coverage[mask] == 1).all()  # one lattice: every region voxel exactly once
    patches = grid.extract(volume)
    region, part = grid.clipped(0)
    assert (patches[0][tuple(part)] == volume[tuple(region)]).all()
    outside = np.ones(patches[0].shape, bool)
    outside[tuple(part)] = False
    assert (patches[0][outside] == 0).all()
    stitched = grid.stitch(patches[:, None], background=np.zeros(1, np.float32))[0]
    np.testing.assert_array_equal(stitched[coverage > 0], volume[coverage > 0])
    accumulator = ScoreAccumulator(1, volume.shape, (8, 8, 8))
    for i in range(len(grid)):
        accumulator.add(grid, i, patches[i][None])
    np.testing.assert_allclose(accumulator.result(np.zeros(1))[0][mask], volume[mask], rtol=1e-6)


def test_secret_grids_differ_per_copy_and_per_scan_and_no_two_uploads_cover_the_same_voxels():
    from medprivacy.mixup.model_space import analysis_mask, copy_grid, secret_copy_grids

    mask = analysis_mask()
    patch = (48, 48, 48)
    first = secret_copy_grids(mask, patch, 16, np.random.default_rng(1))
    second = secret_copy_grids(mask, patch, 16, np.random.default_rng(2))
    offsets = lambda grids: {tuple(np.mod(g.starts[0], 48)) for g in grids}  # noqa: E731
    assert len(offsets(first)) == 16 and offsets(first) != offsets(second)
    regions = [s for g in first for s in g.starts]
    assert len(regions) == len(set(regions)), "two uploads cover exactly the same voxels"
    for grid in first[:3]:
        assert (grid.coverage()[mask] == 1).all()
    # The paper level's public grids move edge patches back inside, so copies repeat regions there.
    public = [s for c in range(16) for s in copy_grid(patch, c).starts]
    assert len(public) > len(set(public))


def _model_grid_scan(seed: int = 800_150):
    from medprivacy.data.template import load_template
    from medprivacy.mixup.pipeline import prepare_scan
    from medprivacy.mixup.train import synthetic_subject_normalized

    image = sitk.GetImageFromArray(synthetic_subject_normalized(seed)[0].astype(np.float32))
    image.CopyInformation(load_template().image)
    return prepare_scan(image, (48, 48, 48))


@pytest.fixture(scope="module")
def model_grid_scan():
    return _model_grid_scan()


@pytest.fixture(scope="module")
def bank48(tmp_path_factory):
    from medprivacy.mixup.bank import generate_bank

    return generate_bank(tmp_path_factory.mktemp("key48") / "key", subjects=1, patches=64, patch_size=(48, 48, 48))


def test_the_fill_removes_the_empty_background_signature(model_grid_scan, bank48):
    from medprivacy.mixup.pipeline import make_uploads, plan_session

    edge_zeros = {}
    for level in ("paper", "standard"):
        session = plan_session(model_grid_scan, bank48, privacy_settings(level, 2), np.random.default_rng(3))
        _, _, parts, scan_voxels = make_uploads(session, bank48, slice(None))
        rows = [
            n
            for n, (c, i) in enumerate(zip(session.plan.copy, session.plan.location))
            if not session.grids[c].extract_one(session.mask, i, fill=False).all()
        ]
        edge_zeros[level] = float(np.mean([np.mean(parts[n] == 0) for n in rows]))
        if level == "standard":  # where the scan had no signal, the upload carries reference texture
            assert not scan_voxels[rows].all() and (parts[rows][~scan_voxels[rows]] != 0).mean() > 0.8
    bank_zeros = float(np.mean(bank48.images == 0))  # references are mostly brain, with some background of their own
    assert edge_zeros["paper"] > 0.2  # the analysis region's outline shows in every edge upload
    assert edge_zeros["standard"] < bank_zeros + 0.02 < edge_zeros["paper"]


def test_secret_deformation_is_undone_on_the_answers_and_hides_the_shape():
    from medprivacy.data.template import load_template
    from medprivacy.mixup.audit.rebuild import pearson
    from medprivacy.mixup.mixing import one_hot
    from medprivacy.mixup.model_space import analysis_mask
    from medprivacy.mixup.train import synthetic_subject_normalized
    from medprivacy.mixup.warp import secret_warp

    reference = load_template().image
    image, labels = synthetic_subject_normalized(800_150)
    mask = analysis_mask()
    warp = secret_warp(reference, LEVELS["strong"].scan_warp, np.random.default_rng(0), mask)
    warped = warp.warp_volume(image, reference)
    assert pearson(warped, image, mask) < 0.9  # the server's scan is another shape
    scores = np.stack([warp.warp_volume(c, reference) for c in one_hot(labels[None], 4)[0]])
    back = warp.unwarp_scores(scores, reference, np.array([1, 0, 0, 0], np.float32)).argmax(0)
    for tissue in (2, 3):
        dice = 2 * np.sum((back == tissue) & (labels == tissue)) / (np.sum(back == tissue) + np.sum(labels == tissue))
        assert dice > 0.95, (tissue, dice)
    again = secret_warp(reference, LEVELS["strong"].scan_warp, np.random.default_rng(0), mask).warp_volume(
        image, reference
    )
    np.testing.assert_array_equal(again, warped)


def test_training_draws_targets_as_the_private_levels_cut_them():
    from medprivacy.mixup.model_space import analysis_mask
    from medprivacy.mixup.train import PatchSampler, synthetic_subject_normalized

    subjects = [synthetic_subject_normalized(800_150)]
    sampler = PatchSampler(
        subjects, 48, np.random.default_rng(0), sampling="private", fill_probability=1.0, warp_rms=3.0
    )
    images, labels = sampler.targets(16)
    assert images.shape == (16, 48, 48, 48) and labels.shape == images.shape
    assert np.mean(images == 0) < 0.05  # filled outside the brain region: no empty background
    box = PatchSampler(subjects, 48, np.random.default_rng(0))
    assert np.mean(box.targets(16)[0] == 0) > np.mean(images == 0)
    assert analysis_mask().any()


def _write_scan(path, volume):
    """``volume`` (on the model grid) as an image file with the template's geometry, as the audit CLI reads scans."""
    from medprivacy.data.template import load_template

    image = sitk.GetImageFromArray(volume)
    image.CopyInformation(load_template().image)
    sitk.WriteImage(image, str(path))
    return path


def test_placement_attack_finds_public_grid_uploads_and_not_secret_ones(model_grid_scan, bank48):
    """The audit's attacks work where the scheme leaks (the paper level's public grids) and fail where it does not."""
    from medprivacy.mixup.audit.attack import Attacker, audit_uploads
    from medprivacy.mixup.audit.capture import capture

    results = {}
    for level in ("paper", "standard"):
        settings = privacy_settings(level, 4)
        # a dozen keeps this test near a minute per level
        captured = capture(model_grid_scan, bank48, settings, np.random.default_rng(4)).sample(
            12, np.random.default_rng(0)
        )
        attacker = Attacker.for_settings(settings, lattice=captured.truth.lattice)
        report, volumes = audit_uploads(
            captured,
            model_grid_scan.volume,
            attacker,
            np.random.default_rng(0),
            pairing_queries=0,
            variants=("template",),
        )
        results[level] = report
        assert set(volumes) >= {"template only", "template", "strongest attack", "oracle"}
    paper = results["paper"]["attacks"]["template"]["placement"]["placed_exactly"]
    standard = results["standard"]["attacks"]["template"]["placement"]["placed_exactly"]
    assert paper >= 0.25, results[
        "paper"
    ]  # 4 of 12 when written: raw mixtures on a public lattice give themselves away
    assert standard <= 0.1 < paper, results["standard"]
    for report in results.values():
        for entry in (report["template_only"], report["attacks"]["template"], report["oracle_bound"]):
            assert -1 <= entry["r"] <= 1 and 0 < entry["ms_ssim"] <= 1 and entry["psnr_db"] > 0


def test_reidentification_map_and_chance():
    from medprivacy.mixup.audit.reid import chance_map, mean_average_precision

    identity = np.array([0, 0, 1, 1, 2, 2])
    perfect = (identity[:, None] == identity[None]).astype(float) + np.eye(6)
    assert mean_average_precision(perfect, identity) == 1.0
    assert chance_map(6) == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]))
    worst = -perfect
    assert mean_average_precision(worst, identity) == pytest.approx(0.2)


def _cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "medprivacy.cli", *map(str, args)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )


def test_audit_command_writes_the_report_and_the_picture(tmp_path, bank48, model_grid_scan):
    """`medprivacy mixup audit` for real: the uploads of a private run, the placement attack, pairing, and
    re-identification among 2 subjects scanned twice (each visit registered from its own scanner grid)."""
    scan = _write_scan(tmp_path / "scan.nii.gz", model_grid_scan.volume)
    out, png = tmp_path / "audit.json", tmp_path / "audit.png"
    # The paper level keeps this run short (one orientation to search, public grids); the placement test above covers
    # the 48-orientation search of the default level.
    done = _cli(
        "mixup",
        "audit",
        scan,
        "--key-dir",
        bank48.directory,
        "--privacy",
        "paper",
        "--tta",
        "2",
        "--reid-subjects",
        "2",
        "--pairing-queries",
        "1",
        "--attacks",
        "template",
        "--sample",
        "16",
        "--seed",
        "0",
        "--out",
        out,
        "--png",
        png,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["privacy"]["level"] == "paper"
    scan_report = report["scan"]
    assert scan_report["strongest"]["attack"] == "template"
    assert 0 <= scan_report["strongest"]["placed_exactly"] <= 1
    assert scan_report["pairing"]["queries"] == 1 and scan_report["uploads_attacked"] == 16 < scan_report["uploads"]
    # a sample's rebuild is projected to every upload at the placed share, and the strongest figure includes it
    projected = scan_report["projected_all_uploads"]
    assert (
        projected["placed_share"] == scan_report["strongest"]["placed_exactly"]
        and scan_report["strongest"]["r"] >= projected["r"]
    )
    reid = report["reidentification"]
    assert reid["scans"] == 4 and reid["chance"] == pytest.approx(np.mean([1, 1 / 2, 1 / 3]), abs=1e-3)
    assert reid["no_protection"]["correlation"] == 1.0  # plain scans of the same anatomy find each other
    assert set(report["verdict"]) >= {
        "rebuild r within template + 0.05",
        "placed exactly <= 10 %",
        "re-identification mAP <= 0.40",
    }
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    assert picture.ndim == 2 and picture.shape[1] > 3 * picture.shape[0] / 3
    assert "template only" in done.stdout and "re-identification" in done.stdout


def test_audit_of_a_servers_audit_folder_and_its_errors(tmp_path, bank48, model_grid_scan):
    from medprivacy.mixup.audit.capture import capture

    captured = capture(model_grid_scan, bank48, privacy_settings("standard", 1), np.random.default_rng(0))
    folder = tmp_path / "server-audit"
    folder.mkdir()
    codes = np.round(captured.uploads[:6] * 255).astype(np.uint8)[:, None]
    np.save(folder / "20261204T000000.000000Z-000001-mixup.npy", codes)
    scan = _write_scan(tmp_path / "scan.nii.gz", model_grid_scan.volume)
    out = tmp_path / "audit.json"
    done = _cli(
        "mixup",
        "audit",
        scan,
        "--uploads",
        folder,
        "--key-dir",
        bank48.directory,
        "--privacy",
        "standard",
        "--attacks",
        "template",
        "--out",
        out,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["scan"]["uploads"] == 6 and "placed_exactly" not in report["scan"]["strongest"]
    assert "reidentification" not in report  # no truth, no second scan: only what these uploads give
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli("mixup", "audit", scan, "--uploads", empty, "--key-dir", bank48.directory, "--out", tmp_path / "x.json")
    assert done.returncode != 0 and "--audit-dir" in done.stderr and "Traceback" not in done.stderr
