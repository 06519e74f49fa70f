"""``medprivacy obfuscate train-models`` and ``eval`` end to end at the smoke preset (32x32 frames, a few steps).

The figures of a smoke run mean nothing; these tests check that training records every model in the manifest
(merged, sha256 and command included), that keys made from the trained VAE work, and that the evaluation runs
every attack of both threat models, both baselines, both domains, checks the targets and draws its grid.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from medprivacy.cli import main
from medprivacy.nets.registry import file_sha256, load_manifest


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("obf-smoke-models")
    # Another model's entry must survive: the manifest is shared with the Mixup and MedLocker weights.
    (folder / "manifest.json").write_text(json.dumps({"models": {"mixup-seg": {"file": "x", "sha256": "y"}}, "training": {"keep": 1}}))
    assert main(["obfuscate", "train-models", "--preset", "smoke", "--out", str(folder), "--quiet", "--threads", "1"]) == 0
    return folder


def test_train_models_records_every_network_and_keeps_other_entries(smoke_models):
    manifest = load_manifest(smoke_models)
    assert manifest["models"]["mixup-seg"] == {"file": "x", "sha256": "y"} and manifest["training"] == {"keep": 1}
    for name in ("obf-vae", "obf-attack-angio", "obf-attack-fundus"):
        entry = manifest["models"][name]
        assert entry["sha256"] == file_sha256(smoke_models / entry["file"])
    vae = manifest["models"]["obf-vae"]
    assert vae["role"] == "client" and len(vae["latent_scale"]) == vae["arch"]["latent_size"]
    assert manifest["models"]["obf-attack-angio"]["trained_against"] == {"obf-vae": vae["sha256"]}
    record = manifest["obfuscation_training"]
    assert record["command"].startswith("medprivacy obfuscate train-models --preset smoke")
    assert set(record["models"]) == {"obf-vae", "obf-attack-angio", "obf-attack-fundus"}
    assert "synthetic coronary angiograms" in record["data"] and "retina" in record["data"]


def test_evaluation_reports_utility_both_threat_models_and_draws_the_grid(smoke_models, tmp_path, capsys):
    report_path, grid = tmp_path / "report.json", tmp_path / "grid.png"
    code = main(["obfuscate", "eval", "--preset", "smoke", "--models-dir", str(smoke_models), "--out", str(report_path),
                 "--grid", str(grid), "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    utility = report["utility"]
    for name in ("plain", "obfuscated"):
        assert set(utility[name]) >= {"accuracy", "auc", "sensitivity", "specificity"}
    assert utility["accuracy_ratio"] == pytest.approx(utility["obfuscated"]["accuracy"] / utility["plain"]["accuracy"], abs=1e-3)
    for domain in ("angio", "fundus"):
        privacy = report["privacy"][domain]
        assert set(privacy["baselines"]) == {"mean-frame", "obfuscated-frame"}
        names = set(privacy["attacks"])
        assert {"a", "oracle", "b-lut/N=1", "b-window/N=2", "b-finetune/N=2", "b-keyfit/N=2"} <= names
        for row in privacy["attacks"].values():
            assert 0.0 <= row["vessel_dice"] <= 1.0 and -1.0 <= row["ssim"] <= 1.0 and np.isfinite(row["psnr"])
        targets = report["targets"][domain]
        assert set(targets) == {"a", "b", "oracle"}
        assert targets["a"]["ssim_ceiling"] == pytest.approx(privacy["baselines"]["mean-frame"]["ssim"] + 0.05, abs=1e-4)
    assert "targets/fundus threat b" in out and grid.is_file()
    import SimpleITK as sitk

    assert sitk.ReadImage(str(grid)).GetSize()[0] > 0


def test_evaluation_refuses_attackers_trained_for_other_parameters(smoke_models, tmp_path, capsys):
    code = main(["obfuscate", "eval", "--preset", "smoke", "--models-dir", str(smoke_models), "--out", str(tmp_path / "r.json"),
                 "--codes", "4", "--skip-utility", "--domains", "angio"])
    assert code == 2 and "--retrain-attack-a" in capsys.readouterr().err
