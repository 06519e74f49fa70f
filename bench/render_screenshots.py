"""Screenshots of the three Slicer modules for the Extensions Manager and the README: what each does to the data that
ships with the project, rendered by the same code as ``medprivacy demo``, one PNG per module in Resources/Screenshots.

- MixupPrivacy: the demo's sample brain (the MNI152 T1, warped with a held-out seed and placed in an oblique scanner
  grid) | what the server receives (the first mixed copy of each patch, where it was cut, as it travelled) | the
  segmentation the client rebuilt from the answers. The server's networks run in this process (as calibration runs
  them); the key is the seeded calibration key, so the picture is reproducible.
- MedLockerWatermark: demo images (an MNI152 slice and scikit-image's fundus photograph, with synthetic lesions) |
  the same images protected by ``medprivacy watermark protect`` through a local server (lesions kept clear).
- ObfuscationPrivacy: synthetic coronary angiogram frames | the same frames as they leave the computer under a
  fresh site key.

    python bench/render_screenshots.py            # about 3 minutes on two cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTION_HEIGHT, GAP = 18, 6


def labelled_row(panels: list[tuple[np.ndarray, str]], path: Path, height: int = 256) -> None:
    """Panels (uint8 gray or RGB) side by side at the same ``height``, each with its caption above, as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    from medprivacy.files import write_atomically

    pictures = []
    for pixels, _ in panels:
        picture = Image.fromarray(pixels).convert("RGB")
        pictures.append(picture.resize((round(picture.width * height / picture.height), height), Image.NEAREST))
    width = sum(picture.width for picture in pictures) + GAP * (len(pictures) + 1)
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT + 2 * GAP), "black")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    left = GAP
    for picture, (_, caption) in zip(pictures, panels):
        draw.text((left, GAP), caption, fill="white", font=font)
        canvas.paste(picture, (left, GAP + CAPTION_HEIGHT))
        left += picture.width + GAP
    write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG", optimize=True))


def to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.round(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def mixup_screenshot(path: Path, tta: int) -> None:
    import SimpleITK as sitk

    from medprivacy.data.synth import synthesize_subject, to_scanner_space
    from medprivacy.demo import DEMO_SEED, anatomical_planes, tissue_overlay
    from medprivacy.mixup.bank import client_patch_size
    from medprivacy.mixup.calibrate import LocalSegmenter, calibration_bank
    from medprivacy.mixup.pipeline import segment_private

    image, _ = to_scanner_space(synthesize_subject(DEMO_SEED), DEMO_SEED)
    bank = calibration_bank(client_patch_size())
    result = segment_private(image, LocalSegmenter(None), bank, tta=tta, seed=0, keep_uploaded=True)
    gray, labels = anatomical_planes(image, result.labelmap)[0]
    nothing = sitk.Image(result.uploaded.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(result.uploaded)
    uploaded, _ = anatomical_planes(result.uploaded, nothing)[0]
    labelled_row(
        [
            (to_uint8(gray), "input scan (axial)"),
            (to_uint8(uploaded), "what the server receives"),
            (to_uint8(tissue_overlay(gray, labels)), "segmentation (CSF, GM, WM)"),
        ],
        path,
    )


def watermark_screenshot(path: Path, work: Path) -> None:
    from medprivacy.cli import main
    from medprivacy.demo import start_local_server, stop_local_server
    from medprivacy.watermark import io as mio
    from medprivacy.watermark.demo import DEMO_IMAGES, write_demo_images
    from medprivacy.watermark.keyfile import generate_key_file

    originals = write_demo_images(work / "originals")
    # The 8-bit ones: they show as they are, without a display window.
    chosen = [originals[[kind for _, _, kind in DEMO_IMAGES].index(kind)] for kind in ("png8", "rgb_png")]
    generate_key_file(work / "screenshot.secret")
    server, url = start_local_server(work)
    try:
        code = main(
            [
                "watermark",
                "protect",
                *map(str, chosen),
                "-o",
                str(work / "protected"),
                "--key",
                str(work / "screenshot.watermark-key"),
                "--key-file",
                str(work / "screenshot.secret"),
                "--server",
                url,
                "--mode",
                "keep-out",
                "--seed",
                "0",
            ]
        )
    finally:
        stop_local_server(server, timeout=15)
    if code != 0:
        raise SystemExit("watermark protect failed (see the message above)")
    panels = []
    for original in chosen:
        protected = work / "protected" / mio.output_name(original)
        panels += [
            (mio.read_image(original).pixels, "original"),
            (mio.read_image(protected).pixels, "protected (key restores it)"),
        ]
    labelled_row(panels, path)


def obfuscation_screenshot(path: Path, work: Path) -> None:
    from medprivacy.obfuscation.data import render_angio
    from medprivacy.obfuscation.demo import DEMO_SEED, DEMO_SIZE
    from medprivacy.obfuscation.keygen import create_site_key
    from medprivacy.obfuscation.transform import Obfuscator, normalise

    obfuscator = Obfuscator(create_site_key(work / "key"))
    # 16-bit frames, as the demo writes them (the demo's held-out test seeds).
    seeds = [DEMO_SEED + 10_000 + index for index in range(3)]
    frames = np.stack([np.round(render_angio(seed, DEMO_SIZE).image * 65535).astype(np.uint16) for seed in seeds])
    panels = []
    for original, obfuscated in zip(normalise(frames), obfuscator.obfuscate(frames)):
        panels += [(to_uint8(original), "angiogram frame"), (obfuscated.astype(np.uint8), "what the server receives")]
    labelled_row(panels, path, height=192)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshots")
    parser.add_argument("--tta", type=int, default=2, help="mixed copies per patch, MixupPrivacy (default 2)")
    parser.add_argument("--only", choices=("MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy"), action="append")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.only or ["MixupPrivacy", "MedLockerWatermark", "ObfuscationPrivacy"]
    with tempfile.TemporaryDirectory(prefix="medprivacy-screenshots-") as scratch:
        work = Path(scratch)
        if "MixupPrivacy" in wanted:
            mixup_screenshot(args.out / "MixupPrivacy.png", args.tta)
        if "MedLockerWatermark" in wanted:
            (work / "watermark").mkdir()
            watermark_screenshot(args.out / "MedLockerWatermark.png", work / "watermark")
        if "ObfuscationPrivacy" in wanted:
            obfuscation_screenshot(args.out / "ObfuscationPrivacy.png", work)
    for name in wanted:
        print(f"wrote {args.out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
