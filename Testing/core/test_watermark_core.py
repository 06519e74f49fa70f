"""MedLocker core: blending and exact removal, lesion boxes and placement, the evolution strategy, encrypted keys."""

from __future__ import annotations

import os
import stat
import sys
import warnings

import numpy as np
import pytest

from medprivacy.errors import InputError
from medprivacy.watermark.blending import (
    as_rgba,
    blend,
    blend_batch,
    default_logo,
    fit_logo,
    fitted_size,
    load_logo,
    logo_sha256,
    unit_view,
    watermark,
)
from medprivacy.watermark.boxes import Box, MaskParams, Placement, expand_box, lesion_boxes, merge_boxes
from medprivacy.watermark.keyfile import (
    WatermarkKey,
    generate_key_file,
    issue_user_key,
    load_key,
    save_key,
    unlock,
    unlock_approximate,
    verify,
)
from medprivacy.watermark.optimizer import ensemble_objective, optimize_watermark

#: Cheapest scrypt cost the key format accepts: these tests exercise the format, not the KDF's strength
#: (one test runs the default cost).
FAST_KDF = {"scrypt_log2_n": 10}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def logo() -> np.ndarray:
    return default_logo(96)


def random_image(kind: str, rng: np.random.Generator, shape=(90, 130)) -> np.ndarray:
    dtype = np.uint16 if kind == "gray16" else np.uint8
    full_shape = shape + (3,) if kind == "rgb" else shape
    return rng.integers(0, np.iinfo(dtype).max + 1, size=full_shape, dtype=dtype)


# --- blending ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gray8", "gray16", "rgb"])
@pytest.mark.parametrize("alpha", [100, 255])
def test_blend_then_unlock_is_bit_identical(kind, alpha, logo):
    rng = np.random.default_rng(hash((kind, alpha)) % 2**32)
    image = random_image(kind, rng)
    fitted = fit_logo(logo, image.shape)
    h, w = fitted.size
    max_x, max_y = image.shape[1] - w, image.shape[0] - h
    key = WatermarkKey()
    # corners touch the image border; one position in the middle
    for index, (x, y) in enumerate([(0, 0), (max_x, max_y), (0, max_y), (max_x, 0), (17, 9)]):
        protected = key.protect(f"img{index}", image, logo, alpha, x, y)
        assert protected.dtype == image.dtype and protected.shape == image.shape
        region = fitted.region(x, y)
        outside = np.ones(image.shape[:2], dtype=bool)
        outside[region] = False
        assert np.array_equal(protected[outside], image[outside])
        assert not np.array_equal(protected[region], image[region])
        restored = unlock(protected, key)
        assert restored.dtype == image.dtype and np.array_equal(restored, image)


def test_watermark_returns_the_exact_region_and_follows_the_blending_formula():
    image = np.full((40, 80), 100, dtype=np.uint8)
    opaque_white = np.full((10, 10), 255, dtype=np.uint8)  # grayscale logo: its luminance is its opacity
    out, region = watermark(image, opaque_white, alpha=102, x=30, y=5, sl=4)
    assert region == (slice(5, 15), slice(30, 40))  # eq. 2: min(80/40, 40/40) * 10 = 10 px
    changed = np.argwhere(out != image)
    assert changed.min(axis=0).tolist() == [5, 30] and changed.max(axis=0).tolist() == [14, 39]
    assert (out[region] == round(0.6 * 100 + 0.4 * 255)).all()  # a = 102/255 = 0.4

    deep = np.full((40, 80), 1000, dtype=np.uint16)
    out16, _ = watermark(deep, opaque_white, alpha=102, x=0, y=0)
    assert out16.dtype == np.uint16 and (out16[:10, :10] == round(0.6 * 1000 + 0.4 * 65535)).all()

    half = np.zeros((10, 10, 4), dtype=np.uint8)
    half[..., :3] = (255, 0, 0)
    half[:, :5, 3] = 255  # left half opaque red, right half fully transparent
    rgb = np.full((40, 80, 3), 50, dtype=np.uint8)
    out_rgb, region = watermark(rgb, half, alpha=255, x=2, y=3)
    assert (out_rgb[region][:, :5] == (255, 0, 0)).all()  # alpha 255 on an opaque pixel: the original is gone
    assert (out_rgb[region][:, 5:] == 50).all()


def test_a_narrow_intensity_window_paints_the_logo_on_the_image_scale(tmp_path):
    """A 12-bit image in uint16: the opaque white logo lands at the window's top, not at 65535; unlock stays exact
    and the key keeps the window for parameter-only removal."""
    image = np.random.default_rng(3).integers(0, 4096, (40, 40), dtype=np.uint16)
    white = np.full((8, 8, 4), 255, np.uint8)
    window = (0, 4095)
    out, region = watermark(image, white, alpha=255, x=5, y=6, sl=4, window=window)
    assert np.all(out[region] == 4095) and out.max() == 4095
    black = white.copy()
    black[..., :3] = 0
    dark, _ = watermark(image, black, alpha=255, x=5, y=6, sl=4, window=(1000, 3000))
    assert np.all(dark[region] == 1000)
    unit = unit_view(dark, (1000, 3000))
    assert unit.shape == (1, 40, 40) and unit.min() == 0.0 and unit.max() == 1.0 and np.all(unit[0][region] == 0.0)
    key = WatermarkKey()
    protected = key.protect("ct", image, white, 180, 5, 6, window=window)
    np.testing.assert_array_equal(unlock(protected, key), image)
    save_key(key, tmp_path / "k.mlk", passphrase="pw", **FAST_KDF)
    entry = load_key(tmp_path / "k.mlk", passphrase="pw")["ct"]
    assert entry.window == window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        approx, _ = unlock_approximate(protected, load_key(tmp_path / "k.mlk", passphrase="pw"))
    assert np.abs(approx.astype(int) - image.astype(int)).max() <= 2  # alpha 180: eq. 9 recovers the scale
    for bad in ((10, 10), (0, 70000), (-1, 5), "wide"):
        with pytest.raises(InputError, match="window"):
            watermark(image, white, alpha=200, x=0, y=0, window=bad)


def test_logo_size_follows_eq2():
    assert fitted_size((512, 512), (256, 256), 4) == (128, 128)
    assert fitted_size((300, 600), (256, 256), 4) == (75, 75)  # limited by the short side
    assert fitted_size((400, 400), (100, 200), 4) == (50, 100)  # aspect ratio kept
    assert fitted_size((224, 224), (96, 96), 2) == (112, 112)


def test_blend_batch_renders_each_candidate(logo):
    rng = np.random.default_rng(3)
    image = random_image("rgb", rng, (64, 64))
    fitted = fit_logo(logo, image.shape)
    params = np.array([[100.0, 0, 0], [255.0, 48, 48], [180.5, 10, 30]])
    batch = blend_batch(image, fitted, params)
    assert batch.shape == (3,) + image.shape and batch.dtype == image.dtype
    for rendered, (alpha, x, y) in zip(batch, params):
        assert np.array_equal(rendered, blend(image, fitted, alpha, int(x), int(y)))


def test_default_logo_is_a_grey_lock_on_an_opaque_dark_plate_and_png_logos_load(tmp_path):
    import SimpleITK as sitk

    lock = default_logo(128)
    assert lock.shape == (128, 128, 4) and lock.dtype == np.uint8
    opacity = lock[..., 3]
    assert (opacity == 255).mean() > 0.95 and opacity[0, 0] < 128  # opaque but for the rounded corners
    plate, shackle, inside_shackle, body, keyhole = (
        lock[64, 6, :3],
        lock[20, 64, :3],
        lock[45, 64, :3],
        lock[105, 50, :3],
        lock[81, 64, :3],
    )
    assert plate.max() < 30 and inside_shackle.max() < 30 and keyhole.max() < 30
    assert (
        90 < shackle.min() and 90 < body.min() and max(shackle.max(), body.max()) < 130
    )  # mid-grey glyph: readable on the plate, no bright mark
    assert logo_sha256(lock) == logo_sha256(default_logo(128))

    outline = default_logo(128, "outline")  # the white padlock the badge replaced, kept for the logo ablation
    assert 0.3 < (outline[..., 3] == 255).mean() < 0.8 and outline[45, 64, 3] == 0 and outline[105, 50, :3].min() > 200
    with pytest.raises(InputError, match="unknown logo style"):
        default_logo(128, "neon")

    path = tmp_path / "logo.png"
    sitk.WriteImage(sitk.GetImageFromArray(lock, isVector=True), str(path))
    assert np.array_equal(load_logo(path), lock)
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "gray.png"))
    loaded = load_logo(tmp_path / "gray.png")
    assert np.array_equal(loaded, np.repeat(gray[..., None], 4, axis=2))  # no alpha channel: luminance is the opacity
    assert np.array_equal(as_rgba(gray.astype(np.uint16) * 257), loaded)


# --- boxes and placement -----------------------------------------------------------------------------------------


def test_box_pipeline_merges_nearby_blobs_and_drops_specks():
    mask = np.zeros((200, 300), dtype=np.uint8)
    mask[40:60, 40:60] = 1
    mask[45:55, 64:80] = 1  # 4 px gap: joined by the dilation
    mask[150, 250] = 1  # speck
    mask[120:140, 150:170] = 1  # lone lesion
    params = MaskParams(kernel=3, iterations=2, min_area=100, gamma=0.5)  # grows 2 px each way (a 5 px square)
    boxes = lesion_boxes(mask, params)
    assert boxes == [Box(38, 38, 44, 24), Box(148, 118, 24, 24)]

    # boxes from separate regions that overlap by more than gamma merge, repeatedly until stable
    assert merge_boxes([Box(0, 0, 10, 10), Box(1, 0, 10, 10), Box(2, 1, 10, 10)], 0.5) == [Box(0, 0, 12, 11)]
    assert merge_boxes([Box(0, 0, 10, 10), Box(6, 0, 10, 10)], 0.5) == [Box(0, 0, 10, 10), Box(6, 0, 10, 10)]
    assert MaskParams.for_image((2848, 4288)) == MaskParams()


def test_boxes_expand_up_and_left_by_the_logo_size():
    assert expand_box(Box(50, 60, 20, 10), (15, 25)) == Box(25, 45, 45, 25)
    assert expand_box(Box(5, 8, 20, 10), (15, 25)) == Box(0, 0, 25, 18)  # clipped at the image's top-left


@pytest.mark.parametrize("mode", ["keep-out", "keep-in", "wap"])
def test_feasible_positions_respect_the_lesion_boxes(mode):
    mask = np.zeros((120, 160), dtype=bool)
    mask[30:50, 40:70] = True
    mask[80:100, 110:130] = True
    logo_size = (24, 32)
    params = MaskParams(kernel=1, iterations=0, min_area=0)
    placement = Placement.from_mask(mode, mask, logo_size, params)
    xs, ys = np.meshgrid(np.arange(placement.max_x + 1), np.arange(placement.max_y + 1))
    feasible = placement.feasible(xs, ys)
    # overlap computed on pixels: does the logo rectangle cover any lesion-box pixel?
    covers = np.array(
        [
            [mask_boxes_hit(placement.lesions, x, y, logo_size) for x in range(placement.max_x + 1)]
            for y in range(placement.max_y + 1)
        ]
    )
    if mode == "keep-out":
        assert not (feasible & covers).any() and feasible.any()
    elif mode == "keep-in":
        assert covers[feasible].mean() > 0.9 and not (covers & ~feasible).any()
    else:
        assert feasible.all()
    assert feasible.sum() == placement.count
    rng = np.random.default_rng(0)
    drawn = placement.sample(2000, rng)
    assert placement.feasible(drawn[:, 0], drawn[:, 1]).all()
    projected = placement.project(rng.uniform(-40, 200, size=(2000, 2)))
    assert placement.feasible(projected[:, 0], projected[:, 1]).all()
    inside = drawn[:5]
    assert np.array_equal(placement.project(inside), inside)  # feasible points stay where they are


def mask_boxes_hit(boxes, x, y, logo_size) -> bool:
    canvas = np.zeros((200, 200), dtype=bool)
    for b in boxes:
        canvas[b.y : b.y1, b.x : b.x1] = True
    return bool(canvas[y : y + logo_size[0], x : x + logo_size[1]].any())


def test_empty_mask_means_anywhere_for_keep_out_and_an_error_for_keep_in():
    empty = np.zeros((64, 64), dtype=np.uint8)
    assert Placement.from_mask("keep-out", empty, (16, 16)).count == 49 * 49
    with pytest.raises(InputError, match="no lesion found") as excinfo:
        Placement.from_mask("keep-in", empty, (16, 16))
    assert "keep-out" in one_line_error(excinfo)


# --- optimiser ---------------------------------------------------------------------------------------------------


def distance_score(target, placement, threshold=None, log=None):
    """Synthetic objective: distance to a hidden (alpha, x, y), alpha scaled to the position range."""
    alpha_scale = placement.max_x / 155.0

    def score(params):
        if log is not None:
            log.append(params.copy())
        d = np.sqrt(
            (params[:, 1] - target[1]) ** 2
            + (params[:, 2] - target[2]) ** 2
            + ((params[:, 0] - target[0]) * alpha_scale) ** 2
        )
        return d, (d < threshold) if threshold is not None else np.zeros(len(d), dtype=bool)

    return score


def test_optimizer_finds_a_hidden_optimum():
    placement = Placement("wap", (224, 224), (56, 56))
    target = (170.0, 123, 41)
    for seed in range(3):
        result = optimize_watermark(
            distance_score(target, placement), placement, generations=100, max_evaluations=2000, rng=seed
        )
        assert result.stop_reason == "budget" and result.evaluations == 2000 and not result.fooled
        assert abs(result.x - target[1]) <= 3 and abs(result.y - target[2]) <= 3 and abs(result.alpha - target[0]) <= 5
        best = [record.best_objective for record in result.history]
        assert best == sorted(best, reverse=True) and result.history[0].generation == 0


def test_optimizer_stops_as_soon_as_a_candidate_fools_every_model():
    placement = Placement("wap", (224, 224), (56, 56))
    log: list[np.ndarray] = []
    result = optimize_watermark(
        distance_score((170.0, 123, 41), placement, threshold=12.0, log=log), placement, generations=50, rng=1
    )
    assert result.fooled and result.stop_reason == "fooled" and result.objective < 12.0
    assert result.evaluations == sum(len(batch) for batch in log)
    assert result.evaluations < 50 + 50 * 4 * 50  # far from the full run
    assert any(np.array_equal(result.params, row) for row in log[-1])  # the fooling candidate is in the last batch
    assert result.history[-1].fooled
    # with the paper's defaults and no success: population + 3 generations of (3 hops + at most one child each)
    plain = optimize_watermark(distance_score((170.0, 123, 41), placement, threshold=0.0), placement, rng=1)
    assert plain.stop_reason == "generations" and not plain.fooled and 50 + 3 * 150 <= plain.evaluations <= 50 + 3 * 200
    assert [r.generation for r in plain.history] == [0, 1, 2, 3]


def test_basin_hopping_beats_random_mutation_with_the_same_budget():
    placement = Placement("wap", (224, 224), (56, 56))
    finals = {}
    for mutation in ("basin-hopping", "random"):
        finals[mutation] = np.mean(
            [
                optimize_watermark(
                    distance_score((150.0 + 20 * seed, 30 + 25 * seed, 150 - 20 * seed), placement),
                    placement,
                    generations=1000,
                    max_evaluations=1500,
                    mutation=mutation,
                    rng=seed,
                ).objective
                for seed in range(5)
            ]
        )
    assert finals["basin-hopping"] < 0.75 * finals["random"], finals


def test_optimizer_only_scores_feasible_candidates_and_is_reproducible():
    mask = np.zeros((160, 160), dtype=bool)
    mask[60:100, 60:100] = True
    placement = Placement.from_mask("keep-out", mask, (40, 40), MaskParams(kernel=1, iterations=0, min_area=0))
    log: list[np.ndarray] = []
    score = distance_score((200.0, 70, 70), placement, log=log)  # the optimum sits on the lesion
    first = optimize_watermark(score, placement, population=20, generations=4, rng=7)
    scored = np.concatenate(log)
    assert placement.feasible(scored[:, 1], scored[:, 2]).all()
    assert not placement.overlaps_lesion(scored[:, 1], scored[:, 2]).any()
    assert (scored[:, 0] >= 100).all() and (scored[:, 0] <= 255).all()
    assert max(len(batch) for batch in log) <= 20
    second = optimize_watermark(
        distance_score((200.0, 70, 70), placement), placement, population=20, generations=4, rng=7
    )
    assert np.array_equal(first.params, second.params) and first.evaluations == second.evaluations


def test_ensemble_objective_weights_models_and_needs_every_model_fooled():
    probs = np.array(
        [
            [[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]],  # model 1 on three candidates
            [[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]],  # model 2
        ]
    )
    objective, fooled = ensemble_objective(probs, target=0, weights=[0.25, 0.75])
    np.testing.assert_allclose(objective, [0.825, 0.525, 0.125])
    assert fooled.tolist() == [False, False, True]


def test_without_a_label_each_model_is_scored_against_its_own_clean_answer():
    """Model 1 said class 0 on the clean image, model 2 class 1: each is pushed away from what it said, so moving
    model 2 to class 0 while model 1 stays there is not success, and success is both changing their answer."""
    probs = np.array(
        [
            [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]],  # model 1, clean answer 0
            [[0.2, 0.8], [0.6, 0.4], [0.7, 0.3]],  # model 2, clean answer 1
        ]
    )
    objective, fooled = ensemble_objective(probs, target=[0, 1], weights=[0.5, 0.5])
    np.testing.assert_allclose(objective, [0.85, 0.6, 0.3])
    assert fooled.tolist() == [False, False, True]
    shared, _ = ensemble_objective(probs, target=0, weights=[0.5, 0.5])  # one target for both: another objective
    assert not np.allclose(shared, objective)
    with pytest.raises(ValueError, match="one per model"):
        ensemble_objective(probs, target=[0, 1, 1])


# --- keys --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_set(logo):
    rng = np.random.default_rng(11)
    key = WatermarkKey()
    originals, protected = {}, {}
    for index, kind in enumerate(["gray8", "gray16", "rgb", "gray8"]):
        image = random_image(kind, rng, (48, 64))
        originals[f"case{index}"] = image
        protected[f"case{index}"] = key.protect(f"case{index}", image, logo, 100 + 50 * index, 3 * index, 2 * index)
    return key, originals, protected


def test_key_file_round_trip_is_private_and_rejects_wrong_passphrase_and_tampering(protected_set, tmp_path):
    key, originals, protected = protected_set
    path = save_key(key, tmp_path / "dataset.mlkey", passphrase="correct horse", **FAST_KDF)
    if not sys.platform.startswith("win"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.mlkey"]  # no temporary file left behind
    loaded = load_key(path, passphrase="correct horse")
    assert loaded.names() == key.names()
    for name, image in originals.items():
        assert np.array_equal(unlock(protected[name], loaded), image)

    with pytest.raises(InputError, match="wrong passphrase") as excinfo:
        load_key(path, passphrase="correct horse!")
    one_line_error(excinfo)
    blob = path.read_bytes()
    for position in (12, 45, len(blob) // 2, len(blob) - 1):  # header (salt), ciphertext, middle, GCM tag
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        (tmp_path / "tampered.mlkey").write_bytes(bytes(tampered))
        with pytest.raises(InputError, match="modified or damaged"):
            load_key(tmp_path / "tampered.mlkey", passphrase="correct horse")
    (tmp_path / "short.mlkey").write_bytes(blob[:-20])
    with pytest.raises(InputError, match="modified or damaged"):
        load_key(tmp_path / "short.mlkey", passphrase="correct horse")


def test_corrupt_or_foreign_key_files_give_one_line_errors(tmp_path):
    (tmp_path / "noise.mlkey").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.mlkey").write_bytes(b"")
    for name in ("noise.mlkey", "empty.mlkey"):
        with pytest.raises(InputError, match="not a MedLocker key file") as excinfo:
            load_key(tmp_path / name, passphrase="x")
        one_line_error(excinfo)
    with pytest.raises(InputError, match="does not exist"):
        load_key(tmp_path / "missing.mlkey", passphrase="x")
    with pytest.raises(InputError, match="exactly one"):
        load_key(tmp_path / "noise.mlkey")


def test_user_key_holds_only_its_subset(protected_set, tmp_path):
    key, originals, protected = protected_set
    issue_user_key(key, ["case1", "case2"], tmp_path / "alice.mlkey", passphrase="alice's own", **FAST_KDF)
    alice = load_key(tmp_path / "alice.mlkey", passphrase="alice's own")
    assert sorted(alice.names()) == ["case1", "case2"]
    assert np.array_equal(unlock(protected["case2"], alice), originals["case2"])
    assert verify(protected["case0"], alice) is None
    with pytest.raises(InputError, match="not protected by this key"):
        unlock(protected["case0"], alice)
    with pytest.raises(InputError, match="wrong passphrase"):
        load_key(tmp_path / "alice.mlkey", passphrase="correct horse")
    with pytest.raises(InputError, match="not in this key"):
        issue_user_key(key, ["case1", "nobody"], tmp_path / "bob.mlkey", passphrase="bob", **FAST_KDF)

    # without original pixels a user can only remove the watermark approximately (eq. 9)
    issue_user_key(key, ["case0"], tmp_path / "carol.mlkey", passphrase="carol", include_originals=False, **FAST_KDF)
    carol = load_key(tmp_path / "carol.mlkey", passphrase="carol")
    assert carol["case0"].original is None
    with pytest.raises(InputError, match="only the watermark parameters"):
        unlock(protected["case0"], carol)
    with pytest.warns(UserWarning, match="approximate"):
        approx, count = unlock_approximate(protected["case0"], carol)
    assert 0 < count and (approx != originals["case0"]).sum() <= count


def test_verify_recognises_only_the_protected_image(protected_set):
    key, originals, protected = protected_set
    entry = verify(protected["case3"], key)
    assert entry is not None and entry.name == "case3" and entry.params == (250.0, 9, 6)
    assert verify(originals["case3"], key) is None
    assert verify(protected["case3"][::-1].copy(), key) is None
    touched = protected["case3"].copy()
    touched[0, 0] ^= 1
    assert verify(touched, key) is None
    assert verify(protected["case1"].astype(np.uint32), key) is None


def test_inverse_blending_counts_the_pixels_it_cannot_restore(logo):
    rng = np.random.default_rng(5)
    image = random_image("gray8", rng, (96, 96))
    key = WatermarkKey()
    protected = key.protect("x", image, logo, 255, 10, 20)
    entry = key["x"]
    opacity = fit_logo(logo, image.shape).opacity
    with pytest.warns(UserWarning, match="not exactly the original"):
        restored, count = unlock_approximate(protected, key, logo=logo)
    wrong = restored[entry.region] != image[entry.region]
    assert 0 < wrong.sum() <= count <= opacity.size
    assert (opacity == 1).sum() <= count  # alpha 255 on an opaque logo pixel leaves nothing to recover
    assert not wrong[opacity == 0].any()  # transparent logo pixels are untouched, hence exact
    outside = np.ones(image.shape, dtype=bool)
    outside[entry.region] = False
    assert np.array_equal(restored[outside], image[outside])
    with pytest.raises(InputError, match="not the logo"):
        unlock_approximate(protected, key, logo=default_logo(64))

    gentle = WatermarkKey()
    faint = gentle.protect("y", image, logo, 1, 0, 0)  # nearly invisible watermark: eq. 9 is almost exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored, count = unlock_approximate(faint, gentle)
    assert count < opacity.size // 20 and (restored != image).sum() <= count


def test_key_file_credential_and_default_kdf_cost(protected_set, tmp_path):
    key, originals, protected = protected_set
    secret = generate_key_file(tmp_path / "site.key")
    if not sys.platform.startswith("win"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert secret.stat().st_size == 32
    with pytest.raises(InputError, match="already exists"):
        generate_key_file(secret)
    save_key(key, tmp_path / "k.mlkey", key_file=secret)
    assert np.array_equal(
        unlock(protected["case1"], load_key(tmp_path / "k.mlkey", key_file=secret)), originals["case1"]
    )
    with pytest.raises(InputError, match="locked with a key file"):
        load_key(tmp_path / "k.mlkey", passphrase="anything")
    other = generate_key_file(tmp_path / "other.key")
    with pytest.raises(InputError, match="wrong key file"):
        load_key(tmp_path / "k.mlkey", key_file=other)
    # the shipped scrypt cost (2^17, 128 MiB) works where the tests run
    save_key(key, tmp_path / "p.mlkey", passphrase="pässword")
    assert load_key(tmp_path / "p.mlkey", passphrase="pa\u0308ssword").names() == key.names()  # NFC-normalised


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_bad_inputs_give_one_line_errors(logo):
    image = np.zeros((64, 64), dtype=np.uint8)
    with pytest.raises(InputError, match="larger than the image") as excinfo:
        watermark(image, logo, 150, 0, 0, sl=0.5)
    one_line_error(excinfo)
    big = fit_logo(logo, (400, 400))
    with pytest.raises(InputError, match="larger than the image"):
        blend(image, big, 150, 0, 0)
    for bad in (
        np.zeros((4, 32, 32), dtype=np.uint8),
        np.zeros((32, 32, 4), dtype=np.uint8),
        np.zeros(32, dtype=np.uint8),
    ):
        with pytest.raises(InputError, match="2D") as excinfo:
            watermark(bad, logo, 150, 0, 0)
        one_line_error(excinfo)
    with pytest.raises(InputError, match="uint8, uint16"):
        watermark(image.astype(np.float32), logo, 150, 0, 0)
    with pytest.raises(InputError, match="outside"):
        watermark(image, logo, 150, 60, 0)
    with pytest.raises(InputError, match="alpha"):
        watermark(image, logo, 300, 0, 0)
    with pytest.raises(InputError, match="transparent"):
        watermark(image, np.zeros((8, 8), dtype=np.uint8), 150, 0, 0)
    with pytest.raises(InputError, match="2D mask"):
        Placement.from_mask("keep-out", np.zeros((2, 64, 64), dtype=bool), (16, 16))
    with pytest.raises(InputError, match="unknown placement mode"):
        Placement("middle", (64, 64), (16, 16))
    with pytest.raises(InputError, match="no room"):
        Placement("keep-out", (64, 64), (16, 16), [Box(0, 0, 64, 64)])
    with pytest.raises(InputError, match="crossover rate"):
        optimize_watermark(
            lambda p: (np.zeros(len(p)), np.zeros(len(p), bool)), Placement("wap", (64, 64), (16, 16)), crossover_rate=2
        )
    key = WatermarkKey()
    key.protect("a", image, logo, 150, 0, 0)
    with pytest.raises(InputError, match="already in this key"):
        key.protect("a", image, logo, 150, 0, 0)
    with pytest.raises(InputError, match="does not exist"):
        save_key(key, "/nonexistent-folder/k.mlkey", passphrase="x", **FAST_KDF)


def test_intensity_window_of_files(tmp_path):
    """DICOM: Window Center/Width (through Rescale Slope/Intercept and the signed shift), else Bits Stored;
    NIfTI: its own range; 8-bit and 16-bit PNG: the full range (None)."""
    import pydicom
    import SimpleITK as sitk

    from medprivacy.watermark import io as mio
    from medprivacy.watermark.data import DataConfig
    from medprivacy.watermark.examples import write_dicom_example

    gray = np.random.default_rng(0).integers(0, 4096, (32, 32)).astype(np.uint16)
    write_dicom_example(tmp_path / "mr.dcm", gray, 7, DataConfig())
    assert mio.read_image(tmp_path / "mr.dcm").window == (0, 4095)  # WC 2048 / WW 4096
    ds = pydicom.dcmread(tmp_path / "mr.dcm")
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "no-window.dcm")
    assert mio.read_image(tmp_path / "no-window.dcm").window == (0, 4095)  # Bits Stored 12
    ct = (gray.astype(np.int16) - 1024).astype(np.int16)
    ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PixelData = ct.tobytes()
    ds.save_as(tmp_path / "ct.dcm")
    image = mio.read_image(tmp_path / "ct.dcm")
    # soft-tissue window: -160..239 HU (DICOM linear window) = stored 864..1263, shifted by 32768 into uint16
    assert image.pixels.dtype == np.uint16 and image.window == (32768 + 864, 32768 + 1263)
    sitk.WriteImage(sitk.GetImageFromArray(ct), str(tmp_path / "ct.nii.gz"))
    assert mio.read_image(tmp_path / "ct.nii.gz").window == (int(ct.min()) + 32768, int(ct.max()) + 32768)
    sitk.WriteImage(sitk.GetImageFromArray(gray * 16), str(tmp_path / "g16.png"))
    sitk.WriteImage(sitk.GetImageFromArray((gray // 16).astype(np.uint8)), str(tmp_path / "g8.png"))
    assert mio.read_image(tmp_path / "g16.png").window is None and mio.read_image(tmp_path / "g8.png").window is None
