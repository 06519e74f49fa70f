"""Reading and writing the 2D images MedLocker protects, keeping each file's format, size, pixel type and metadata.

Formats: PNG, TIFF (8/16-bit gray or RGB), JPEG (read only, see below), NIfTI (a 2D image or a 3D one with a
single slice) through SimpleITK, and DICOM through pydicom, which keeps every data element of the file.

MedLocker works on unsigned 8/16-bit pixels. Signed files (int8/int16: most CT and many MR DICOMs and NIfTIs)
are shifted by 128 / 32768 into the unsigned range on reading and shifted back on writing, a bijection, so the
pixels written back are exactly the ones read. The watermark therefore spans the type's whole range: its brightest
value is 32767 in an int16 file.

JPEG is lossy: a protected image saved as JPEG would no longer match its key (``verify`` fails, ``unlock`` cannot
be exact), so images read from JPEG are written as PNG with the same pixels (``output_name`` says so).

DICOM: only Pixel Data changes, plus Bits Stored / High Bit when the watermark needs values beyond the file's
Bits Stored (a 12-bit CT). Then the original Bits Stored is kept in a private element (group 0011, creator
``PRIVATE_CREATOR``) so unlocking restores it. The SOP Instance UID is kept: the protected file is the same instance
with a visible mark, and unlock gives back the original. A compressed file is written uncompressed (Explicit VR
Little Endian), since re-encoding could be lossy.

Every write is atomic and checked: a temporary file beside the target, read back and compared pixel for pixel, then
renamed over the target (``medprivacy.files``), so a full disk leaves no half-written image.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import check_file_integrity, write_atomically
from ..imageio import ITK_IMAGE_IO, dicom_pixels, file_format, read_dicom, read_itk

FORMATS = ("png", "jpeg", "tiff", "nifti", "dicom")
#: Signed pixel types and the shift that maps them onto the unsigned type MedLocker works on.
_SIGNED = {np.dtype(np.int8): (np.dtype(np.uint8), 128), np.dtype(np.int16): (np.dtype(np.uint16), 32768)}
_UNSIGNED = (np.dtype(np.uint8), np.dtype(np.uint16))
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "MedPrivacy MedLocker"
_PRIVATE_BITS_STORED = 0x01


@dataclass
class MedImage:
    """One 2D image as MedLocker sees it, and what is needed to write pixels back in the file's own form."""

    path: Path
    format: str
    pixels: np.ndarray  # (H, W) or (H, W, 3), uint8 or uint16
    file_dtype: np.dtype  # the pixel type in the file; signed types are stored shifted in ``pixels``
    _source: Any = field(default=None, repr=False)  # SimpleITK image (geometry) or pydicom Dataset
    _slice_axis: bool = False  # a NIfTI stored as 3D with one slice

    @property
    def window(self) -> tuple[int, int] | None:
        """The intensity window (low, high) in ``pixels`` values that shows this image: the logo's black and white,
        and what the classifiers map to 0..1. None: the pixel type's full range (8-bit images, 16-bit
        photographs). DICOM: its Window Center/Width, else the range of its Bits Stored. NIfTI: its cal_min/cal_max,
        else the image's own minimum..maximum (CT and MR NIfTI files use a small part of the 16-bit range)."""
        if self.pixels.dtype == np.uint8:
            return None
        if self.format == "dicom":
            return _dicom_window(self._source, self.pixels.dtype)
        if self.format == "nifti":
            return _nifti_window(self._source, self.pixels, self.file_dtype)
        return None

    @property
    def describe(self) -> str:
        kind = "RGB" if self.pixels.ndim == 3 else "gray"
        return f"{self.format.upper()} {self.pixels.shape[1]}x{self.pixels.shape[0]} {kind} {self.file_dtype.name}"


def image_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its name, or from the DICOM preamble for a file without a known suffix."""
    return file_format(path, FORMATS, "MedLocker reads PNG, JPEG, TIFF, NIfTI (.nii/.nii.gz) and DICOM")


def output_name(path: str | os.PathLike) -> str:
    """File name for the protected (or unlocked) version of ``path``: the same, except JPEG becomes PNG."""
    path = Path(path)
    if image_format(path) == "jpeg":
        return path.stem + ".png"
    return path.name


def read_image(path: str | os.PathLike) -> MedImage:
    """A 2D gray or RGB image with 8- or 16-bit pixels, or an InputError that names the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; give an image file")
    fmt = image_format(path)
    image = _read_dicom(path) if fmt == "dicom" else _read_itk(path, fmt)
    return image


def write_image(image: MedImage, pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``pixels`` (same shape and type as ``image.pixels``) atomically to ``path`` in ``image``'s format.

    The format follows ``image``, except that JPEG is written as PNG; ``path`` should come from ``output_name``.
    """
    path = Path(path)
    pixels = np.asarray(pixels)
    if pixels.shape != image.pixels.shape or pixels.dtype != image.pixels.dtype:
        raise InputError(f"cannot write {pixels.dtype} {pixels.shape} pixels into a {image.describe} file")
    if image.path.exists() and path.exists() and path.resolve() == image.path.resolve():
        raise InputError(f"refusing to overwrite the input {path}; choose another output folder")
    stored = to_file_pixels(pixels, image.file_dtype)

    def verify(tmp: Path) -> None:
        # Catches a short write (SimpleITK reports a full disk only on stderr) and a format that would not keep
        # the exact pixels a MedLocker key fingerprints.
        if read_image(tmp).pixels.tobytes() != pixels.tobytes():
            raise InputError(
                f"{path.name} does not read back with the pixels written; this format cannot hold them exactly"
            )

    if image.format == "dicom":
        dataset = _dicom_with_pixels(image, stored)
        write_atomically(path, lambda tmp: dataset.save_as(str(tmp)), verify)
    else:
        _write_itk(image, stored, path, verify)
    return path


# --- pixel types -----------------------------------------------------------------------------------------------


def to_watermark_pixels(array: np.ndarray, name: str) -> tuple[np.ndarray, np.dtype]:
    """(unsigned 8/16-bit pixels MedLocker works on, the array's own dtype); signed types are shifted (a bijection)."""
    dtype = array.dtype
    if dtype in _UNSIGNED:
        return array, dtype
    if dtype.newbyteorder("=") in _SIGNED:
        unsigned, shift = _SIGNED[dtype.newbyteorder("=")]
        return (array.astype(np.int32) + shift).astype(unsigned), dtype.newbyteorder("=")
    raise InputError(f"{name} has pixel type {dtype}; MedLocker protects 8- or 16-bit integer images, convert it first")


def to_file_pixels(pixels: np.ndarray, file_dtype: np.dtype) -> np.ndarray:
    """The inverse of ``to_watermark_pixels``: MedLocker's unsigned pixels back in the source's ``file_dtype``."""
    if file_dtype in _SIGNED:
        _, shift = _SIGNED[file_dtype]
        return (pixels.astype(np.int32) - shift).astype(file_dtype)
    return pixels


def _check_2d(array: np.ndarray, name: str, components: int) -> None:
    if components not in (1, 3):
        what = "gray + alpha" if components == 2 else "RGBA" if components == 4 else f"{components}-channel"
        raise InputError(
            f"{name} has {what} pixels; MedLocker protects gray or RGB images, "
            "save it without the alpha or extra channels"
        )
    if array.ndim != (2 if components == 1 else 3):
        raise InputError(
            f"{name} is a {array.ndim if components == 1 else array.ndim - 1}D image {tuple(array.shape)}; "
            "MedLocker protects single 2D images, export one slice"
        )
    if min(array.shape[:2]) < 1:
        raise InputError(f"{name} is empty (shape {tuple(array.shape)})")


# --- PNG, JPEG, TIFF, NIfTI through SimpleITK -----------------------------------------------------------------


def _read_itk(path: Path, fmt: str) -> MedImage:
    import SimpleITK as sitk

    check_file_integrity(path)
    source = read_itk(path, fmt)
    sliced = False
    if source.GetDimension() == 3 and fmt == "nifti" and source.GetSize()[2] == 1:
        sliced = True
    elif source.GetDimension() != 2:
        size = "x".join(map(str, source.GetSize()))
        raise InputError(
            f"{path.name} is a {source.GetDimension()}D image ({size}); "
            "MedLocker protects single 2D images, export one slice"
        )
    array = sitk.GetArrayFromImage(source)
    if sliced:
        array = array[0]
    components = source.GetNumberOfComponentsPerPixel()
    _check_2d(array, path.name, components)
    pixels, file_dtype = to_watermark_pixels(array, path.name)
    return MedImage(
        path=path,
        format=fmt,
        pixels=np.ascontiguousarray(pixels),
        file_dtype=file_dtype,
        _source=source,
        _slice_axis=sliced,
    )


def _write_itk(image: MedImage, stored: np.ndarray, path: Path, verify) -> None:
    import SimpleITK as sitk

    fmt = "png" if image.format == "jpeg" else image.format
    array = stored[None] if image._slice_axis else stored
    out = sitk.GetImageFromArray(array, isVector=stored.ndim == 3)
    source = image._source
    if source is not None and image.format != "jpeg":
        # Origin, spacing and direction: a NIfTI keeps its place in the scanner, a TIFF its resolution.
        out.CopyInformation(source)

    def write(tmp: Path) -> None:
        writer = sitk.ImageFileWriter()
        writer.SetImageIO(ITK_IMAGE_IO[fmt])
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(True)  # lossless for every format written here (PNG, TIFF, NIfTI .gz)
        try:
            writer.Execute(out)
        except RuntimeError as exc:
            raise OSError(
                str(exc).strip().splitlines()[-1] if str(exc).strip() else "SimpleITK could not write the file"
            ) from None

    write_atomically(path, write, verify)


# --- DICOM through pydicom -------------------------------------------------------------------------------------


def _read_dicom(path: Path) -> MedImage:
    dataset = read_dicom(path)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{path.name} is a 3D DICOM with {frames} frames; MedLocker protects single 2D images, export one frame"
        )
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        raise InputError(
            f"{path.name} is a palette-colour DICOM; watermarking palette indices would be meaningless, "
            "convert it to RGB"
        )
    array = dicom_pixels(dataset, path.name)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    _check_2d(array, path.name, samples)
    pixels, file_dtype = to_watermark_pixels(array, path.name)
    return MedImage(
        path=path, format="dicom", pixels=np.ascontiguousarray(pixels), file_dtype=file_dtype, _source=dataset
    )


def _bits_needed(stored: np.ndarray) -> int:
    if stored.size == 0:
        return 1
    low, high = int(stored.min()), int(stored.max())
    if stored.dtype.kind == "i":
        # Two's complement: n bits hold -2^(n-1) .. 2^(n-1) - 1.
        return max(max(high, 0).bit_length(), (-low - 1).bit_length() if low < 0 else 0) + 1
    return max(1, high.bit_length())


def _dicom_with_pixels(image: MedImage, stored: np.ndarray):
    dataset = copy.deepcopy(image._source)
    allocated = stored.dtype.itemsize * 8
    block = _private_block(dataset)
    original_bits = (
        int(block[_PRIVATE_BITS_STORED].value)
        if block is not None and _PRIVATE_BITS_STORED in block
        else int(dataset.get("BitsStored", allocated) or allocated)
    )
    original_bits = min(max(original_bits, 1), allocated)
    fits = _bits_needed(stored) <= original_bits
    bits = original_bits if fits else allocated
    photometric = "RGB" if stored.ndim == 3 else str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    # The same instance, watermarked or restored: keeping its UID lets unlock give back the original file's identity.
    dataset.set_pixel_data(stored, photometric, bits, generate_instance_uid=False)
    if block is not None:
        if _PRIVATE_BITS_STORED in block:
            del dataset[block.get_tag(_PRIVATE_BITS_STORED)]
        del dataset[(PRIVATE_GROUP, block.block_start >> 8)]
    if not fits:
        added = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        added.add_new(_PRIVATE_BITS_STORED, "US", original_bits)
    return dataset


def _private_block(dataset):
    try:
        return dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None


# --- intensity windows -----------------------------------------------------------------------------------------


def _shift_of(file_dtype) -> int:
    return _SIGNED[np.dtype(file_dtype)][1] if np.dtype(file_dtype) in _SIGNED else 0


def _valid_window(low: float, high: float, dtype) -> tuple[int, int] | None:
    top = int(np.iinfo(dtype).max)
    low, high = max(0, int(np.floor(low))), min(top, int(np.ceil(high)))
    return (low, high) if low < high else None


def _first_number(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _dicom_window(dataset, dtype) -> tuple[int, int] | None:
    signed = int(dataset.get("PixelRepresentation", 0) or 0) == 1
    shift = _SIGNED[np.dtype(np.int16)][1] if signed and np.dtype(dtype) == np.uint16 else 0
    center, width = _first_number(dataset.get("WindowCenter")), _first_number(dataset.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # The window is in output units (after Rescale Slope/Intercept); pixels are stored values, shifted if signed.
        slope = _first_number(dataset.get("RescaleSlope")) or 1.0
        intercept = _first_number(dataset.get("RescaleIntercept")) or 0.0
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2  # DICOM PS3.3 C.11.2.1.2.1
        low, high = sorted(((low - intercept) / slope + shift, (high - intercept) / slope + shift))
        window = _valid_window(low, high, dtype)
        if window is not None:
            return window
    block = _private_block(dataset)
    bits = (
        int(block[_PRIVATE_BITS_STORED].value)
        if block is not None and _PRIVATE_BITS_STORED in block
        else int(dataset.get("BitsStored", 16) or 16)
    )
    if bits >= np.iinfo(dtype).bits:
        return None
    if signed:
        return _valid_window(shift - 2 ** (bits - 1), shift + 2 ** (bits - 1) - 1, dtype)
    return _valid_window(0, 2**bits - 1, dtype)


def _nifti_window(source, pixels: np.ndarray, file_dtype) -> tuple[int, int] | None:
    shift = _shift_of(file_dtype)
    try:
        low, high = float(source.GetMetaData("cal_min")), float(source.GetMetaData("cal_max"))
    except (RuntimeError, ValueError, AttributeError):
        low = high = 0.0
    if high > low:
        window = _valid_window(low + shift, high + shift, pixels.dtype)
        if window is not None:
            return window
    return _valid_window(float(pixels.min()), float(pixels.max()), pixels.dtype) if pixels.size else None
