"""The anatomy of the synthetic lesion images: where each source's lesion-free picture comes from and how it is
posed and acquired (see :mod:`medprivacy.watermark.data` for the sources).

``mri_base`` / ``fundus_base`` draw a posed, warped view of the real anatomy; ``mri_acquisition`` /
``fundus_acquisition`` add scanner or camera effects after the lesion is drawn, so the lesion goes through them too.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InputError


def _grid(shape) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(
        np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64), indexing="ij"
    )
    return rows, cols


def _sampling_coords(shape, centre, side: float, angle: float, flip: bool, elastic: float, rng) -> np.ndarray:
    """Source (row, col) for every output pixel: a square of ``side`` source pixels centred at ``centre``, rotated by
    ``angle``, optionally mirrored, plus a smooth random displacement of about ``elastic`` output pixels."""
    height, width = shape
    rows, cols = _grid(shape)
    if elastic > 0:
        coarse = rng.normal(0.0, elastic, size=(2, 5, 5))
        rows = rows + _upsample(coarse[0], shape)
        cols = cols + _upsample(coarse[1], shape)
    scale = side / max(height, width)
    v = (rows + 0.5 - height / 2) * scale
    u = (cols + 0.5 - width / 2) * scale
    if flip:
        u = -u
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([centre[0] + cos * v - sin * u, centre[1] + sin * v + cos * u])


def _sample(plane: np.ndarray, coords: np.ndarray, factor: float, order: int = 1) -> np.ndarray:
    """Resample ``plane`` at ``coords`` after anti-alias smoothing for a ``factor``-fold reduction."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    if factor > 1.05:
        plane = gaussian_filter(plane, sigma=0.5 * (factor - 1.0) + 0.3)
    return map_coordinates(plane, coords, order=order, mode="constant", cval=0.0)


@functools.lru_cache(maxsize=16)
def _cubic_matrix(knots: int, length: int) -> np.ndarray:
    """(length, knots) matrix M with M @ v == scipy.ndimage.zoom(v, length / knots, order=3, mode="nearest")."""
    from scipy.ndimage import zoom

    eye = np.eye(knots)
    return np.stack([zoom(eye[j], length / knots, order=3, mode="nearest")[:length] for j in range(knots)], axis=1)


def _upsample(coarse: np.ndarray, shape) -> np.ndarray:
    """Smooth cubic-spline upsampling of a small grid to ``shape`` (separable, so two small matrix products)."""
    return _cubic_matrix(coarse.shape[0], shape[0]) @ coarse @ _cubic_matrix(coarse.shape[1], shape[1]).T


def _smooth_field(shape, rng, amplitude: float, knots: int = 4) -> np.ndarray:
    return _upsample(rng.normal(0.0, amplitude, size=(knots, knots)), shape)


# ------------------------------------------------------------------------------------------------- MRI slices


@functools.lru_cache(maxsize=1)
def _mni_views() -> dict:
    """For each view, (slices (n, rows, cols), brain masks) in display orientation (superior/anterior up), keeping
    slices whose brain area is at least 35 % of the view's largest."""
    from ..data.template import BRAIN_THRESHOLD, load_template

    t1 = load_template().t1  # (z, y, x): z inferior->superior, y posterior->anterior, x left->right
    views = {
        "axial": t1[:, ::-1, :],  # rows: anterior at the top
        "coronal": np.transpose(t1, (1, 0, 2))[:, ::-1, :],  # rows: superior at the top
        "sagittal": np.transpose(t1, (2, 0, 1))[:, ::-1, ::-1],  # rows: superior at the top, anterior on the left
    }
    out = {}
    for name, stack in views.items():
        masks = stack > BRAIN_THRESHOLD
        area = masks.sum(axis=(1, 2))
        keep = np.nonzero(area >= 0.35 * area.max())[0]
        out[name] = (np.ascontiguousarray(stack[keep], dtype=np.float32), masks[keep])
    return out


@functools.lru_cache(maxsize=1)
def _pydicom_mr() -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import binary_fill_holes, gaussian_filter, label

    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        raise InputError(
            "image source 'pydicom-mr' needs pydicom; run 'pip install pydicom' or drop that source"
        ) from None
    path = get_testdata_file("MR_small.dcm")
    if path is None:
        raise InputError(
            "pydicom's MR_small.dcm test file is missing; reinstall pydicom or drop the 'pydicom-mr' source"
        )
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    pixels /= np.percentile(pixels, 99.5)
    head = binary_fill_holes(gaussian_filter(pixels, 1.0) > 0.15)
    labels, count = label(head)
    if count > 1:
        head = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return np.clip(pixels, 0, 1.2), head


def mri_base(source: str, rng, shape):
    """A warped MRI slice (H, W) in [0, ~0.85], its anatomy mask, and where lesions may be centred."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    if source == "mni152":
        views = _mni_views()
        view = ("axial", "coronal", "sagittal")[int(rng.integers(3))]
        stack, masks = views[view]
        index = int(rng.integers(len(stack)))
        plane, brain = stack[index], masks[index]
        info = {"view": view, "slice": index}
    else:
        plane, brain = _pydicom_mr()
        info = {"view": "axial"}
    rows, cols = np.nonzero(brain)
    centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])
    extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
    side = extent * rng.uniform(1.08, 1.3)
    centre = centre + rng.uniform(-0.05, 0.05, size=2) * extent
    angle = np.deg2rad(rng.uniform(-15, 15))
    flip = bool(rng.random() < 0.5)
    coords = _sampling_coords(shape, centre, side, angle, flip, elastic=0.015 * max(shape), rng=rng)
    factor = side / max(shape)
    brain_p99 = np.percentile(plane[brain], 99)
    image = _sample(plane / brain_p99, coords, factor) * rng.uniform(0.7, 0.85)
    anatomy = _sample(brain.astype(np.float32), coords, factor) > 0.5
    # Tumours sit in parenchyma: eroded brain where the (smoothed) tissue is not CSF-dark.
    parenchyma = binary_erosion(anatomy, iterations=max(1, round(0.03 * max(shape)))) & (
        gaussian_filter(image, 1.5) > 0.35
    )
    if not parenchyma.any():
        parenchyma = anatomy
    info.update({"angle_deg": round(float(np.rad2deg(angle)), 2), "flip": flip, "fov": round(float(side), 1)})
    return image.astype(np.float32), anatomy, parenchyma, info


def mri_acquisition(image, anatomy, rng):
    """Scanner effects, applied after the lesion so that it goes through them too; returns RGB (H, W, 3)."""
    from scipy.ndimage import gaussian_filter

    out = image * np.exp(_smooth_field(image.shape, rng, 0.12))
    out = np.clip(out, 0.0, None) ** rng.uniform(0.75, 1.35)
    sigma = rng.uniform(0.005, 0.03)
    out = np.sqrt((out + rng.normal(0, sigma, out.shape)) ** 2 + rng.normal(0, sigma, out.shape) ** 2)
    if rng.random() < 0.3:
        out = gaussian_filter(out, rng.uniform(0.3, 0.7))
    gray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=2)


# ------------------------------------------------------------------------------------------------------ fundus


@functools.lru_cache(maxsize=1)
def _retina_pyramid() -> tuple[list, np.ndarray, float]:
    """The fundus photograph as float32 RGB at 1, 1/2, 1/4, ... resolution, its FOV centre and radius (level 0)."""
    from scipy.ndimage import gaussian_filter

    try:
        from skimage import data
    except ImportError:
        raise InputError(
            "image source 'retina' needs scikit-image (its data.retina() photograph); run 'pip install scikit-image'"
        ) from None
    try:
        photo = data.retina()
    except (
        OSError,
        ValueError,
        RuntimeError,
        ImportError,
    ) as exc:  # a build without the bundled file would download it
        raise InputError(
            f"scikit-image could not load its bundled retina image ({exc}); reinstall scikit-image"
        ) from None
    level = photo.astype(np.float32) / 255.0
    fov = level.mean(axis=2) > 0.06
    rows, cols = np.nonzero(fov)
    centre = np.array([rows.mean(), cols.mean()])
    radius = float(np.sqrt(fov.sum() / np.pi))
    levels = [level]
    while min(levels[-1].shape[:2]) > 96:
        smoothed = gaussian_filter(levels[-1], sigma=(1.0, 1.0, 0))
        levels.append(np.ascontiguousarray(smoothed[::2, ::2]))
    return levels, centre, radius


def fundus_base(rng, shape):
    levels, centre, radius = _retina_pyramid()
    zoom = rng.uniform(0.95, 1.1) if rng.random() < 0.5 else rng.uniform(1.3, 2.5)
    side = 2 * radius * 1.04 / zoom
    offset_r = radius * max(0.0, 1 - 1 / zoom) * 0.9 * np.sqrt(rng.random())
    offset_a = rng.uniform(0, 2 * np.pi)
    view_centre = centre + offset_r * np.array([np.sin(offset_a), np.cos(offset_a)])
    angle = rng.uniform(0, 2 * np.pi)
    flip = bool(rng.random() < 0.5)
    coords = _sampling_coords(shape, view_centre, side, angle, flip, elastic=0.008 * max(shape), rng=rng)
    factor = side / max(shape)
    level = 0
    while level + 1 < len(levels) and factor / 2 ** (level + 1) >= 1.0:
        level += 1
    scaled = coords / 2**level
    residual = factor / 2**level
    image = np.stack([_sample(levels[level][..., c], scaled, residual) for c in range(3)], axis=-1)
    distance = np.hypot(coords[0] - centre[0], coords[1] - centre[1])
    anatomy = distance < radius * 0.98
    allowed = distance < radius * 0.85
    info = {
        "view": "fundus",
        "zoom": round(float(zoom), 3),
        "angle_deg": round(float(np.rad2deg(angle)), 1),
        "flip": flip,
    }
    return np.clip(image, 0.0, 1.0).astype(np.float32), anatomy, allowed, info


def fundus_acquisition(image, anatomy, rng):
    from scipy.ndimage import gaussian_filter

    out = image.astype(np.float64)
    gains = rng.uniform(0.9, 1.1, size=3) * rng.uniform(0.8, 1.2)
    out = out * gains
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.8, 1.2)  # saturation
    mean = out[anatomy].mean() if anatomy.any() else out.mean()
    out = mean + (out - mean) * rng.uniform(0.8, 1.2)  # contrast
    out = np.clip(out, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    out *= np.exp(_smooth_field(image.shape[:2], rng, 0.08))[..., None]  # uneven illumination
    if rng.random() < 0.5:
        out = gaussian_filter(out, sigma=(rng.uniform(0.3, 0.6),) * 2 + (0,))
    out += rng.normal(0, rng.uniform(0.0, 0.02), out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
