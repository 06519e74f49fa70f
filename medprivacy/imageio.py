"""Medical image files, the part every feature shares: which format a file is, opening it with SimpleITK or pydicom,
and the one-line errors for unknown, damaged or undecodable files.

What a feature then does with the pixels stays in the feature: MedLocker's exact 2D images with their metadata
(``watermark.io``), ObfuscationPrivacy's gray frame runs with their geometry (``obfuscation.io``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputError

#: File name endings (lower case) and the format each means.
SUFFIX_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".dcm": "dicom",
    ".dicom": "dicom",
}
#: SimpleITK's reader/writer for each format it handles (DICOM goes through pydicom, which keeps every element).
ITK_IMAGE_IO = {
    "png": "PNGImageIO",
    "jpeg": "JPEGImageIO",
    "tiff": "TIFFImageIO",
    "nifti": "NiftiImageIO",
    "nrrd": "NrrdImageIO",
}


def known_suffix(name: str) -> str | None:
    """The longest ending of ``name`` in ``SUFFIX_FORMATS`` (``.nii.gz`` before ``.gz``), or None."""
    lower = name.lower()
    return next((s for s in sorted(SUFFIX_FORMATS, key=len, reverse=True) if lower.endswith(s)), None)


def has_suffix_of(path: str | os.PathLike, formats: Iterable[str]) -> bool:
    """Whether the name of ``path`` ends like a file of one of ``formats`` (for picking files out of a folder)."""
    suffix = known_suffix(Path(path).name)
    return suffix is not None and SUFFIX_FORMATS[suffix] in set(formats)


def file_format(path: str | os.PathLike, formats: Iterable[str], reads: str) -> str:
    """The format of ``path`` from its name, or from the DICOM preamble for a file without an ending in ``formats``.

    A format outside ``formats`` is an InputError ending in ``reads`` (what the caller reads instead)."""
    path = Path(path)
    formats = set(formats)
    suffix = known_suffix(path.name)
    fmt = SUFFIX_FORMATS[suffix] if suffix is not None else None
    if fmt not in formats:
        # PACS exports often have no suffix at all (or a wrong one); the 'DICM' marker after the 128-byte preamble
        # identifies them.
        try:
            with open(path, "rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    fmt = "dicom"
        except OSError:
            pass
    if fmt not in formats:
        raise InputError(f"{path.name}: unsupported format; {reads}")
    return fmt


def read_itk(path: Path, fmt: str):
    """The SimpleITK image in ``path`` read as ``fmt``, or an InputError saying the file is damaged."""
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path), imageIO=ITK_IMAGE_IO[fmt])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(
            f"cannot read {path.name} as {fmt.upper()} ({reason[:160]}); "
            f"the file is damaged or not a {fmt.upper()} image"
        ) from None


def import_pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError("reading DICOM needs the pydicom package; install it with 'pip install pydicom'") from None
    return pydicom


def read_dicom(path: Path):
    """The pydicom Dataset of an image instance (one with Pixel Data), or an InputError naming what is wrong."""
    pydicom = import_pydicom()
    try:
        dataset = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InputError(
            f"cannot read {path.name} as DICOM ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
        ) from None
    if "PixelData" not in dataset:
        raise InputError(f"{path.name} is a DICOM file without an image (no Pixel Data); give an image instance")
    return dataset


def dicom_pixels(dataset, name: str) -> np.ndarray:
    """The decoded pixels of ``dataset``, or an InputError saying how to make them decodable."""
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as exc:  # pydicom raises many types for missing decoders and broken pixel data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", "unknown transfer syntax")
        raise InputError(
            f"cannot decode the pixels of {name} "
            f"({syntax_name}: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
            "decompress it first (e.g. 'gdcmconv --raw') or install the pydicom decoder plugins"
        ) from None


def save_dicom(dataset, path: str | os.PathLike) -> None:
    """Write a new ``dataset`` as a standard DICOM file (preamble and file meta), under pydicom 2 and 3 alike."""
    try:
        dataset.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2.x (Python 3.9)
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        dataset.save_as(str(path), write_like_original=False)
