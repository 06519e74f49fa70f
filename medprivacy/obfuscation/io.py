"""Frames in and out: single frames and runs (2D + time) from PNG, TIFF, DICOM (single and multi-frame), NIfTI, NRRD.

A file becomes ``Frames``: gray intensities (T, H, W) in the file's own numeric type, plus its geometry (pixel
spacing, origin and direction of the image plane; frame spacing along time or slices). Colour files are refused:
the transform works on gray frames. DICOM MONOCHROME1 (white = low values) is inverted, so vessels are dark in
every input, as in the frames the VAE learnt from.

Obfuscated output keeps the frame order and the field of view: the frames are resized to the key's frame size, so
the pixel spacing grows by the same factor and the origin moves by half the change, and the image covers the same
place. It carries nothing else: no DICOM header, no patient name, no description, whatever the input held (a DICOM
input becomes NRRD). Writes are atomic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import write_atomically
from ..imageio import dicom_pixels, file_format, known_suffix, read_dicom, read_itk

#: The formats ObfuscationPrivacy reads (``imageio.has_suffix_of`` picks their files out of a folder).
READ_FORMATS = ("png", "tiff", "nifti", "nrrd", "dicom")
#: Largest accepted frame side and frame count: larger files are mistakes, not angiograms.
MAX_SIDE = 8192
MAX_FRAMES = 10_000


@dataclass
class Frames:
    """Gray frames (T, H, W) and where they lie: ``spacing`` (x, y, t), ``origin`` (x, y, t) and ``direction``
    (3x3, row-major), as SimpleITK gives them for a 3D image whose third axis is time or slices."""

    pixels: np.ndarray
    path: Path | None = None
    format: str = ""
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    info: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    def describe(self) -> str:
        t, h, w = self.pixels.shape
        return f"{self.format.upper() or 'array'} {w}x{h}, {t} frame(s), {self.pixels.dtype}"


def frame_format(path: str | os.PathLike) -> str:
    return file_format(
        path,
        READ_FORMATS,
        "ObfuscationPrivacy reads PNG, TIFF, DICOM (single or multi-frame), NIfTI (.nii, .nii.gz) and NRRD",
    )


def read_frames(path: str | os.PathLike) -> Frames:
    """One file as gray frames, or a one-line InputError naming the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file; give an image file")
    fmt = frame_format(path)
    frames = _read_dicom(path) if fmt == "dicom" else _read_itk(path, fmt)
    _check(frames.pixels, path.name)
    return frames


def _check(pixels: np.ndarray, name: str) -> None:
    if pixels.ndim != 3 or min(pixels.shape) < 1:
        raise InputError(f"{name} holds no frames (shape {pixels.shape})")
    if pixels.shape[0] > MAX_FRAMES or max(pixels.shape[1:]) > MAX_SIDE:
        raise InputError(
            f"{name} is {pixels.shape[2]}x{pixels.shape[1]} with {pixels.shape[0]} frames; at most {MAX_FRAMES} "
            f"frames of at most {MAX_SIDE} pixels a side are accepted"
        )
    if min(pixels.shape[1:]) < 8:
        raise InputError(
            f"{name} is only {pixels.shape[2]}x{pixels.shape[1]} pixels; give frames at least 8 pixels a side"
        )
    if pixels.dtype.kind not in "biuf":
        raise InputError(f"{name} has pixels of type {pixels.dtype}; give gray intensities")


def _read_itk(path: Path, fmt: str) -> Frames:
    import SimpleITK as sitk

    image = read_itk(path, fmt)
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{path.name} has {components} components per pixel (colour); ObfuscationPrivacy works on gray frames, "
            "convert it first (for a fundus photograph, its green channel)"
        )
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dimension = 3
    if dimension == 2:
        array = sitk.GetArrayFromImage(image)[None]
        spacing = tuple(image.GetSpacing()) + (1.0,)
        origin = tuple(image.GetOrigin()) + (0.0,)
        d = image.GetDirection()
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
    elif dimension == 3:
        array = sitk.GetArrayFromImage(image)  # (frames, rows, columns): the third ITK axis is time or slices
        spacing, origin, direction = tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
    else:
        raise InputError(f"{path.name} is a {dimension}D image; give 2D frames or a run of 2D frames (2D + time)")
    return Frames(np.ascontiguousarray(array), path, fmt, spacing, origin, direction)


def _read_dicom(path: Path) -> Frames:
    dataset = read_dicom(path)
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{path.name} is a colour DICOM; ObfuscationPrivacy works on gray frames")
    array = dicom_pixels(dataset, path.name)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    array = array.reshape((frames,) + array.shape[-2:]) if array.ndim == 3 or frames > 1 else array[None]
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        array = array.max() - array.astype(np.float64) + array.min()
    spacing = _dicom_spacing(dataset)
    frame_time = float(dataset.get("FrameTime", 0) or 0) / 1000.0 or 1.0
    return Frames(
        np.ascontiguousarray(array),
        path,
        "dicom",
        (spacing[1], spacing[0], frame_time),
        (0.0, 0.0, 0.0),
        info={"frame_time_s": frame_time},
    )


def _dicom_spacing(dataset) -> tuple[float, float]:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing (projection X-ray), else 1."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = dataset.get(keyword)
        try:
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return 1.0, 1.0


def output_name(path: str | os.PathLike) -> str:
    """Name of the obfuscated file for input ``path``: PNG stays PNG (one frame) and NIfTI stays NIfTI; everything
    else (TIFF, DICOM, NRRD, multi-frame PNG) becomes NRRD, which keeps the geometry and carries no patient data."""
    path = Path(path)
    fmt = frame_format(path)
    suffix = known_suffix(path.name)
    name = path.name[: -len(suffix)] if suffix is not None else path.name
    if fmt == "png":
        return name + ".png"
    if fmt == "nifti":
        return name + ".nii.gz"
    return name + ".nrrd"


def obfuscated_geometry(frames: Frames, size) -> dict:
    """Spacing, origin and direction of the (T, size[0], size[1]) output covering the input's field of view."""
    t, h, w = frames.pixels.shape
    rows, cols = int(size[0]), int(size[1])
    sx, sy, st = frames.spacing
    new_sx, new_sy = sx * w / cols, sy * h / rows
    direction = np.asarray(frames.direction, dtype=np.float64).reshape(3, 3)
    # The first pixel's centre moves from half an old pixel to half a new pixel inside the same corner.
    shift = direction @ np.array([(new_sx - sx) / 2.0, (new_sy - sy) / 2.0, 0.0])
    origin = tuple(float(v) for v in np.asarray(frames.origin, dtype=np.float64) + shift)
    return {"spacing": (new_sx, new_sy, st), "origin": origin, "direction": tuple(float(v) for v in direction.ravel())}


def write_frames(codes: np.ndarray, path: str | os.PathLike, frames: Frames | None = None) -> Path:
    """Write uint8 obfuscated frames (T, h, w) atomically; with ``frames`` (the input), in its field of view.

    PNG holds one frame; .nrrd, .nii and .nii.gz hold any number (as a 3D image whose third axis is the frame)."""
    import SimpleITK as sitk

    path = Path(path)
    codes = np.asarray(codes)
    if codes.ndim != 3 or codes.dtype != np.uint8:
        raise InputError(f"obfuscated frames must be uint8 (T, H, W), got {codes.dtype} {codes.shape}")
    name = path.name.lower()
    if name.endswith(".png"):
        if codes.shape[0] != 1:
            raise InputError(f"{path.name}: a PNG holds one frame but there are {codes.shape[0]}; write .nrrd instead")
        image = sitk.GetImageFromArray(codes[0])
        if frames is not None:
            geometry = obfuscated_geometry(frames, codes.shape[1:])
            image.SetSpacing(geometry["spacing"][:2])
    elif name.endswith((".nrrd", ".nii", ".nii.gz")):
        image = sitk.GetImageFromArray(codes)
        if frames is not None:
            geometry = obfuscated_geometry(frames, codes.shape[1:])
            image.SetSpacing(geometry["spacing"])
            image.SetOrigin(geometry["origin"])
            image.SetDirection(geometry["direction"])
    else:
        raise InputError(f"{path.name}: write obfuscated frames as .png (one frame), .nrrd, .nii or .nii.gz")
    write_atomically(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
    return path
