"""Reading scans (any ITK format or a DICOM series folder) and writing results atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import check_file_integrity, check_writable_folder, write_atomically
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
            # ITK reads a truncated or bit-flipped .nii.gz and returns wrong voxels; check the file first.
            check_file_integrity(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(
            f"cannot read {path} ({reason[:160]}); give an ITK-readable image or a DICOM series folder"
        ) from None
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
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector); "
            "give a single-channel T1 scan"
        )
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


#: A whole adult brain T1 spans about 140-200 mm in every direction with 0.5-2 mm voxels (3-6 mm for thick
#: clinical slices); far outside these bounds the header or the scan is probably not what the user thinks.
PLAUSIBLE_EXTENT_MM = (100.0, 400.0)
PLAUSIBLE_SPACING_MM = (0.2, 7.0)
MIN_PLAUSIBLE_SLICES = 40


def plausibility_warnings(image, name: str = "the image") -> list[str]:
    """One line per reason to doubt that ``image`` is a whole-brain scan with a correct header (empty if none).

    Warnings, not errors: the segmentation still runs, but the user should know why it may come out wrong.
    """
    size, spacing = image.GetSize(), image.GetSpacing()
    extent = [n * s for n, s in zip(size, spacing)]
    shown = " x ".join(f"{e:.0f}" if e >= 10 else f"{e:.2g}" for e in extent)
    notes = []
    if not all(PLAUSIBLE_SPACING_MM[0] <= s <= PLAUSIBLE_SPACING_MM[1] for s in spacing):
        notes.append(
            f"{name} has voxel spacing {' x '.join(f'{s:g}' for s in spacing)} mm, unusual for a brain MRI "
            f"({PLAUSIBLE_SPACING_MM[0]:g}-{PLAUSIBLE_SPACING_MM[1]:g} mm); check the spacing in its header"
        )
    if not all(PLAUSIBLE_EXTENT_MM[0] <= e <= PLAUSIBLE_EXTENT_MM[1] for e in extent):
        notes.append(f"{name} covers {shown} mm, not a whole head (about 140-200 mm per side); the result may be wrong")
    if min(size) < MIN_PLAUSIBLE_SLICES:
        notes.append(
            f"{name} has only {min(size)} slices along one axis (a slab, not a whole-brain volume); "
            "tissue outside the slab cannot be segmented and the alignment to the template may fail"
        )
    return notes


def write_image(image, path: str | os.PathLike) -> None:
    _write_itk_verified(image, Path(path))


def _write_itk_verified(image, path: Path) -> None:
    """Write with SimpleITK, then read the file back: SimpleITK reports a short write only on stderr."""
    import SimpleITK as sitk

    expected = sitk.GetArrayViewFromImage(image)

    def write(tmp: Path) -> None:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise OSError(
                str(exc).strip().splitlines()[-1] if str(exc).strip() else "SimpleITK could not write the file"
            ) from None

    def verify(tmp: Path) -> None:
        check_file_integrity(tmp)
        if not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))), expected):
            raise ValueError("its voxels differ from the ones written")

    write_atomically(path, write, verify)


def check_labelmap_path(path: str | os.PathLike) -> Path:
    """Refuse an output name or folder that cannot be written, before any work is done."""
    path = Path(path)
    if not str(path).endswith(LABELMAP_SUFFIXES):
        raise InputError(f"unsupported output {path.name}; use one of {', '.join(LABELMAP_SUFFIXES)}")
    check_writable_folder(path.parent)
    return path


def write_labelmap(labelmap, path: str | os.PathLike) -> None:
    """Write a tissue labelmap; ``.seg.nrrd`` becomes a Slicer segmentation with named, coloured segments."""
    import SimpleITK as sitk

    path = check_labelmap_path(path)
    image = sitk.Cast(labelmap, sitk.sitkUInt8)
    if str(path).endswith(".seg.nrrd"):
        image = _with_segmentation_metadata(image)
    _write_itk_verified(image, path)


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
