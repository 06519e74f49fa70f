"""Real faults on the client side: a full disk, read-only folders, SIGTERM mid-batch, damaged inputs, absurd scans.

Whatever happens, the rule is the same: a one-line error that names the problem and the fix, exit status 2, no
half-written file, and never a protected image that its key cannot restore. The faults are real (faults.py): a
64 KiB tmpfs (or a file size limit), a read-only bind mount, SIGTERM/SIGKILL to a real ``medprivacy watermark
protect`` process, truncated and bit-flipped files on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO_ROOT, build_watermark_models, start_server
from faults import read_only_folder, small_disk

from medprivacy.cli import main
from medprivacy.errors import InputError
from medprivacy.server.local import free_port
from medprivacy.watermark import io as mio

SEARCH = ["--mode", "wap", "--population", "4", "--generations", "1", "--local-iterations", "1", "--seed", "0"]


def _cli(*args, preexec=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k != "MEDPRIVACY_TOKEN"}
    child_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "medprivacy.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
        env=child_env,
        cwd=REPO_ROOT,
    )


def _one_line(stderr: str) -> str:
    # Warnings may come first, and a progress bar (tqdm) once work started; the error itself is one line.
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("medprivacy: warning:") and "%|" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("medprivacy: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def wm_server(tmp_path_factory):
    models = build_watermark_models(
        tmp_path_factory.mktemp("fault-wm-models"), classifiers=("wm-cls-resnet18", "wm-cls-vit"), segmenter=False
    )
    handle = start_server([], models_dir=models)
    yield handle
    handle.stop()


@pytest.fixture
def secret(tmp_path) -> Path:
    from medprivacy.watermark.keyfile import generate_key_file

    return generate_key_file(tmp_path / "secret.bin")


def _noise_pngs(folder: Path, count: int, size=(96, 112)) -> list[Path]:
    """Random RGB pictures (they do not compress: 160x192 makes a PNG larger than the 64 KiB disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
        path = folder / f"img{index:02d}.png"
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
        paths.append(path)
    return paths


def _labels_volume(shape=(96, 96, 96)):
    """A labelmap whose .nii.gz is far larger than 64 KiB (random labels compress poorly)."""
    return sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 4, shape).astype(np.uint8))


# --- 1. disk full while writing a segmentation -----------------------------------------------------------------


def test_segmentation_on_a_full_disk_is_an_error_and_leaves_no_file(tmp_path):
    """SimpleITK reports a short write only on stderr; the read-back check turns it into one line, nothing renamed."""
    source = tmp_path / "labels.nrrd"
    sitk.WriteImage(_labels_volume(), str(source))
    script = textwrap.dedent(f"""
        import sys, SimpleITK as sitk
        from medprivacy.errors import InputError
        from medprivacy.mixup.io import write_labelmap
        try:
            write_labelmap(sitk.ReadImage({str(source)!r}), sys.argv[1])
        except InputError as exc:
            print(exc); sys.exit(2)
        print("wrote it"); sys.exit(0)
    """)
    with small_disk(tmp_path / "disk") as disk:
        result = subprocess.run(
            [sys.executable, "-c", script, str(disk.folder / "seg.nii.gz")],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=disk.preexec,
        )
        assert result.returncode == 2, (disk.kind, result.stdout, result.stderr)
        reason = "the disk is full" if disk.kind == "tmpfs" else "the file size limit (ulimit -f)"
        assert f"could not write {disk.folder / 'seg.nii.gz'}: {reason}" in result.stdout
        assert _visible(disk.folder) == []  # neither the truncated file nor the hidden temporary


# --- 2. damaged input scans ------------------------------------------------------------------------------------


def _damaged_copies(folder: Path) -> dict[str, Path]:
    volume = sitk.GetImageFromArray((np.random.default_rng(0).random((48, 48, 48)) * 1000).astype(np.int16))
    cases = {}
    for name, compress in (("scan.nii.gz", True), ("scan.nii", False), ("scan.mha", True)):
        path = folder / name
        sitk.WriteImage(volume, str(path), useCompression=compress)
        data = path.read_bytes()
        (folder / f"cut-{name}").write_bytes(data[: len(data) // 2])
        cases[f"cut-{name}"] = folder / f"cut-{name}"
        if compress:
            flipped = bytearray(data)
            for i in range(len(data) // 2, len(data) // 2 + 64):
                flipped[i] ^= 0xFF
            (folder / f"flipped-{name}").write_bytes(bytes(flipped))
            cases[f"flipped-{name}"] = folder / f"flipped-{name}"
    return cases


def test_truncated_and_bit_flipped_scans_are_refused(tmp_path):
    from medprivacy.mixup.io import read_image

    cases = _damaged_copies(tmp_path)
    assert set(cases) == {"cut-scan.nii.gz", "flipped-scan.nii.gz", "cut-scan.nii", "cut-scan.mha", "flipped-scan.mha"}
    flipped_gz = cases["flipped-scan.nii.gz"]
    assert subprocess.run(["gzip", "-t", str(flipped_gz)], capture_output=True).returncode != 0  # gzip itself agrees
    for name, path in cases.items():
        with pytest.raises(InputError, match=rf"{path.name} is damaged \(.*\); copy or export the file again") as info:
            read_image(path)
        assert "\n" not in str(info.value), name
    read_image(tmp_path / "scan.nii.gz")  # the intact files still read
    read_image(tmp_path / "scan.mha")


def test_cli_segment_refuses_a_damaged_scan_before_any_work(tmp_path):
    cases = _damaged_copies(tmp_path)
    result = _cli(
        "mixup",
        "segment",
        cases["cut-scan.nii.gz"],
        "-o",
        tmp_path / "seg.nii.gz",
        "--server",
        f"http://127.0.0.1:{free_port()}",
        "--key-dir",
        tmp_path / "no-key",
    )
    assert result.returncode == 2 and "cut-scan.nii.gz is damaged" in _one_line(result.stderr)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_watermark_refuses_a_truncated_nifti_slice(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.random.default_rng(2).integers(0, 4000, (64, 64)).astype(np.int16)), str(path)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="slice.nii.gz is damaged"):
        mio.read_image(path)


# --- 6. the key always covers every protected file ---------------------------------------------------------------


def _protect_until(sig: int, wm_server, tmp_path: Path, secret: Path):
    inputs = _noise_pngs(tmp_path / "in", 12)
    out, key = tmp_path / "out", tmp_path / "k.mlkey"
    command = [
        sys.executable,
        "-m",
        "medprivacy.cli",
        "watermark",
        "protect",
        *map(str, inputs),
        "-o",
        str(out),
        "--key",
        str(key),
        "--key-file",
        str(secret),
        "--server",
        wm_server.url,
        "--mode",
        "wap",
        "--population",
        "16",
        "--generations",
        "2",
        "--local-iterations",
        "2",
        "--seed",
        "0",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while (
        len([n for n in _visible(out) if not n.startswith(".")]) < 2
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, inputs, out, key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_protect_run_leaves_a_key_for_every_protected_image(sig, wm_server, tmp_path, secret):
    from medprivacy.watermark.keyfile import load_key, unlock

    code, stderr, inputs, out, key = _protect_until(sig, wm_server, tmp_path, secret)
    protected = [out / n for n in _visible(out) if not n.startswith(".")]
    assert 2 <= len(protected) < len(inputs), "the run was not stopped halfway"
    if sig == signal.SIGTERM:
        assert code == 143 and "medprivacy: terminated" in stderr and "Traceback" not in stderr, stderr
        assert not [n for n in _visible(out) if n.startswith(".")]  # temporary files removed on the way out
    else:
        assert code == -signal.SIGKILL
    opened = load_key(key, key_file=secret)
    assert set(p.name for p in protected) <= set(opened.names())
    for path in protected:
        original = mio.read_image(tmp_path / "in" / path.name).pixels
        np.testing.assert_array_equal(unlock(mio.read_image(path).pixels, opened), original)


# --- 7. read-only folders and absurd geometry: one line, before any work -------------------------------------------


def test_read_only_output_or_key_folder_is_refused_before_the_server_works(wm_server, tmp_path, secret):
    inputs = _noise_pngs(tmp_path / "in", 1, size=(40, 48))
    with read_only_folder(tmp_path / "ro") as locked:
        result = _cli(
            "watermark",
            "protect",
            *inputs,
            "-o",
            locked / "out",
            "--key",
            tmp_path / "k.mlkey",
            "--key-file",
            secret,
            "--server",
            wm_server.url,
            *SEARCH,
        )
        assert result.returncode == 2 and f"cannot create output folder {locked / 'out'}" in _one_line(result.stderr)
        result = _cli(
            "watermark",
            "protect",
            *inputs,
            "-o",
            locked,
            "--key",
            tmp_path / "k.mlkey",
            "--key-file",
            secret,
            "--server",
            wm_server.url,
            *SEARCH,
        )
        assert result.returncode == 2 and f"cannot write to output folder {locked}" in _one_line(result.stderr)
        assert "read-only file system" in result.stderr
        result = _cli(
            "watermark",
            "protect",
            *inputs,
            "-o",
            tmp_path / "out",
            "--key",
            locked / "k.mlkey",
            "--key-file",
            secret,
            "--server",
            wm_server.url,
            *SEARCH,
        )
        assert result.returncode == 2 and f"cannot write to folder of --key {locked}" in _one_line(result.stderr)
        assert _visible(tmp_path / "out") == []  # no protected image without its key
        result = _cli(
            "mixup", "segment", inputs[0], "-o", locked / "seg.nii.gz", "--server", f"http://127.0.0.1:{free_port()}"
        )
        assert result.returncode == 2 and f"cannot write to output folder {locked}" in _one_line(result.stderr)
        assert _visible(locked) == []


def test_absurd_voxel_spacing_is_one_line(shipped_server, small_key_dir, tmp_path):
    scan = tmp_path / "tiny-spacing.nii.gz"
    image = sitk.GetImageFromArray((np.random.default_rng(3).random((48, 56, 48)) * 1000).astype(np.float32))
    image.SetSpacing((0.001, 0.001, 0.001))
    sitk.WriteImage(image, str(scan))
    result = _cli(
        "mixup",
        "segment",
        scan,
        "-o",
        tmp_path / "seg.nii.gz",
        "--server",
        shipped_server.url,
        "--key-dir",
        small_key_dir,
        "--tta",
        "1",
    )
    line = _one_line(result.stderr)
    assert (
        result.returncode == 2
        and "cannot align the scan to the brain template: it covers 0.048 x 0.056 x 0.048 mm" in line
    )
    assert "check the voxel spacing" in line and not (tmp_path / "seg.nii.gz").exists()


# --- 8. disk full during protect ---------------------------------------------------------------------------------


def test_protect_on_a_full_disk_names_the_disk_and_leaves_nothing_half_written(wm_server, tmp_path, secret):
    inputs = _noise_pngs(tmp_path / "in", 2, size=(160, 192))
    assert all(p.stat().st_size > 64 * 1024 for p in inputs)
    key = tmp_path / "k.mlkey"
    with small_disk(tmp_path / "disk") as disk:
        result = _cli(
            "watermark",
            "protect",
            *inputs,
            "-o",
            disk.folder,
            "--key",
            key,
            "--key-file",
            secret,
            "--server",
            wm_server.url,
            *SEARCH,
            preexec=disk.preexec,
        )
        line = _one_line(result.stderr)
        reason = "the disk is full" if disk.kind == "tmpfs" else "the file size limit (ulimit -f)"
        assert result.returncode == 2 and f"could not write {disk.folder / 'img00.png'}: {reason}" in line, (
            disk.kind,
            line,
        )
        assert "damaged" not in line
        assert _visible(disk.folder) == []
    assert not key.exists()  # its only entry was an image that could not be written


# --- 10. unlock checks every image first; plausibility warnings ---------------------------------------------------


def test_unlock_with_one_stranger_writes_nothing(wm_server, tmp_path, secret, capsys):
    inputs = _noise_pngs(tmp_path / "in", 2, size=(40, 48))
    out, key = tmp_path / "out", tmp_path / "k.mlkey"
    assert (
        main(
            [
                "watermark",
                "protect",
                str(inputs[0]),
                "-o",
                str(out),
                "--key",
                str(key),
                "--key-file",
                str(secret),
                "--server",
                wm_server.url,
                *SEARCH,
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(
        [
            "watermark",
            "unlock",
            str(out / inputs[0].name),
            str(inputs[1]),
            "--key",
            str(key),
            "--key-file",
            str(secret),
            "-o",
            str(tmp_path / "restored"),
        ]
    )
    err = capsys.readouterr().err
    assert _visible(tmp_path / "restored") == []
    assert code == 2 and "img01.png is not protected by key" in _one_line(err) and "nothing was restored" in err


@pytest.mark.parametrize(
    "spacing, size, expected",
    [
        (
            (1000.0, 1000.0, 1000.0),
            (64, 64, 64),
            ["voxel spacing 1000 x 1000 x 1000 mm", "covers 64000 x 64000 x 64000 mm"],
        ),
        ((1.0, 1.0, 1.0), (160, 192, 20), ["covers 160 x 192 x 20 mm", "only 20 slices along one axis (a slab"]),
    ],
)
def test_implausible_scans_are_segmented_with_a_warning(spacing, size, expected, tmp_path, capsys):
    scan = tmp_path / "scan.nii.gz"
    image = sitk.GetImageFromArray((np.random.default_rng(4).random(size[::-1]) * 1000).astype(np.float32))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(scan))
    # No key: the run stops right after reading, which is where the warnings are printed.
    code = main(
        [
            "mixup",
            "segment",
            str(scan),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--server",
            "http://127.0.0.1:9",
            "--key-dir",
            str(tmp_path / "no-key"),
        ]
    )
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("medprivacy: warning: ")]
    assert code == 2 and len(warnings) == len(expected), err
    for line, text in zip(warnings, expected):
        assert text in line
    from medprivacy.mixup.io import plausibility_warnings

    head = sitk.Image(182, 218, 182, sitk.sitkFloat32)  # an ordinary 1 mm whole-head grid: nothing to say
    assert plausibility_warnings(head) == []
