"""Reading scans (any ITK format or a DICOM series folder) and writing results atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..labels import TISSUE_SEGMENTS

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")


def read_image(path: str | os.PathLike):
    """A 3D scalar SimpleITK image from a file or a DICOM series folder, or an InputError naming the problem."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give an image file (NIfTI, NRRD, MHA, ...) or a DICOM series folder")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"cannot read {path} ({reason[:160]}); give an ITK-readable image or a DICOM series folder") from None
    return validate_volume(image, str(path))


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} holds no DICOM series; point at the folder with the scan's .dcm files")
    # Several series (localisers, derived maps) often share a folder: the one with most slices is the scan.
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def validate_volume(image, name: str = "the image"):
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector); give a single-channel T1 scan")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise InputError(f"{name} is {image.GetDimension()}D; MixupPrivacy needs a 3D brain volume")
    if min(image.GetSize()) < 8:
        raise InputError(f"{name} is only {image.GetSize()} voxels; give a whole-brain 3D scan, not a single slice")
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite voxels; fix or re-export the image")
    if array.max() == array.min():
        raise InputError(f"{name} is empty (every voxel is {array.max()}); check that the right file was loaded")
    return image


def _atomic_target(path: Path):
    """A temporary path beside ``path`` with the same (possibly double) suffix, so writers pick the right format."""
    name = path.name
    suffix = next((s for s in (".seg.nrrd", ".nii.gz") if name.endswith(s)), path.suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, write) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    tmp = _atomic_target(path)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp creates 0600; a user's result follows their umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image(image, path: str | os.PathLike) -> None:
    import SimpleITK as sitk

    write_atomically(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def check_labelmap_path(path: str | os.PathLike) -> Path:
    """Refuse an output name or folder that cannot be written, before any work is done."""
    path = Path(path)
    if not str(path).endswith(LABELMAP_SUFFIXES):
        raise InputError(f"unsupported output {path.name}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist; create it first")
    return path


def write_labelmap(labelmap, path: str | os.PathLike) -> None:
    """Write a tissue labelmap; ``.seg.nrrd`` becomes a Slicer segmentation with named, coloured segments."""
    import SimpleITK as sitk

    path = check_labelmap_path(path)
    image = sitk.Cast(labelmap, sitk.sitkUInt8)
    if str(path).endswith(".seg.nrrd"):
        image = _with_segmentation_metadata(image)
    write_atomically(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def _with_segmentation_metadata(image):
    """Slicer's .seg.nrrd header: one segment per tissue, all in layer 0 keeping their label values."""
    size = image.GetSize()
    extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for index, (value, (name, color)) in enumerate(sorted(TISSUE_SEGMENTS.items())):
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{value}")
        image.SetMetaData(prefix + "Name", name)
        image.SetMetaData(prefix + "Color", " ".join(f"{c:.6f}" for c in color))
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", extent)
        image.SetMetaData(prefix + "Tags", "")
    return image


def write_json(data, path: str | os.PathLike) -> None:
    path = Path(path)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))
