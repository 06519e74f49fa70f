"""The MedLocker part of ``medprivacy demo``: protect a few sample images, then restore them bit for bit.

It drives the same commands a user types (``medprivacy watermark protect`` / ``unlock``), against the server the
demo already started, and prints them so they can be copied. The samples are held-out renderings of the real
images that ship offline (MNI152 T1 slices and scikit-image's fundus photograph, with synthetic lesions), written at
256x256 in the formats users bring: DICOM, 8/16-bit PNG, RGB PNG and RGB TIFF.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError

DEMO_SIZE = (256, 256)
#: (source, has lesion, file kind in data.export_examples) for each demo image.
DEMO_IMAGES = (
    ("mni152", 1, "dicom"),
    ("mni152", 1, "png8"),
    ("mni152", 0, "png16"),
    ("retina", 1, "rgb_png"),
    ("retina", 0, "rgb_tiff"),
)


def run_watermark_demo(
    url: str,
    out: Path,
    token_file: Path | None = None,
    mode: str = "keep-out",
    search: tuple[str, ...] = ("--seed", "0"),
) -> int:
    """Protect the demo images through ``url`` (logo placement ``mode``, ``search`` options of ``watermark protect``;
    default the paper's settings), unlock them, check the restoration is exact; 0 when it is."""
    from ..cli import main
    from ..transport.watermark_client import WatermarkClient
    from .keyfile import generate_key_file

    client = WatermarkClient(url, token_file=token_file)
    if not client.classifiers():
        print(
            f"MedLocker: {url} serves no watermark classifier; train them with `medprivacy watermark train` "
            "(see Resources/Models/manifest.json) and run the demo again"
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    originals = write_demo_images(out / "originals")
    secret, key = out / "demo.secret", out / "demo.watermark-key"
    # A demo run starts from scratch: a key can hold each image name once.
    for stale in (secret, key):
        stale.unlink(missing_ok=True)
    for folder in ("protected", "restored"):
        shutil.rmtree(out / folder, ignore_errors=True)
    generate_key_file(secret)

    # The demo knows each sample's true class: with it the search pushes the models away from the truth. Without
    # it each model would be pushed away from its own clean answer, which for a model that was wrong means towards
    # the truth; "fooled" would then not mean "misled".
    labels = out / "labels.csv"
    labels.write_text(
        "image,label\n" + "".join(f"{path.name},{label}\n" for path, (_, label, _) in zip(originals, DEMO_IMAGES))
    )
    server = ["--server", url] + (["--token-file", str(token_file)] if token_file else [])
    protect = [
        "watermark",
        "protect",
        *map(str, originals),
        "-o",
        str(out / "protected"),
        "--key",
        str(key),
        "--key-file",
        str(secret),
        *server,
        "--mode",
        mode,
        "--labels",
        str(labels),
        *search,
    ]
    print("$ medprivacy " + shlex.join(protect))
    if main(protect) != 0:
        raise InputError("the MedLocker demo could not protect its sample images (see the message above)")
    from . import io as mio

    protected = [out / "protected" / mio.output_name(path) for path in originals]
    unlock = [
        "watermark",
        "unlock",
        *map(str, protected),
        "--key",
        str(key),
        "--key-file",
        str(secret),
        "-o",
        str(out / "restored"),
    ]
    print("$ medprivacy " + shlex.join(unlock))
    if main(unlock) != 0:
        raise InputError("the MedLocker demo could not unlock its protected images (see the message above)")
    restored = [out / "restored" / mio.output_name(path) for path in protected]

    exact = 0
    for original, locked, back in zip(originals, protected, restored):
        before, after, again = (mio.read_image(p).pixels for p in (original, locked, back))
        exact += int(before.dtype == again.dtype and np.array_equal(before, again))
        write_before_after_png([before, after, again], out / f"{original.stem.split('.')[0]}_before_after.png")
    grid = out / "before_after.png"
    write_before_after_png(
        [mio.read_image(p).pixels for row in zip(originals, protected, restored) for p in row], grid, columns=3
    )
    print(f"MedLocker: {exact}/{len(originals)} images restored bit for bit; before | protected | restored in {grid}")
    return 0 if exact == len(originals) else 1


def write_demo_images(folder: Path) -> list[Path]:
    """The DEMO_IMAGES as files (their lesion masks next to them as *_mask.png); returns the image paths."""
    from .data import DataConfig
    from .examples import export_examples

    shutil.rmtree(folder, ignore_errors=True)
    index = export_examples(folder, DataConfig(size=DEMO_SIZE), per_source=2, split="test")
    chosen = []
    for source, label, kind in DEMO_IMAGES:
        entry = next(e for e in index["images"] if e["source"] == source and e["label"] == label)
        chosen.append(folder / entry["files"][kind])
    keep = {p.name for p in chosen} | {e["files"]["mask_png"] for e in index["images"]} | {"index.json"}
    for path in folder.iterdir():
        if path.name not in keep:
            path.unlink()
    return chosen


def write_before_after_png(images: list[np.ndarray], path: Path, columns: int | None = None) -> None:
    """Images side by side (``columns`` per row), each scaled to 8-bit RGB at its own full range, 4 px apart."""
    import SimpleITK as sitk

    from ..files import write_atomically

    columns = columns or len(images)
    tiles = [_display_rgb(image) for image in images]
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    gap = 4
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    write_atomically(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(tmp)))


def _display_rgb(image: np.ndarray) -> np.ndarray:
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    rgb = rgb.astype(np.float64)
    top = 255.0 if image.dtype == np.uint8 else max(float(rgb.max()), 1.0)
    return np.clip(np.round(rgb / top * 255.0), 0, 255).astype(np.uint8)
