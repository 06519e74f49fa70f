"""A secret smooth deformation of the scan on the model grid, and its inverse for the answers.

The deformation is a cubic B-spline (SimpleITK) whose control points, one every ``CONTROL_SPACING_MM``, move by
Gaussian amounts drawn from the scan's CSPRNG, scaled so that the root-mean-square displacement over the analysis
region is ``rms_mm``. That spacing matches the smooth elastic differences between subjects that the template
alignment leaves (the synthetic subjects' own deformation uses 7 control points across the volume), so a warped
scan looks like another subject rather than like a distorted image. Segmentation commutes with the deformation:
the client deforms the scan, the server segments what it receives, and the client brings the class scores back
through the inverse deformation before the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTROL_SPACING_MM = 32.0
#: The inverse is computed as a displacement field on a grid this much coarser than the model grid: the field is
#: smooth at the control spacing, and at 1 mm the inversion took 20–35 s and 400 MB for nothing.
FIELD_SHRINK = 4


def _field_grid(reference):
    """(size, origin, spacing, direction) of a coarse grid covering ``reference``."""
    size = [int(np.ceil(n / FIELD_SHRINK)) + 1 for n in reference.GetSize()]
    spacing = [s * FIELD_SHRINK for s in reference.GetSpacing()]
    return size, reference.GetOrigin(), spacing, reference.GetDirection()


@dataclass
class SecretWarp:
    """``forward`` maps model-grid points to the points of the scan they show (what ``sitk.Resample`` expects)."""

    forward: object  # SimpleITK transform
    rms_mm: float

    def warp_volume(self, volume: np.ndarray, reference, linear: bool = True) -> np.ndarray:
        """``volume`` (on ``reference``'s grid) as the server sees it: volume(forward(p)) at every grid point p."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
        image.CopyInformation(reference)
        interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
        return sitk.GetArrayFromImage(
            sitk.Resample(image, reference, self.forward, interpolator, 0.0, sitk.sitkFloat32)
        )

    def unwarp_scores(self, scores: np.ndarray, reference, background: np.ndarray) -> np.ndarray:
        """(C, Z, Y, X) class scores computed on the warped scan, brought back onto the model grid."""
        import SimpleITK as sitk

        field = sitk.TransformToDisplacementField(self.forward, sitk.sitkVectorFloat64, *_field_grid(reference))
        inverse = sitk.DisplacementFieldTransform(
            sitk.InvertDisplacementField(field, maximumNumberOfIterations=20, maxErrorToleranceThreshold=0.01)
        )
        out = np.empty_like(scores, dtype=np.float32)
        for channel, (volume, outside) in enumerate(zip(scores, background)):
            image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
            image.CopyInformation(reference)
            out[channel] = sitk.GetArrayFromImage(
                sitk.Resample(image, reference, inverse, sitk.sitkLinear, float(outside), sitk.sitkFloat32)
            )
        return out


def secret_warp(reference, rms_mm: float, rng: np.random.Generator, region: np.ndarray | None = None) -> SecretWarp:
    """A random smooth deformation over ``reference``'s grid with RMS displacement ``rms_mm`` over ``region``."""
    import SimpleITK as sitk

    physical = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    mesh = [max(1, int(round(extent / CONTROL_SPACING_MM))) for extent in physical]
    transform = sitk.BSplineTransformInitializer(reference, mesh, 3)
    raw = rng.standard_normal(len(transform.GetParameters()))
    transform.SetParameters(raw.tolist())
    field = sitk.GetArrayFromImage(
        sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, *_field_grid(reference))
    )
    if region is not None:
        coarse_region = region[::FIELD_SHRINK, ::FIELD_SHRINK, ::FIELD_SHRINK]
        field = field[tuple(slice(0, n) for n in coarse_region.shape)][coarse_region]
    inside = field.reshape(-1, 3)
    rms = float(np.sqrt(np.mean(np.sum(inside.astype(np.float64) ** 2, axis=-1))))
    transform.SetParameters((raw * (rms_mm / max(rms, 1e-9))).tolist())
    return SecretWarp(forward=transform, rms_mm=float(rms_mm))
