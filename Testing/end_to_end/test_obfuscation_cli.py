"""``medprivacy obfuscate`` on real files through a real server: keygen -> apply -> train -> classify, and one-line
errors for a missing key, a replaced key, a corrupt image, a one-class dataset and an unknown model.

The VAE is the tiny untrained one and training runs a few steps: mechanics, not privacy.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from conftest import OBF_SIZE, start_server

from medprivacy.cli import main
from medprivacy.obfuscation import data
from medprivacy.server.local import free_port


@pytest.fixture(scope="module")
def server(tiny_obfuscation_models_dir):
    handle = start_server([], models_dir=tiny_obfuscation_models_dir)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def models_env(monkeypatch, tiny_obfuscation_models_dir):
    monkeypatch.setenv("MEDPRIVACY_MODELS_DIR", str(tiny_obfuscation_models_dir))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["obfuscate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _png(path, seed: int, size: int = 48) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(
        sitk.GetImageFromArray(np.round(data.render_angio(seed, size).image * 65535).astype(np.uint16)), str(path)
    )


def _dataset(root, per_class: int = 4):
    for seed in range(900_200, 900_200 + 2 * per_class):
        folder = root / data.VIEWS[data.labels_of(seed)["view"]]
        folder.mkdir(parents=True, exist_ok=True)
        _png(folder / f"{seed}.png", seed)
    return root


def test_keygen_apply_train_classify_round_trip(capsys, server, tmp_path):
    import SimpleITK as sitk

    key_dir = tmp_path / "key"
    code, out, err = _run(capsys, "keygen", "--key-dir", key_dir)
    assert code == 0 and "wrote the obfuscation key" in out, err
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700

    _png(tmp_path / "frame.png", 900_300)
    run = sitk.GetImageFromArray(np.round(data.render_run(900_301, 4, 48) * 4095).astype(np.uint16))
    run.SetSpacing((0.3, 0.3, 0.0667))
    sitk.WriteImage(run, str(tmp_path / "run.nrrd"))
    out_dir = tmp_path / "out"
    code, out, err = _run(
        capsys, "apply", tmp_path / "frame.png", tmp_path / "run.nrrd", "-o", out_dir, "--key-dir", key_dir
    )
    assert code == 0 and "obfuscated 5 frame(s) from 2 file(s)" in out, err
    written = sitk.ReadImage(str(out_dir / "run.nrrd"))
    assert written.GetSize() == (OBF_SIZE, OBF_SIZE, 4) and written.GetSpacing()[0] == pytest.approx(
        0.3 * 48 / OBF_SIZE
    )
    again = tmp_path / "again"
    assert _run(capsys, "apply", tmp_path / "run.nrrd", "-o", again, "--key-dir", key_dir)[0] == 0
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(again / "run.nrrd"))), sitk.GetArrayFromImage(written)
    )
    code, _, err = _run(capsys, "apply", tmp_path / "run.nrrd", "-o", again, "--key-dir", key_dir)
    assert code == 2 and "already exists; pass --overwrite" in err

    dataset = _dataset(tmp_path / "dataset")
    code, out, err = _run(
        capsys, "train", dataset, "--server", server.url, "--key-dir", key_dir, "--steps", "6", "--name", "cli"
    )
    assert code == 0, err
    model = next(word for word in out.split() if word.startswith("obf-"))
    code, out, err = _run(capsys, "models", "--server", server.url)
    assert code == 0 and model in out and "classes LCA, RCA" in out
    code, out, err = _run(
        capsys,
        "classify",
        tmp_path / "run.nrrd",
        "--server",
        server.url,
        "--model",
        model,
        "--key-dir",
        key_dir,
        "--out",
        tmp_path / "results.csv",
    )
    assert code == 0, err
    assert out.count("run.nrrd frame") == 4
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "file,frame,class,p_LCA,p_RCA" and len(rows) == 5

    other = tmp_path / "other-key"
    assert _run(capsys, "keygen", "--key-dir", other)[0] == 0
    code, _, err = _run(
        capsys, "classify", tmp_path / "frame.png", "--server", server.url, "--model", model, "--key-dir", other
    )
    assert code == 2 and "classify with the key folder the model was trained with" in err and err.count("\n") == 1


def test_mistakes_end_in_one_line(capsys, server, tmp_path):
    code, _, err = _run(capsys, "apply", tmp_path / "nothing.png", "-o", tmp_path / "o", "--key-dir", tmp_path / "none")
    assert code == 2 and "no obfuscation key" in err and err.count("\n") == 1
    key_dir = tmp_path / "key"
    assert _run(capsys, "keygen", "--key-dir", key_dir)[0] == 0
    code, _, err = _run(capsys, "keygen", "--key-dir", key_dir)
    assert code == 2 and "--force" in err
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02")
    code, _, err = _run(capsys, "apply", tmp_path / "broken.dcm", "-o", tmp_path / "o", "--key-dir", key_dir)
    assert code == 2 and "broken.dcm" in err and err.count("\n") == 1
    (tmp_path / "one" / "LCA").mkdir(parents=True)
    _png(tmp_path / "one" / "LCA" / "a.png", 900_000)
    code, _, err = _run(capsys, "train", tmp_path / "one", "--server", server.url, "--key-dir", key_dir)
    assert code == 2 and "at least two classes" in err
    _png(tmp_path / "f.png", 900_001)
    code, _, err = _run(
        capsys,
        "classify",
        tmp_path / "f.png",
        "--server",
        server.url,
        "--model",
        "obf-abcdefabcdef",
        "--key-dir",
        key_dir,
    )
    assert code == 2 and "is not on this server" in err
    code, _, err = _run(capsys, "models", "--server", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach" in err
