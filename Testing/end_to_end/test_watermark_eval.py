"""``medprivacy watermark eval`` end to end through a real server (tiny untrained models, tiny search): report
structure, rates recomputed from the per-image records, bit-exact unlock, the example PNG, seeded reproducibility,
the ASR definitions on hand-made predictions, and one-line errors on bad input.

The models are seeded, untrained, tiny versions of the served architectures (32x32): they test the mechanics, not
watermark strength.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_watermark_models, launch_server

from medprivacy.cli import main
from medprivacy.server.local import free_port
from medprivacy.watermark.eval_plan import ENSEMBLE, HELD_OUT_PREFIX, EvalConfig, plan_runs
from medprivacy.watermark.eval_rates import attack_success_rate, ensemble_prediction, transfer_success_rate

NAMES = ["wm-cls-resnet18", "wm-cls-densenet121", "wm-cls-efficientnet-b0", "wm-cls-vit"]
TINY_SEARCH = ["--population", "4", "--generations", "1", "--local-iterations", "1", "--attack", "all"]


@pytest.fixture(scope="module")
def servers(tiny_watermark_models_dir, tmp_path_factory):
    """The four tiny classifiers + segmenter, and a server holding only a lesion segmenter (no classifier)."""
    only_segmenter = build_watermark_models(tmp_path_factory.mktemp("seg-only"), classifiers=())
    full = launch_server([], models_dir=tiny_watermark_models_dir)
    try:
        bare = launch_server([], models_dir=only_segmenter)
    except BaseException:
        full.stop()
        raise
    try:
        yield full.wait_ready(), bare.wait_ready()
    finally:
        full.stop()
        bare.stop()


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["watermark", "eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and line.startswith("medprivacy: ")]
    assert len(lines) == 1 and lines[0].startswith("medprivacy: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def evaluated(servers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    out, grid = folder / "report.json", folder / "grid.png"
    code = main(
        [
            "watermark",
            "eval",
            "--server",
            servers[0].url,
            "--out",
            str(out),
            "--images",
            "4",
            "--seed",
            "3",
            "--grid",
            str(grid),
            *TINY_SEARCH,
        ]
    )
    assert code == 0
    return json.loads(out.read_text(encoding="utf-8")), grid


def test_report_has_the_three_tables_keyed_by_source_target_and_method(evaluated):
    report, _ = evaluated
    assert (
        report["format"] == "medprivacy-watermark-eval"
        and report["data"]["images"] == 4
        and report["data"]["attacked"] == 4
    )
    assert report["data"]["split"] == "test" and report["images"][0]["seed"] == 900_000
    assert list(report["table1"]) == [*NAMES, ENSEMBLE]
    for row in report["table1"].values():
        assert {
            "asr",
            "successes",
            "correct_before",
            "clean_accuracy",
            "mean_evaluations",
            "mean_seconds",
            "psnr",
            "ssim",
        } <= set(row)
        assert row["attacked"] == 4 and 0 < row["mean_evaluations"] and row["mean_seconds"] > 0
        assert 10 < row["psnr"] < 60 and 0 < row["ssim"] <= 1
    assert report["table1"][ENSEMBLE]["models"] == NAMES
    table2 = report["table2"]
    assert table2["targets"] == [*NAMES, ENSEMBLE]
    assert list(table2["rows"]) == [*NAMES, ENSEMBLE, *(HELD_OUT_PREFIX + n for n in NAMES)]
    for source, row in table2["rows"].items():
        assert list(row) == table2["targets"]
        for target, cell in row.items():
            assert set(cell) == {"asr", "fooled", "pool", "white_box"}
            member = (
                target == source
                or source == ENSEMBLE
                or target == ENSEMBLE
                or (source.startswith(HELD_OUT_PREFIX) and target != source[len(HELD_OUT_PREFIX) :])
            )
            assert cell["white_box"] == member, (source, target)
    assert set(table2["held_out_target"]) == set(NAMES)
    assert table2["held_out_target"]["wm-cls-vit"]["source"] == HELD_OUT_PREFIX + "wm-cls-vit"
    table3 = report["table3"]
    assert table3["source"] == "wm-cls-resnet18" and table3["lesion_source"].startswith("server segmenter")
    assert set(table3["rows"]) == {"basin-hopping", "random"}
    for row in table3["rows"].values():
        assert set(row) == {"wap", "keep-in", "keep-out"} and set(row["wap"]) == {"lesion", "no-lesion"}
        assert set(row["keep-in"]) == set(row["keep-out"]) == {"lesion"}
        assert row["wap"]["lesion"]["attacked"] + row["wap"]["no-lesion"]["attacked"] == 4
    # WAP + basin hopping in Table 3 is the Table 1 search of the same source (same seed), not a second one.
    bh = table3["rows"]["basin-hopping"]["wap"]
    assert bh["lesion"]["attacked"] + bh["no-lesion"]["attacked"] == report["table1"]["wm-cls-resnet18"]["attacked"]


def test_rates_follow_the_documented_definitions(evaluated):
    report, _ = evaluated
    images = [im for im in report["images"] if im["attacked"]]
    labels = np.array([im["label"] for im in images])
    for name in NAMES:
        runs = [im["runs"][f"wap/basin-hopping/{name}"] for im in images]
        clean = np.array([im["clean_predicted"][name] for im in images])
        after = np.array([run["predicted"][name] for run in runs])
        row = report["table1"][name]
        assert row["correct_before"] == int((clean == labels).sum())
        assert row["successes"] == int(((clean == labels) & (after != labels)).sum())
        # Transfer from this source to every other classifier, from the same per-image predictions.
        for target in NAMES:
            target_clean = np.array([im["clean_predicted"][target] for im in images])
            target_after = np.array([run["predicted"][target] for run in runs])
            pool = (clean == labels) & (after != labels) & (target_clean == labels)
            cell = report["table2"]["rows"][name][target]
            assert cell["pool"] == int(pool.sum()) and cell["fooled"] == int((pool & (target_after != labels)).sum())
    accuracy = report["clean_accuracy"]
    assert all(report["table1"][n]["clean_accuracy"] == accuracy[n] for n in NAMES)


def test_unlock_is_bit_exact_for_every_watermarked_image(evaluated):
    report, _ = evaluated
    unlock = report["unlock"]
    searches = sum(len(im["runs"]) for im in report["images"])
    assert unlock["all_bit_exact"] is True and unlock["checked"] == unlock["bit_exact"] == searches > 0
    assert unlock["key_file_bytes"] > 0


def test_grid_is_a_valid_png_with_one_row_per_example(evaluated):
    from PIL import Image

    _, grid = evaluated
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(grid) as picture:
        picture.load()
        width, height = picture.size
        assert picture.mode == "RGB"
    # 32x32 images drawn 8x, three panels per row, four rows with captions.
    assert width == 3 * 256 + 4 * 6 and height > 4 * 256
    assert np.asarray(Image.open(grid)).std() > 10  # not a blank canvas


def test_same_seed_gives_the_same_watermarks(evaluated, servers, tmp_path, capsys):
    report, _ = evaluated
    out = tmp_path / "again.json"
    code, stdout, _ = _run(
        capsys,
        "--server",
        servers[0].url,
        "--out",
        out,
        "--images",
        "2",
        "--seed",
        "3",
        "--no-held-out",
        "--no-table3",
        "--models",
        "wm-cls-resnet18,wm-cls-vit",
        *TINY_SEARCH,
    )
    assert code == 0 and "Table 1" in stdout and "Table 3" not in stdout
    again = json.loads(out.read_text(encoding="utf-8"))
    assert list(again["table1"]) == ["wm-cls-resnet18", "wm-cls-vit", ENSEMBLE] and again["table3"] is None
    for first, second in zip(report["images"][:2], again["images"]):
        for name in ("wm-cls-resnet18", "wm-cls-vit"):
            key = f"wap/basin-hopping/{name}"
            assert {k: first["runs"][key][k] for k in ("alpha", "x", "y", "evaluations")} == {
                k: second["runs"][key][k] for k in ("alpha", "x", "y", "evaluations")
            }


def test_validation_split_draws_other_images_than_the_test_split(evaluated, servers, tmp_path, capsys):
    report, _ = evaluated
    out = tmp_path / "validation.json"
    code, _, err = _run(
        capsys,
        "--server",
        servers[0].url,
        "--out",
        out,
        "--images",
        "2",
        "--split",
        "validation",
        "--no-held-out",
        "--no-table3",
        "--models",
        "wm-cls-resnet18",
        *TINY_SEARCH,
    )
    assert code == 0 and "validation split from seed 500000" in err
    validation = json.loads(out.read_text(encoding="utf-8"))
    assert validation["data"]["split"] == "validation" and validation["config"]["split"] == "validation"
    assert [im["seed"] for im in validation["images"]] == [500_000, 500_001]
    assert not {im["seed"] for im in validation["images"]} & {im["seed"] for im in report["images"]}


def test_asr_counts_successes_among_images_right_before():
    labels = np.array([0, 1, 1, 0, 1])
    clean = np.array([0, 1, 0, 0, 1])  # image 2 wrong before: not counted
    after = np.array([1, 1, 1, 1, 0])
    assert attack_success_rate(labels, clean, after) == {"asr": 0.75, "successes": 3, "correct_before": 4, "images": 5}
    assert attack_success_rate([1], [0], [0])["asr"] is None  # nothing right before: no rate, not 0
    with pytest.raises(ValueError):
        attack_success_rate([0, 1], [0], [0])


def test_transfer_asr_pools_watermarks_that_fooled_the_source_and_targets_right_before():
    labels = np.array([1, 1, 0, 0, 1, 0])
    source_clean = np.array([1, 1, 0, 0, 0, 0])
    source_after = np.array([0, 0, 1, 0, 1, 1])  # fooled: 0, 1, 2 (4 was wrong before, 3 not fooled) and 5
    target_clean = np.array([1, 0, 0, 0, 1, 0])  # image 1 wrong before on the target: out of the pool
    target_after = np.array([0, 0, 0, 1, 0, 1])
    assert transfer_success_rate(labels, source_clean, source_after, target_clean, target_after) == {
        "asr": 2 / 3,
        "fooled": 2,
        "pool": 3,
    }
    assert transfer_success_rate([0], [1], [1], [0], [1])["asr"] is None


def test_ensemble_prediction_is_the_argmax_of_the_weighted_mean():
    probs = {
        "a": np.array([[0.9, 0.1], [0.4, 0.6]]),
        "b": np.array([[0.2, 0.8], [0.45, 0.55]]),
        "c": np.array([[0.3, 0.7], [0.9, 0.1]]),
    }
    assert ensemble_prediction(probs, ["a", "b", "c"]).tolist() == [1, 0]
    assert ensemble_prediction(probs, ["a", "b"]).tolist() == [0, 1]
    assert ensemble_prediction(probs, ["a", "b", "c"], weights=[1.0, 0.0, 0.0]).tolist() == [0, 1]


def test_plan_runs_covers_each_table_once():
    runs = plan_runs(NAMES, EvalConfig(), "wm-cls-resnet18")
    keys = [run.key for run in runs]
    assert len(keys) == len(set(keys)) == 4 + 1 + 4 + 5
    assert [run.source for run in runs if run.mode == "wap" and run.mutation == "basin-hopping"] == [
        *NAMES,
        ENSEMBLE,
        *(HELD_OUT_PREFIX + n for n in NAMES),
    ]
    assert {(run.mode, run.mutation) for run in runs if run.lesion_only} == {
        (m, u) for m in ("keep-in", "keep-out") for u in ("basin-hopping", "random")
    }
    equal = plan_runs(NAMES[:1], EvalConfig(held_out=True, equal_budget_random=True), "wm-cls-resnet18")
    assert [run.key for run in equal].count("wap/random-equal-evaluations/wm-cls-resnet18") == 1 and len(equal) == 1 + 8


def test_bad_input_ends_in_one_line(servers, tmp_path, capsys):
    full, bare = servers
    out = tmp_path / "report.json"
    cases = [
        (["--server", f"http://127.0.0.1:{free_port()}", "--out", out, "--images", "1"], "cannot reach"),
        (["--server", bare.url, "--out", out, "--images", "1"], "holds no watermark classifier"),
        (["--server", full.url, "--out", out, "--images", "0"], "--images must be at least 1"),
        (["--server", full.url, "--out", tmp_path / "missing" / "r.json", "--images", "1"], "does not exist"),
        (
            ["--server", full.url, "--out", out, "--images", "1", "--models", "wm-cls-nope"],
            "no classifier 'wm-cls-nope'",
        ),
        (["--server", full.url, "--out", out, "--images", "1", "--table3-source", "wm-cls-nope"], "--table3-source"),
        (
            ["--server", full.url, "--out", out, "--images", "1", "--alpha-min", "200", "--alpha-max", "100"],
            "alpha range",
        ),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2 and message in _one_line_error(err), (argv, err)
    assert not out.exists()
