"""The private path end to end: real shipped models behind a real server on 127.0.0.1, a real key, a real scan."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from medprivacy.errors import CancelledError, VersionMismatchError
from medprivacy.mixup.bank import ReferenceBank
from medprivacy.mixup.evaluate import dice_per_class
from medprivacy.mixup.pipeline import make_uploads, segment_private
from medprivacy.mixup.privacy import DEFAULT_LEVEL
from medprivacy.transport.wire import to_float32


def _same_grid(a, b) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def test_server_never_receives_an_unmixed_patch_and_the_result_is_on_the_input_grid(
    shipped_server, small_key_dir, sample_brain
):
    bank = ReferenceBank.load(small_key_dir)
    before = set(shipped_server.audit_files())
    tta = 2
    result = segment_private(
        sample_brain.image, shipped_server.client(), bank, tta=tta, unmix="learned", keep_uploaded=True
    )

    received = [
        to_float32(np.load(path, allow_pickle=False)) for path in shipped_server.audit_files() if path not in before
    ]
    received = np.concatenate(received)[:, 0]
    # The client's secrets of this run regenerate exactly what the server received, bit for bit: the privacy audit
    # attacks these very uploads.
    from medprivacy.mixup.audit.capture import of_session

    np.testing.assert_array_equal(of_session(result.session, bank).uploads, received)
    # The scan's part of every upload (cut on its copy's secret grid, filled, turned as it travelled)
    targets = make_uploads(result.session, bank, slice(None))[2]
    assert received.shape == targets.shape
    assert len(result.session.grids) == tta and result.stats["privacy"]["level"] == DEFAULT_LEVEL
    quantized_targets = np.round(targets * 255) / 255
    # Compare every upload with every patient patch as sent: none may be (close to) one, wherever it came from.
    closest = np.full(len(received), np.inf)
    flat_targets = quantized_targets.reshape(len(targets), -1)
    for start in range(0, len(received), 32):
        chunk = received[start : start + 32].reshape(-1, 1, flat_targets.shape[1])
        closest[start : start + 32] = np.abs(chunk - flat_targets[None]).mean(axis=2).min(axis=1)
    assert closest.min() > 0.03, f"an upload is within {closest.min():.4f} of a patient patch"
    # Every upload carries a reference: no patch is the target merely scaled (an empty reference would do that).
    assert (received.reshape(len(received), -1).mean(axis=1) > 0.05).all()

    assert _same_grid(result.labelmap, sample_brain.image)
    labels = sitk.GetArrayFromImage(result.labelmap)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    dice = dice_per_class(labels, sitk.GetArrayFromImage(sample_brain.labels))
    assert dice["Gray matter"] > 0.7 and dice["White matter"] > 0.7, dice
    assert result.stats["patches_sent"] == len(targets)
    assert result.stats["bytes_sent"] > 0 and result.stats["bytes_received"] > 0
    # "Show what is sent": the mixed volume on the model grid, not the patient's image
    uploaded = sitk.GetArrayFromImage(result.uploaded)
    assert uploaded.shape == sitk.GetArrayFromImage(sample_brain.image).shape or uploaded.ndim == 3


def test_cancel_stops_before_anything_is_sent(shipped_server, small_key_dir, sample_brain):
    bank = ReferenceBank.load(small_key_dir)
    client = shipped_server.client()
    with pytest.raises(CancelledError):
        segment_private(sample_brain.image, client, bank, tta=1, cancel=lambda: True)
    assert client.bytes_sent == 0


def test_learned_unmixing_refuses_a_server_with_other_weights(live_server, tmp_path):
    """The tiny test server holds different mixup-seg weights than the shipped unmixer was trained with."""
    from medprivacy.mixup.bank import generate_bank

    bank = generate_bank(tmp_path / "key16", subjects=1, patches=8, patch_size=(16, 16, 16), deformation=0.3)
    template_like = sitk.Image(40, 40, 40, sitk.sitkFloat32) + 1.0
    with pytest.raises(VersionMismatchError, match="not the one this client's unmixing network was trained with"):
        segment_private(template_like, live_server.client(), bank, tta=1, unmix="learned")


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "medprivacy.cli", *map(str, args)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
        env=env,
    )


def test_cli_segment_writes_a_segmentation_on_the_input_grid(shipped_server, small_key_dir, sample_brain, tmp_path):
    out = tmp_path / "brain.seg.nrrd"
    uploaded = tmp_path / "sent.nii.gz"
    result = _cli(
        "mixup",
        "segment",
        sample_brain.image_path,
        "-o",
        out,
        "--server",
        shipped_server.url,
        "--key-dir",
        small_key_dir,
        "--tta",
        "1",
        "--unmix",
        "naive",
        "--save-uploaded",
        uploaded,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mixed patches sent" in result.stdout
    seg = sitk.ReadImage(str(out))
    assert _same_grid(seg, sample_brain.image)
    assert seg.GetMetaData("Segment0_Name") == "CSF"
    assert uploaded.is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("flat", "2D"),
        ("unreachable", "cannot reach"),
        ("no-key", "keygen"),
        ("bad-output", "unsupported output"),
    ],
)
def test_cli_segment_bad_input_gives_one_line(case, expected, shipped_server, small_key_dir, sample_brain, tmp_path):
    image, server, key, output = sample_brain.image_path, shipped_server.url, small_key_dir, tmp_path / "out.nii.gz"
    if case == "flat":
        image = tmp_path / "slice.png"
        sitk.WriteImage(sitk.Image(64, 64, sitk.sitkUInt8) + 5, str(image))
    elif case == "unreachable":
        from medprivacy.server.local import free_port

        server = f"http://127.0.0.1:{free_port()}"
    elif case == "no-key":
        key = tmp_path / "no-key-here"
    elif case == "bad-output":
        output = tmp_path / "out.png"
    result = _cli("mixup", "segment", image, "-o", output, "--server", server, "--key-dir", key, "--tta", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert not output.exists()


def test_cli_segment_with_wrong_token_is_refused(live_server_with_token, small_key_dir, sample_brain, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    result = _cli(
        "mixup",
        "segment",
        sample_brain.image_path,
        "-o",
        tmp_path / "o.nii.gz",
        "--server",
        live_server_with_token.url,
        "--key-dir",
        small_key_dir,
        "--token-file",
        token_file,
    )
    assert result.returncode == 2
    assert "token" in result.stderr.lower() and len(result.stderr.strip().splitlines()) == 1
