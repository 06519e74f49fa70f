"""A few held-out synthetic lesion images written as real files (PNG, TIFF, DICOM, NIfTI) for CLI tests and the demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..imageio import save_dicom
from ..quantization import to_codes
from .data import MRI_SOURCES, SPLIT_CAPACITY, DataConfig, label_of, render_sample, split_seeds


def export_examples(
    out_dir: str | os.PathLike, config: DataConfig | None = None, per_source: int = 2, split: str = "test"
) -> dict:
    """Write a few held-out images as real files for CLI tests; returns (and writes as index.json) what each is.

    MRI images: 8-bit PNG, 16-bit PNG, 16-bit TIFF, DICOM (MR, 16-bit, via pydicom) and 2D NIfTI; fundus
    images: 8-bit RGB PNG and RGB TIFF. Every image also gets its lesion mask as an 8-bit PNG (255 = lesion).
    ``per_source`` images of each source are written, alternating no-lesion / lesion."""
    import SimpleITK as sitk

    config = config or DataConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {source: per_source for source in config.sources}
    entries = []
    for seed in split_seeds(split, SPLIT_CAPACITY):
        if not any(wanted.values()):
            break
        seed = int(seed)
        source = config.sources[int(np.random.default_rng([config.seed, seed, 0]).integers(len(config.sources)))]
        # Alternate labels within each source: the k-th image written has label k % 2.
        if not wanted[source] or label_of(seed) != (per_source - wanted[source]) % 2:
            continue
        sample = render_sample(seed, config)
        wanted[source] -= 1
        stem = f"{split}-{seed}-{source}-{'lesion' if sample.label else 'normal'}"
        files = {}
        mask_path = out / f"{stem}_mask.png"
        sitk.WriteImage(sitk.GetImageFromArray(sample.mask.astype(np.uint8) * 255), str(mask_path))
        files["mask_png"] = mask_path.name
        if source in MRI_SOURCES:
            gray = sample.image[..., 0]
            gray8 = np.round(gray * 255).astype(np.uint8)
            gray16 = np.round(gray * 65535).astype(np.uint16)
            for key, name, array in (
                ("png8", f"{stem}_gray8.png", gray8),
                ("png16", f"{stem}_gray16.png", gray16),
                ("tiff16", f"{stem}_gray16.tif", gray16),
            ):
                sitk.WriteImage(sitk.GetImageFromArray(array), str(out / name))
                files[key] = name
            nifti = sitk.GetImageFromArray(gray.astype(np.float32))
            nifti.SetSpacing((1.0, 1.0))
            sitk.WriteImage(nifti, str(out / f"{stem}.nii.gz"))
            files["nifti"] = f"{stem}.nii.gz"
            write_dicom_example(out / f"{stem}.dcm", np.round(gray * 4095).astype(np.uint16), seed, config)
            files["dicom"] = f"{stem}.dcm"
        else:
            rgb8 = to_codes(sample.image)
            for key, name in (("rgb_png", f"{stem}_rgb.png"), ("rgb_tiff", f"{stem}_rgb.tif")):
                sitk.WriteImage(sitk.GetImageFromArray(rgb8, isVector=True), str(out / name))
                files[key] = name
        entries.append(
            {
                "seed": seed,
                "split": split,
                "source": source,
                "label": sample.label,
                "lesion_pixels": int(sample.mask.sum()),
                "info": sample.info,
                "files": files,
            }
        )
    index = {"data": config.describe(), "config": config.to_json(), "images": entries}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_dicom_example(path: Path, pixels: np.ndarray, seed: int, config: DataConfig) -> None:
    """A minimal, valid MR image (explicit VR little endian, 12 bits stored), with UIDs derived from the seed."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    except ImportError:
        raise InputError("writing DICOM examples needs pydicom; run 'pip install pydicom'") from None

    def uid(kind: str) -> str:
        # The entropy string fixes the examples' UIDs; it keeps the method's old name so they stay the same.
        return generate_uid(entropy_srcs=["medprivacy-medlocker-example", kind, str(config.seed), str(seed)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "MR"
    ds.PatientName = "Synthetic^Example"
    ds.PatientID = f"SYNTH{seed}"
    ds.SeriesDescription = "MedPrivacy synthetic lesion example (not a patient)"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    save_dicom(ds, path)
