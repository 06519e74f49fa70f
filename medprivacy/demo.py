"""``medprivacy demo``: start a loopback inference server, segment a sample brain through the private path, protect
sample images with MedLocker watermarks and restore them exactly, then have the server train a classifier on
obfuscated angiograms and classify new frames with it (ObfuscationPrivacy).

The sample is the real MNI152 T1 (the only 3D brain MRI that ships offline), warped with held-out seeds and
placed in an oblique 1×1×1.3 mm "scanner" grid with the head moved, so the whole client path runs: registration,
normalisation, mixing, shuffled upload, unmixing, TTA, resampling back. Reference labels come from the template's
tissue maps carried through the same warp, so the demo can print Dice. The MedLocker part is in
:mod:`medprivacy.watermark.demo`, the ObfuscationPrivacy part in :mod:`medprivacy.obfuscation.demo`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .errors import InputError

DEMO_SEED = 900_999  # held-out: outside training, validation and evaluation seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--key-dir", type=Path, default=None, help="private reference bank (created if missing)")
    parser.add_argument("--server", default=None, help="use this running server instead of starting one on loopback")
    parser.add_argument("--port", type=int, default=0, help="port for the local server (default: a free one)")
    parser.add_argument(
        "--privacy", default=None, help="privacy level of the private path (default: the product's default)"
    )
    parser.add_argument("--tta", type=int, default=None, help="mixed copies per patch (default: the level's)")
    parser.add_argument("--unmix", choices=("naive", "learned"), default="learned")
    # --skip-medlocker: the flag's name before the feature was called "watermark" everywhere; kept so scripts work.
    parser.add_argument(
        "--skip-watermark",
        "--skip-medlocker",
        dest="skip_watermark",
        action="store_true",
        help="skip the MedLocker watermarks",
    )
    parser.add_argument("--skip-obfuscation", action="store_true", help="skip the ObfuscationPrivacy classifier")


def run(args: argparse.Namespace) -> int:
    from .mixup.bank import BANK_FILE, ReferenceBank, default_key_dir, generate_bank
    from .transport import InferenceClient

    args.out.mkdir(parents=True, exist_ok=True)
    key_dir = args.key_dir or default_key_dir()
    if not (Path(key_dir) / BANK_FILE).is_file():
        print(f"no private key yet: generating a reference bank in {key_dir} (once per installation)")
        generate_bank(key_dir, progress=lambda message, fraction: print(f"  {message}"))
    bank = ReferenceBank.load(key_dir)

    image_path, label_path = write_sample_brain(args.out)
    print(f"sample brain: {image_path} (reference labels: {label_path})")

    server = None
    try:
        url = args.server
        if url is None:
            from .server.local import start_local_server

            server = start_local_server(["--host", "127.0.0.1"], args.out / "server.log", port=args.port)
            url = server.url
            print(f"local inference server on {url} (log: {server.log_path})")
        client = InferenceClient(url)
        print(client.check_connection())
        status = _segment_and_report(client, bank, image_path, label_path, args)
        if status == 0 and not args.skip_watermark:
            from .watermark.demo import run_watermark_demo

            print()
            status = run_watermark_demo(url, args.out / "watermark")
        if status == 0 and not args.skip_obfuscation:
            from .obfuscation.demo import run_obfuscation_demo

            print()
            status = run_obfuscation_demo(url, args.out / "obfuscation")
        return status
    finally:
        if server is not None:
            server.stop()


def _segment_and_report(client, bank, image_path: Path, label_path: Path, args) -> int:
    import SimpleITK as sitk

    from .mixup.evaluate import dice_per_class
    from .mixup.io import read_image, write_image, write_labelmap
    from .mixup.pipeline import segment_private

    image = read_image(image_path)
    started = time.perf_counter()
    result = segment_private(
        image,
        client,
        bank,
        privacy=args.privacy,
        tta=args.tta,
        unmix=args.unmix,
        keep_uploaded=True,
        progress=_print_stage(),
    )
    seconds = time.perf_counter() - started
    labelmap_path = args.out / "segmentation.nii.gz"
    write_labelmap(result.labelmap, labelmap_path)
    write_labelmap(result.labelmap, args.out / "segmentation.seg.nrrd")
    write_image(result.uploaded, args.out / "what_the_server_saw.nii.gz")
    png = args.out / "overlay.png"
    write_overlay_png(image, result.labelmap, png)
    dice = dice_per_class(
        sitk.GetArrayFromImage(result.labelmap), sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    )
    stats = result.stats
    print(
        f"private segmentation (privacy level {stats['privacy']['level']}, {args.unmix} unmixing, k={stats['tta']}) in "
        f"{seconds:.1f} s: {stats['patches_sent']} mixed patches, "
        f"{stats['bytes_sent'] / 1e6:.1f} MB up, {stats['bytes_received'] / 1e6:.1f} MB down"
    )
    print("Dice vs reference labels: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    print(
        f"wrote {labelmap_path}, {args.out / 'segmentation.seg.nrrd'}, "
        f"{png} and {args.out / 'what_the_server_saw.nii.gz'}"
    )
    return 0


def _print_stage():
    last = {"stage": None, "decile": -1}

    def report(stage: str, fraction: float) -> None:
        decile = int(fraction * 10)
        if stage != last["stage"] or decile != last["decile"]:
            print(f"  {stage} {100 * fraction:3.0f}%", flush=True)
            last.update(stage=stage, decile=decile)

    return report


def write_sample_brain(folder: Path) -> tuple[Path, Path]:
    from .data.synth import synthesize_subject, to_scanner_space
    from .mixup.io import write_image, write_labelmap

    image_path, label_path = folder / "sample_t1.nii.gz", folder / "sample_reference_labels.nii.gz"
    if not (image_path.is_file() and label_path.is_file()):
        image, labels = to_scanner_space(synthesize_subject(DEMO_SEED), DEMO_SEED)
        write_image(image, image_path)
        write_labelmap(labels, label_path)
    return image_path, label_path


def write_overlay_png(image, labelmap, path: Path) -> None:
    """Axial, coronal and sagittal mid-slices of the scan with the tissue overlay, at true aspect ratio."""
    import SimpleITK as sitk

    planes = [tissue_overlay(gray, labels) for gray, labels in anatomical_planes(image, labelmap)]
    height = max(rgb.shape[0] for rgb in planes)
    panels = []
    for rgb in planes:
        padded = np.zeros((height, rgb.shape[1], 3))
        padded[: rgb.shape[0]] = rgb
        panels.append(padded)
        panels.append(np.zeros((height, 4, 3)))
    mosaic = (np.concatenate(panels[:-1], axis=1) * 255).astype(np.uint8)
    from .files import write_atomically

    write_atomically(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(mosaic, isVector=True), str(tmp)))


def anatomical_planes(image, labelmap) -> list[tuple[np.ndarray, np.ndarray]]:
    """(gray in [0, 1], labels) of the axial, coronal and sagittal mid-slices through the scan's centre, on a 1 mm
    grid in the template's orientation, superior and anterior up."""
    import SimpleITK as sitk

    # Resample onto a 1 mm grid in the template orientation so the three panels are anatomical planes.
    from .data.template import load_template

    reference = load_template().image
    center = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    grid = sitk.Image(reference.GetSize(), sitk.sitkFloat32)
    grid.SetDirection(reference.GetDirection())
    grid.SetSpacing(reference.GetSpacing())
    grid.SetOrigin(
        np.array(center) - np.array(reference.GetDirection()).reshape(3, 3) @ ((np.array(reference.GetSize()) - 1) / 2)
    )
    gray = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    labels = sitk.GetArrayFromImage(
        sitk.Resample(labelmap, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    )
    if gray.max() <= 0:
        raise InputError("cannot draw the overlay: the scan is empty on the display grid")
    gray = np.clip(gray / np.percentile(gray[gray > 0], 99.5), 0, 1)
    z, y, x = (s // 2 for s in gray.shape)
    # Template grid is LPS-oriented (i → left, j → posterior, k → superior): flip so superior/anterior are up.
    return [
        (gray[z][::-1, :], labels[z][::-1, :]),
        (gray[:, y][::-1, :], labels[:, y][::-1, :]),
        (gray[:, :, x][::-1, ::-1], labels[:, :, x][::-1, ::-1]),
    ]


def tissue_overlay(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]: the gray slice with each tissue label tinted in its segment colour."""
    from .labels import TISSUE_SEGMENTS

    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value, (_, color) in TISSUE_SEGMENTS.items():
        where = labels == value
        rgb[where] = 0.4 * rgb[where] + 0.6 * np.array(color)
    return rgb
