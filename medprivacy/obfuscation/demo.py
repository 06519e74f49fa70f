"""The ObfuscationPrivacy part of ``medprivacy demo``: train a classifier on the local server from obfuscated frames,
classify held-out frames and a run with it, and show what left the computer.

It drives the same commands a user types (``medprivacy obfuscate keygen | train | apply | classify``), against the
server the demo already started, and prints them so they can be copied. Frames are synthetic coronary angiograms
(held-out seeds, 16-bit PNG) of the two views, LCA and RCA; the run to classify is a multi-frame DICOM.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError

#: Enough frames for the server's classifier to generalise (with 200 per class it reached 0.68 on validation frames).
DEMO_TRAIN_PER_CLASS = 800
DEMO_TEST_PER_CLASS = 10
DEMO_STEPS = 1500
DEMO_SIZE = 96  # written larger than the VAE's 64x64, like a downsized angiogram: the transform resizes them
#: Seeds of the demo frames: test split, after the evaluation's 1000 test frames.
DEMO_SEED = 901_000


def run_obfuscation_demo(url: str, out: Path, token_file: Path | None = None) -> int:
    from ..cli import main
    from ..nets.registry import load_manifest
    from ..transport.obfuscation_client import ObfuscationClient
    from .keygen import VAE_MODEL

    if VAE_MODEL not in load_manifest().get("models", {}):
        print(
            f"ObfuscationPrivacy: no {VAE_MODEL} in the model manifest; train it with `medprivacy obfuscate "
            "train-models` "
            "and run the demo again"
        )
        return 0
    client = ObfuscationClient(url, token_file=token_file)
    if "obfuscation" not in client.info():
        print(f"ObfuscationPrivacy: {url} has no obfuscation endpoints; update the server")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    key_dir = out / "key"
    dataset, tests, run = write_demo_frames(out)
    server = ["--server", url] + (["--token-file", str(token_file)] if token_file else [])

    def step(*argv) -> str:
        import contextlib
        import io

        print("$ medprivacy obfuscate " + shlex.join(map(str, argv)))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["obfuscate", *map(str, argv)])
        print(buffer.getvalue(), end="")
        if code != 0:
            raise InputError(f"the ObfuscationPrivacy demo stopped at 'obfuscate {argv[0]}' (see the message above)")
        return buffer.getvalue()

    step("keygen", "--key-dir", key_dir)
    answer = step("train", dataset, *server, "--key-dir", key_dir, "--steps", DEMO_STEPS, "--name", "demo (LCA vs RCA)")
    model = next(word for word in answer.split() if word.startswith("obf-"))
    step("apply", run, *tests[:2], "-o", out / "what_left_this_computer", "--key-dir", key_dir)
    step("classify", *tests, run, *server, "--model", model, "--key-dir", key_dir, "--out", out / "classification.csv")
    import csv

    with open(out / "classification.csv", newline="", encoding="utf-8") as handle:
        predicted = {row["file"]: row["class"] for row in csv.DictReader(handle) if row["file"] != run.name}
    correct = sum(1 for path in tests if predicted.get(path.name) == _truth(path))
    print(
        f"ObfuscationPrivacy: {correct}/{len(tests)} held-out frames classified correctly (LCA vs RCA) by a model "
        "the server "
        f"trained on obfuscated frames only"
    )
    grid = out / "before_after.png"
    write_before_after(tests[:4] + [run], key_dir, grid)
    print(
        f"ObfuscationPrivacy: pairs of original | what the server received in {grid}; "
        f"{out / 'what_left_this_computer'} "
        "holds the run and two frames exactly as they are sent (codes and geometry only: no header, no patient data)"
    )
    return 0


def _truth(path: Path) -> str:
    """The view a test frame was drawn with: its name ends in it (frame07-RCA.png)."""
    return path.stem.split("-")[-1]


def write_demo_frames(out: Path) -> tuple[Path, list, Path]:
    """A labelled dataset folder (one subfolder per view), held-out test frames named by their view, and a run."""
    import SimpleITK as sitk

    from .data import VIEWS, render_angio, render_run

    dataset = out / "dataset"
    for index in range(2 * DEMO_TRAIN_PER_CLASS):
        seed = DEMO_SEED + index
        frame = render_angio(seed, DEMO_SIZE)
        folder = dataset / VIEWS[frame.labels["view"]]
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(
            sitk.GetImageFromArray(np.round(frame.image * 65535).astype(np.uint16)), str(folder / f"{seed}.png")
        )
    tests_folder = out / "new_frames"
    tests_folder.mkdir()
    tests = []
    for index in range(2 * DEMO_TEST_PER_CLASS):
        seed = DEMO_SEED + 10_000 + index
        frame = render_angio(seed, DEMO_SIZE)
        path = tests_folder / f"frame{index:02d}-{VIEWS[frame.labels['view']]}.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.round(frame.image * 65535).astype(np.uint16)), str(path))
        tests.append(path)
    run = out / "run_RCA.dcm"
    write_run_dicom(run, np.round(render_run(DEMO_SEED + 20_001, frames=12, size=DEMO_SIZE) * 4095).astype(np.uint16))
    return dataset, tests, run


def write_run_dicom(path: Path, pixels: np.ndarray) -> None:
    """A multi-frame X-ray angiography DICOM (12 bits stored, 15 frames/s) of a synthetic run, not a patient."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    from ..imageio import save_dicom

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medprivacy-obfuscation-demo", path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "XA", "Synthetic^Angiogram", "SYNTH-DEMO"
    ds.SeriesDescription = "MedPrivacy synthetic coronary angiography run (not a patient)"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.NumberOfFrames, ds.FrameTime = pixels.shape[0], 66.7
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    save_dicom(ds, path)


def write_before_after(paths: list, key_dir: Path, target: Path) -> None:
    """Each original frame beside its obfuscated version, four pairs per row (a run shows its first four frames)."""
    import SimpleITK as sitk

    from ..files import write_atomically
    from .io import read_frames
    from .key import SiteKey
    from .transform import Obfuscator, normalise

    obfuscator = Obfuscator(SiteKey.load(key_dir))
    tiles = []
    for path in paths:
        frames = read_frames(path).pixels[:4]
        codes = obfuscator.obfuscate(frames)
        for original, obfuscated in zip(normalise(frames), codes):
            tiles.append((original, obfuscated.astype(np.float32) / 255.0))
    size, gap, pairs_per_row = 128, 4, 4

    def fit(image):
        import torch
        import torch.nn.functional as F

        return F.interpolate(
            torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None], size=(size, size), mode="nearest"
        )[0, 0].numpy()

    rows = -(-len(tiles) // pairs_per_row)
    pair_width = 2 * size + gap
    canvas = np.ones((rows * (size + gap) - gap, pairs_per_row * (pair_width + 3 * gap) - 3 * gap), dtype=np.float32)
    for index, (original, obfuscated) in enumerate(tiles):
        top, left = (index // pairs_per_row) * (size + gap), (index % pairs_per_row) * (pair_width + 3 * gap)
        canvas[top : top + size, left : left + size] = fit(original)
        canvas[top : top + size, left + size + gap : left + pair_width] = fit(obfuscated)
    pixels = np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    write_atomically(target, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(pixels), str(tmp)))
