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
    (folder / "manifest.json").write_text(
        json.dumps({"models": {"mixup-seg": {"file": "x", "sha256": "y"}}, "training": {"keep": 1}})
    )
    assert (
        main(["obfuscate", "train-models", "--preset", "smoke", "--out", str(folder), "--quiet", "--threads", "1"]) == 0
    )
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
    code = main(
        [
            "obfuscate",
            "eval",
            "--preset",
            "smoke",
            "--models-dir",
            str(smoke_models),
            "--out",
            str(report_path),
            "--grid",
            str(grid),
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    utility = report["utility"]
    for name in ("plain", "obfuscated"):
        assert set(utility[name]) >= {"accuracy", "auc", "sensitivity", "specificity"}
    assert utility["accuracy_ratio"] == pytest.approx(
        utility["obfuscated"]["accuracy"] / utility["plain"]["accuracy"], abs=1e-3
    )
    for domain in ("angio", "fundus"):
        privacy = report["privacy"][domain]
        assert set(privacy["baselines"]) == {"mean-frame", "obfuscated-frame"}
        names = set(privacy["attacks"])
        assert {"a", "oracle", "b-lut/N=1", "b-window/N=2", "b-finetune/N=2", "b-keyfit/N=2"} <= names
        for row in privacy["attacks"].values():
            assert 0.0 <= row["vessel_dice"] <= 1.0 and -1.0 <= row["ssim"] <= 1.0 and np.isfinite(row["psnr"])
        targets = report["targets"][domain]
        assert set(targets) == {"a", "b", "oracle"}
        assert targets["a"]["ssim_ceiling"] == pytest.approx(
            privacy["baselines"]["mean-frame"]["ssim"] + 0.05, abs=1e-4
        )
    assert "targets/fundus threat b" in out and grid.is_file()
    import SimpleITK as sitk

    assert sitk.ReadImage(str(grid)).GetSize()[0] > 0


def test_evaluation_refuses_attackers_trained_for_other_parameters(smoke_models, tmp_path, capsys):
    code = main(
        [
            "obfuscate",
            "eval",
            "--preset",
            "smoke",
            "--models-dir",
            str(smoke_models),
            "--out",
            str(tmp_path / "r.json"),
            "--codes",
            "4",
            "--skip-utility",
            "--domains",
            "angio",
        ]
    )
    assert code == 2 and "--retrain-attack-a" in capsys.readouterr().err


def test_evaluation_uses_the_attackers_of_the_models_folder_and_runs_a_subset_of_threats(
    smoke_models, tmp_path, capsys
):
    report_path = tmp_path / "oracle.json"
    code = main(
        [
            "obfuscate",
            "eval",
            "--preset",
            "smoke",
            "--models-dir",
            str(smoke_models),
            "--out",
            str(report_path),
            "--skip-utility",
            "--domains",
            "angio",
            "--attacks",
            "a,oracle",
            "--threads",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().out
    report = json.loads(report_path.read_text())
    privacy = report["privacy"]["angio"]
    assert set(privacy["attacks"]) == {"a", "oracle"} and set(report["targets"]["angio"]) == {"a", "oracle"}
    shipped = load_manifest(smoke_models)["models"]["obf-attack-angio"]
    assert (
        privacy["attack_a_network"]["source"] == "models folder"
        and privacy["attack_a_network"]["sha256"] == shipped["sha256"]
    )
    assert (
        main(
            [
                "obfuscate",
                "eval",
                "--preset",
                "smoke",
                "--models-dir",
                str(smoke_models),
                "--out",
                str(report_path),
                "--attacks",
                "a,c",
            ]
        )
        == 2
    )
    assert "--attacks takes a, b, oracle" in capsys.readouterr().err


def test_evaluation_refuses_attackers_trained_against_another_vae(smoke_models, tmp_path, capsys):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(smoke_models, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["models"]["obf-attack-angio"]["trained_against"] = {"obf-vae": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code = main(
        [
            "obfuscate",
            "eval",
            "--preset",
            "smoke",
            "--models-dir",
            str(folder),
            "--out",
            str(tmp_path / "r.json"),
            "--skip-utility",
            "--domains",
            "angio",
            "--attacks",
            "a",
        ]
    )
    assert code == 2 and "another obf-vae" in capsys.readouterr().err


@pytest.mark.parametrize("domain", ["angio", "fundus"])
def test_shipped_threat_a_attacker_loads_and_reconstructs_an_obfuscated_frame(domain):
    import random

    from medprivacy.nets.registry import DEFAULT_MODELS_DIR, load_model
    from medprivacy.obfuscation.attacks import reconstruct
    from medprivacy.obfuscation.key import random_mapping
    from medprivacy.obfuscation.keygen import default_params
    from medprivacy.obfuscation.train import ATTACK_NAMES, public_frames
    from medprivacy.obfuscation.transform import obfuscate_with

    name, file = ATTACK_NAMES[domain]
    manifest = load_manifest(DEFAULT_MODELS_DIR)
    entry, vae_entry = manifest["models"][name], manifest["models"]["obf-vae"]
    path = DEFAULT_MODELS_DIR / file
    assert entry["file"] == file and entry["sha256"] == file_sha256(path) and path.stat().st_size < 5 * 1024 * 1024
    # Evaluation only: the client build copies role "client" weights alone (Testing/test_packaging.py).
    assert entry["role"] == "attack" and entry["trained_against"] == {"obf-vae": vae_entry["sha256"]}
    assert (
        entry["command"].startswith("medprivacy obfuscate train-models")
        and 0 <= entry["validation_unseen_key"]["vessel_dice"] <= 1
    )
    vae, vae_spec = load_model("obf-vae")
    params = default_params(vae_spec.patch_size)
    assert entry["mapping"] in (params.to_json(), {**params.to_json(), "frame_size": list(params.frame_size)})
    net, spec = load_model(name)  # refuses weights whose sha256 differs from the manifest
    frames = public_frames(domain, "test", 2, 64, 0)
    assignment, values = random_mapping(params, random.Random(5))
    codes = obfuscate_with(
        vae,
        frames,
        values[assignment].astype(np.uint8),
        params,
        vae_spec.extra["latent_scale"],
        np.random.default_rng(0),
        "cpu",
    )
    guess = reconstruct(net, codes)
    assert guess.shape == frames.shape == (2, 64, 64) and np.isfinite(guess).all()
