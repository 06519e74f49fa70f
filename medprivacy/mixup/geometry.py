"""Bring any 3D scan onto the model grid (1 mm, template orientation, MNI152-aligned) and results back.

A scan already on the template grid is used as is; otherwise an affine SimpleITK registration (rigid, then
affine; Mattes mutual information, two resolutions, 4 and 2 mm) aligns the template to it. The same transform, inverted
by resampling, brings the class probabilities back onto the scan's exact grid.
"""

from __future__ import annotations

import numpy as np

from ..data.template import load_template
from ..errors import InputError

_GEOMETRY_TOLERANCE = 1e-3


def is_on_model_grid(image) -> bool:
    reference = load_template().image
    return (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=_GEOMETRY_TOLERANCE)
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=_GEOMETRY_TOLERANCE)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=_GEOMETRY_TOLERANCE)
    )


def register_to_template(image, seed: int = 7):
    """Affine transform mapping template (model grid) points to points of ``image``."""
    import SimpleITK as sitk

    fixed = load_template().image
    moving = sitk.Cast(image, sitk.sitkFloat32)
    # Normalise so the metric's histogram bins see comparable ranges whatever the scanner units are.
    moving = sitk.RescaleIntensity(moving, 0.0, 1.0)

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.VersorRigid3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    rigid = _run_registration(fixed, moving, initial, seed, iterations=80)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    return _run_registration(fixed, moving, affine, seed, iterations=80)


def _run_registration(fixed, moving, initial, seed: int, iterations: int):
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Execute returns a composite wrapper; the single transform inside is what callers (and inversion) want.
    if isinstance(result, sitk.CompositeTransform) and result.GetNumberOfTransforms() == 1:
        result = result.GetNthTransform(0)
    return result.Downcast() if hasattr(result, "Downcast") else result


def to_model_grid(image, transform=None, interpolator=None):
    """Resample ``image`` onto the model grid. Returns ``(resampled, transform)``; transform is None when the
    image already lies on the model grid (no registration, no resampling)."""
    import SimpleITK as sitk

    template = load_template().image
    if transform is None and is_on_model_grid(image):
        return sitk.Cast(image, sitk.sitkFloat32) if interpolator is None else image, None
    if transform is None:
        try:
            transform = register_to_template(image)
        except RuntimeError:  # ITK: "All samples map outside moving image buffer" and the like
            extent = " x ".join(f"{n * s:.3g}" for n, s in zip(image.GetSize(), image.GetSpacing()))
            raise InputError(
                f"cannot align the scan to the brain template: it covers {extent} mm "
                f"(voxel spacing {' x '.join(f'{s:g}' for s in image.GetSpacing())} mm); "
                "check the voxel spacing and orientation in the image header"
            ) from None
    if interpolator is None:
        interpolator = sitk.sitkLinear
    pixel_type = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else image.GetPixelID()
    return sitk.Resample(image, template, transform, interpolator, 0.0, pixel_type), transform


def _channels_on_input_grid(class_volumes: np.ndarray, transform, reference):
    """Each (Z, Y, X) class score volume resampled linearly onto ``reference``'s grid, one at a time."""
    import SimpleITK as sitk

    template = load_template().image
    inverse = transform.GetInverse()
    for label, volume in enumerate(class_volumes):
        channel = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
        channel.CopyInformation(template)
        # Outside the model grid nothing was segmented: background wins there (score 1 vs 0 for tissues).
        outside = 1.0 if label == 0 else 0.0
        yield sitk.GetArrayFromImage(
            sitk.Resample(channel, reference, inverse, sitk.sitkLinear, outside, sitk.sitkFloat32)
        )


def scores_to_input_grid(class_volumes: np.ndarray, transform, reference) -> np.ndarray:
    """(C, Z, Y, X) class scores on the model grid → the same scores on ``reference``'s grid, before any argmax
    (for fitting decision weights where labels are read: linear resampling commutes with per-class factors)."""
    if transform is None:
        return np.asarray(class_volumes, dtype=np.float32)
    return np.stack(list(_channels_on_input_grid(class_volumes, transform, reference)))


def probabilities_to_input_grid(class_volumes: np.ndarray, transform, reference) -> np.ndarray:
    """Resample (C, Z, Y, X) per-class scores from the model grid onto ``reference``'s grid; returns argmax labels.

    Scores are resampled linearly before the argmax so boundaries are smooth on anisotropic scanner grids; one
    channel at a time, so memory stays at two volumes of the scan's size whatever the number of classes.
    """
    if transform is None:
        return np.argmax(class_volumes, axis=0).astype(np.uint8)
    best = None
    best_label = None
    for label, resampled in enumerate(_channels_on_input_grid(class_volumes, transform, reference)):
        if best is None:
            best, best_label = resampled, np.zeros(resampled.shape, dtype=np.uint8)
        else:
            better = resampled > best
            best = np.where(better, resampled, best)
            best_label[better] = label
    return best_label
