"""``medprivacy watermark`` on real images through a real server: protect -> unlock is bit-exact in the same format,
verify tells members from strangers, and bad input (3D image, oversized logo, wrong passphrase, corrupt key,
unreachable server) ends in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import build_watermark_models, start_server

from medprivacy.cli import main
from medprivacy.server.local import free_port
from medprivacy.watermark import io as mio

PASSPHRASE = "correct horse battery staple"
SEARCH = ["--population", "4", "--generations", "1", "--local-iterations", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = build_watermark_models(
        tmp_path_factory.mktemp("cli-models"), classifiers=("wm-cls-resnet18", "wm-cls-vit"), segmenter=False
    )
    handle = start_server([], models_dir=models)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real pictures, small: RGB fundus PNG, 8-bit gray PNG, 16-bit TIFF, fundus JPEG, int16 NIfTI, the MR DICOM."""
    import SimpleITK as sitk
    from skimage import data, transform

    folder = tmp_path_factory.mktemp("inputs")
    retina = (transform.resize(data.retina(), (72, 80), anti_aliasing=True) * 255).round().astype(np.uint8)
    camera = (transform.resize(data.camera(), (48, 40), anti_aliasing=True) * 255).round().astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(retina, isVector=True), str(folder / "retina.png"))
    sitk.WriteImage(sitk.GetImageFromArray(camera), str(folder / "camera.png"))
    sitk.WriteImage(sitk.GetImageFromArray(camera.astype(np.uint16) * 257), str(folder / "camera16.tif"))
    sitk.WriteImage(sitk.GetImageFromArray(retina, isVector=True), str(folder / "fundus.jpg"))
    ct = sitk.GetImageFromArray(camera.astype(np.int16) * 8 - 1024)
    ct.SetSpacing((0.7, 0.7))
    sitk.WriteImage(ct, str(folder / "slice.nii.gz"))
    paths = sorted(folder.iterdir())
    try:
        from pydicom.data import get_testdata_file

        mr = get_testdata_file("MR_small.dcm")
    except ImportError:
        mr = None
    if mr:  # only this case is skipped without pydicom's bundled files
        shutil.copy(mr, folder / "mr.dcm")
        paths.append(folder / "mr.dcm")
    return paths


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["watermark", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medprivacy: error: "), err
    return lines[0]


def test_protect_unlock_round_trip_keeps_format_and_pixels(server, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", PASSPHRASE)
    out, restored, key = tmp_path / "protected", tmp_path / "restored", tmp_path / "dataset.mlkey"
    code, stdout, err = _run(
        capsys, "protect", *images, "-o", out, "--key", key, "--server", server.url, "--mode", "wap", *SEARCH
    )
    assert code == 0, err
    assert (
        f"protected {len(images)} image(s)" in stdout
        and "fundus.jpg -> " in stdout
        and "(JPEG is lossy: written as PNG)" in stdout
    )
    assert "wm-cls-resnet18: " in stdout and " -> " in stdout and key.is_file()

    for path in images:
        original = mio.read_image(path)
        protected = mio.read_image(out / mio.output_name(path))
        assert protected.format == ("png" if original.format == "jpeg" else original.format)
        assert protected.file_dtype == original.file_dtype and protected.pixels.shape == original.pixels.shape
        assert not np.array_equal(protected.pixels, original.pixels)  # the logo is there
        code, stdout, _ = _run(capsys, "verify", out / mio.output_name(path), "--key", key)
        assert code == 0 and f"protected by this key as '{path.name}'" in stdout
    code, stdout, _ = _run(capsys, "verify", images[0], "--key", key)
    assert code == 1 and "not protected by this key" in stdout

    protected_files = sorted(out.iterdir())
    code, stdout, err = _run(capsys, "unlock", *protected_files, "--key", key, "-o", restored)
    assert code == 0, err
    for path in images:
        back = mio.read_image(restored / mio.output_name(path))
        original = mio.read_image(path)
        assert (
            back.format == ("png" if original.format == "jpeg" else original.format)
            and back.file_dtype == original.file_dtype
        )
        np.testing.assert_array_equal(back.pixels, original.pixels)
    if (restored / "mr.dcm").exists():
        import pydicom

        before, after = pydicom.dcmread(images[-1]), pydicom.dcmread(restored / "mr.dcm")
        assert [(e.tag, e.value) for e in before] == [(e.tag, e.value) for e in after]  # every element, pixels too
    nifti_in, nifti_out = (
        mio.read_image(images[[p.name for p in images].index("slice.nii.gz")]),
        mio.read_image(restored / "slice.nii.gz"),
    )
    assert nifti_out._source.GetSpacing() == nifti_in._source.GetSpacing()


def test_key_file_secret_and_append(server, images, tmp_path, capsys):
    secret, key, out = tmp_path / "secret.bin", tmp_path / "k.mlkey", tmp_path / "out"
    assert _run(capsys, "new-key-file", secret)[0] == 0 and secret.stat().st_size == 32
    common = ["--key", key, "--key-file", secret, "--server", server.url, "-o", out, "--mode", "wap", *SEARCH]
    assert _run(capsys, "protect", images[0], *common)[0] == 0
    code, _, err = _run(capsys, "protect", images[1], *common)
    assert code == 2 and "already exists; pass --append" in _one_line_error(err)
    assert _run(capsys, "protect", images[1], *common, "--append")[0] == 0
    for path in images[:2]:
        assert _run(capsys, "verify", out / mio.output_name(path), "--key", key, "--key-file", secret)[0] == 0
    passphrase = tmp_path / "pass.txt"
    passphrase.write_text(PASSPHRASE + "\n")
    code, _, err = _run(
        capsys, "verify", out / mio.output_name(images[0]), "--key", key, "--passphrase-file", passphrase
    )
    assert code == 2 and "is locked with a key file" in _one_line_error(err)


def test_labels_from_a_csv_and_the_report_names_each_target(server, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", PASSPHRASE)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"image,label\n{images[0].name},lesion\nsomewhere/{images[1].name},0\nnot-in-this-run.png,1\n")
    out, key = tmp_path / "out", tmp_path / "k.mlkey"
    code, stdout, err = _run(
        capsys, "protect", *images[:3], "-o", out, "--key", key, "--server", server.url, "--labels", labels, *SEARCH
    )
    assert code == 0, err
    targets = [line.strip() for line in stdout.splitlines() if line.strip().startswith("target: ")]
    assert targets == [
        f"target: away from the true class 'lesion' (label from {labels.name})",
        f"target: away from the true class 'no lesion' (label from {labels.name})",
        "target: away from each model's own answer on the clean image (no label given: 'fooled' means changed, "
        "not necessarily wrong)",
    ]
    labels.write_text(f"image,label\n{images[0].name},tumour\n")
    code, _, err = _run(
        capsys,
        "protect",
        images[0],
        "-o",
        tmp_path / "out2",
        "--key",
        tmp_path / "k2.mlkey",
        "--server",
        server.url,
        "--labels",
        labels,
        *SEARCH,
    )
    assert code == 2 and "unknown class 'tumour'; the classifiers know 0 (no lesion), 1 (lesion)" in _one_line_error(
        err
    )
    labels.write_text("file,class\nx.png,1\n")
    code, _, err = _run(
        capsys,
        "protect",
        images[0],
        "-o",
        tmp_path / "out2",
        "--key",
        tmp_path / "k2.mlkey",
        "--server",
        server.url,
        "--labels",
        labels,
        *SEARCH,
    )
    assert code == 2 and "needs a header row with the columns image,label" in _one_line_error(err)
    assert not (tmp_path / "k2.mlkey").exists()


def test_wrong_passphrase_and_corrupt_key_are_refused_in_one_line(server, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", PASSPHRASE)
    key, out = tmp_path / "k.mlkey", tmp_path / "out"
    assert (
        _run(capsys, "protect", images[1], "-o", out, "--key", key, "--server", server.url, "--mode", "wap", *SEARCH)[0]
        == 0
    )
    protected = out / images[1].name
    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", "not the passphrase")
    code, _, err = _run(capsys, "unlock", protected, "--key", key, "-o", tmp_path / "restored")
    assert code == 2 and "wrong passphrase, or the file was modified or damaged" in _one_line_error(err)
    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", PASSPHRASE)
    corrupt = tmp_path / "corrupt.mlkey"
    blob = bytearray(key.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    corrupt.write_bytes(bytes(blob))
    code, _, err = _run(capsys, "verify", protected, "--key", corrupt)
    assert code == 2 and "modified or damaged" in _one_line_error(err)
    (tmp_path / "garbage.mlkey").write_bytes(b"not a key at all")
    code, _, err = _run(capsys, "unlock", protected, "--key", tmp_path / "garbage.mlkey", "-o", tmp_path / "restored")
    assert code == 2 and "is not a MedLocker key file" in _one_line_error(err)
    assert not (tmp_path / "restored").exists()


def test_bad_inputs_stop_before_any_work(server, images, tmp_path, capsys, monkeypatch):
    import SimpleITK as sitk

    monkeypatch.setenv("MEDPRIVACY_KEY_PASSPHRASE", PASSPHRASE)
    volume = tmp_path / "stack.tif"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 32, 32), dtype=np.uint8)), str(volume))
    key, out = tmp_path / "k.mlkey", tmp_path / "out"
    common = ["-o", out, "--key", key, "--mode", "wap", *SEARCH]

    code, _, err = _run(capsys, "protect", images[0], volume, "--server", server.url, *common)
    assert code == 2 and "stack.tif is a 3D image (32x32x4)" in _one_line_error(err)
    code, _, err = _run(capsys, "protect", images[0], "--server", server.url, "--sl", "0.5", *common)
    assert code == 2 and "is larger than the image" in _one_line_error(err)
    code, _, err = _run(capsys, "protect", images[0], "--server", server.url, "--models", "wm-cls-nope", *common)
    assert code == 2 and "has no classifier 'wm-cls-nope'" in _one_line_error(err)
    code, _, err = _run(capsys, "protect", images[0], "--server", f"http://127.0.0.1:{free_port()}", *common)
    assert code == 2 and "cannot reach http://127.0.0.1:" in _one_line_error(err)
    assert not key.exists() and not any(out.glob("*"))


def test_dicom_with_fewer_stored_bits_gets_them_back_on_unlock(tmp_path):
    """A 12-bit DICOM needs all 16 bits for the watermark; the original Bits Stored returns with the original pixels."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("MR_small.dcm")
    if not source:
        pytest.skip("pydicom's MR_small.dcm is not available")
    dataset = pydicom.dcmread(source)
    dataset.set_pixel_data(
        np.clip(dataset.pixel_array, -2048, 2047).astype(np.int16), "MONOCHROME2", 12, generate_instance_uid=False
    )
    dataset.save_as(tmp_path / "ct12.dcm")
    original = mio.read_image(tmp_path / "ct12.dcm")
    marked = original.pixels.copy()
    marked[:8, :8] = 65535
    mio.write_image(original, marked, tmp_path / "marked.dcm")
    written = pydicom.dcmread(tmp_path / "marked.dcm")
    assert (written.BitsStored, written.HighBit) == (16, 15) and written.pixel_array[0, 0] == 32767
    reread = mio.read_image(tmp_path / "marked.dcm")
    np.testing.assert_array_equal(reread.pixels, marked)
    mio.write_image(reread, original.pixels, tmp_path / "restored.dcm")
    before, after = pydicom.dcmread(tmp_path / "ct12.dcm"), pydicom.dcmread(tmp_path / "restored.dcm")
    assert [(e.tag, e.value) for e in before] == [(e.tag, e.value) for e in after]


def test_demo_protects_and_exactly_restores_its_sample_images(server, tmp_path):
    """The MedLocker part of ``make demo``: DICOM, 8/16-bit PNG, RGB PNG and TIFF, protected then restored bit for
    bit."""
    from medprivacy.watermark.demo import DEMO_IMAGES, run_watermark_demo

    out = tmp_path / "watermark"
    assert run_watermark_demo(server.url, out, mode="wap", search=tuple(SEARCH)) == 0
    originals = sorted(p.name for p in (out / "originals").iterdir() if not p.name.endswith(("_mask.png", ".json")))
    assert len(originals) == len(DEMO_IMAGES) and sorted(p.name for p in (out / "restored").iterdir()) == originals
    for name in originals:
        before, protected, after = (
            mio.read_image(out / folder / name) for folder in ("originals", "protected", "restored")
        )
        assert before.format == protected.format == after.format
        assert not np.array_equal(before.pixels, protected.pixels)
        np.testing.assert_array_equal(before.pixels, after.pixels)
    grid = mio.read_image(out / "before_after.png").pixels
    assert grid.ndim == 3 and grid.shape[0] > 256 * len(DEMO_IMAGES)
    # Run twice: the demo starts from a clean slate rather than refusing an existing key.
    assert run_watermark_demo(server.url, out, mode="wap", search=tuple(SEARCH)) == 0
