"""Alpha blending of a watermark logo into a 2D image (MedLocker eq. 1-2), the default logo and logo loading.

Logo size (eq. 2). A logo of width M and height N is scaled, keeping its aspect ratio, by
``min(W / (sl*M), H / (sl*N))``: it is the largest logo that fits in a (W/sl) x (H/sl) box. A square logo on a
square image therefore gets side ``W / sl``; on any image its larger relative side is ``1/sl`` of the image's
(``sl`` = 4 in the paper). Sizes are rounded to whole pixels, at least 1.

Blending (eq. 1 with the logo's own transparency). With global transparency ``alpha`` in [0, 255] (the optimiser
searches [100, 255]), logo opacity ``A(p)`` in [0, 1] (its alpha channel, or its luminance when it has none) and
logo colour ``C(p)`` in [0, 1] (luminance for a grayscale image), every pixel p under the logo becomes

    a(p) = alpha/255 * A(p)
    I(p) = round((1 - a(p)) * I_ori(p) + a(p) * (L + (H - L) * C(p)))

where [L, H] is the image's intensity window: the pixel values shown as black and white. It is [0, 255] for
8-bit images and [0, 65535] for 16-bit photographs, but medical 16-bit images use a part of the range (a 12-bit
MR is 0..4095, a CT is windowed around soft tissue), and a logo painted at 65535 would be off their scale. The
classifiers see the same window: ``unit_view`` maps L..H to 0..1. Eq. 1 of the paper is the special case A = 1,
[L, H] = [0, 255]. Pixels outside the logo are untouched.

Coordinates: (x, y) is the logo's top-left pixel, x the column and y the row, origin at the image's top-left, and
the whole logo stays inside the image: 0 <= x <= W - w, 0 <= y <= H - h for a logo of w x h pixels.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: Scale factor of the paper's experiments (sec. 3): the logo spans a quarter of the image's width or height.
DEFAULT_SL = 4.0
#: Range of the global transparency in eq. 1; the optimiser's own search range is narrower (see optimizer.py).
ALPHA_LIMITS = (0.0, 255.0)
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
#: Rec. 601 luma weights: the conventional grey value of an RGB colour, also what PIL's "L" conversion uses.
LUMA = np.array([0.299, 0.587, 0.114])

Region = tuple[slice, slice]


# --- images ----------------------------------------------------------------------------------------------------


def check_image(image, name: str = "the image") -> np.ndarray:
    """``image`` as an array if MedLocker can watermark it (2D gray or RGB, 8 or 16 bit), else an InputError."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name} is a {type(image).__name__}, not a pixel array")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise InputError(
            f"{name} has shape {image.shape}; MedLocker needs one 2D image, grayscale (H, W) or RGB (H, W, 3), "
            "not a volume or a multi-channel array"
        )
    if image.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{name} has pixel type {image.dtype}; MedLocker works on 8- or 16-bit unsigned images (uint8, uint16), "
            "convert it first"
        )
    if min(image.shape[:2]) < 1:
        raise InputError(f"{name} is empty (shape {image.shape})")
    return image


def dtype_max(dtype) -> int:
    return int(np.iinfo(np.dtype(dtype)).max)


def check_window(window, dtype) -> tuple[int, int]:
    """The intensity window (low, high) as whole pixel values with 0 <= low < high <= the dtype's maximum;
    ``None`` is the dtype's full range."""
    top = dtype_max(dtype)
    if window is None:
        return 0, top
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"the intensity window must be two numbers (low, high), got {window!r}") from None
    if not (
        np.isfinite(low) and np.isfinite(high) and low == int(low) and high == int(high) and 0 <= low < high <= top
    ):
        raise InputError(
            f"the intensity window ({low:g}, {high:g}) must be whole pixel values with 0 <= low < high <= {top}"
        )
    return int(low), int(high)


def unit_view(pixels: np.ndarray, window=None) -> np.ndarray:
    """Channel-first float32 (C, H, W) in [0, 1]: the image as the classifiers see it, ``window`` mapped to 0..1."""
    pixels = np.asarray(pixels)
    low, high = check_window(window, pixels.dtype)
    planar = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    return np.clip((planar.astype(np.float32) - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


# --- logos -----------------------------------------------------------------------------------------------------


def as_rgba(logo) -> np.ndarray:
    """The logo as (h, w, 4) uint8 RGBA, the one form the rest of MedLocker (and its fingerprint) uses.

    Accepted: grayscale (h, w), gray+alpha (h, w, 2), RGB (h, w, 3), RGBA (h, w, 4); bool, uint8, uint16 (scaled
    to 8 bits) or float in [0, 1]. Without an alpha channel the luminance is the opacity, so a light mark on a
    black background shows only the mark.
    """
    logo = np.asarray(logo)
    if logo.ndim == 2:
        logo = logo[:, :, None]
    if logo.ndim != 3 or logo.shape[2] not in (1, 2, 3, 4) or min(logo.shape[:2]) < 1:
        raise InputError(f"the logo has shape {logo.shape}; give a 2D grayscale, gray+alpha, RGB or RGBA picture")
    logo = _to_uint8(logo)
    channels = logo.shape[2]
    if channels == 4:
        rgba = logo
    elif channels == 3:
        rgba = np.concatenate([logo, _luma8(logo)[:, :, None]], axis=2)
    elif channels == 2:
        rgba = np.concatenate([np.repeat(logo[:, :, :1], 3, axis=2), logo[:, :, 1:]], axis=2)
    else:
        rgba = np.repeat(logo, 4, axis=2)
    if not rgba[:, :, 3].any():
        raise InputError(
            "the logo is fully transparent (alpha 0, or black without an alpha channel); give a visible logo"
        )
    return np.ascontiguousarray(rgba)


def _to_uint8(logo: np.ndarray) -> np.ndarray:
    if logo.dtype == np.bool_:
        return logo.astype(np.uint8) * 255
    if logo.dtype == np.uint8:
        return logo
    if logo.dtype == np.uint16:
        return np.rint(logo / 257.0).astype(np.uint8)
    if np.issubdtype(logo.dtype, np.floating):
        if not np.isfinite(logo).all() or logo.min() < 0 or logo.max() > 1:
            raise InputError("a floating-point logo must hold values in [0, 1]; rescale it or save it as an 8-bit PNG")
        return np.rint(logo * 255.0).astype(np.uint8)
    raise InputError(f"the logo has pixel type {logo.dtype}; give an 8- or 16-bit picture")


def _luma8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb.astype(np.float64) @ LUMA), 0, 255).astype(np.uint8)


def logo_sha256(logo) -> str:
    """Fingerprint of a logo's pixels (after ``as_rgba``), so a key can tell whether it is given the right logo."""
    rgba = as_rgba(logo)
    digest = hashlib.sha256(f"rgba8:{rgba.shape[0]}x{rgba.shape[1]}:".encode())
    digest.update(rgba.tobytes())
    return digest.hexdigest()


def load_logo(path: str | os.PathLike) -> np.ndarray:
    """A user's logo picture (PNG with or without transparency, or any 2D format SimpleITK reads) as RGBA uint8."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"logo file {path} does not exist; give a PNG picture")
    try:
        picture = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"cannot read logo {path} ({reason[:160]}); give a PNG picture") from None
    if picture.GetDimension() != 2:
        raise InputError(f"logo {path} is {picture.GetDimension()}D; give a 2D picture")
    return as_rgba(sitk.GetArrayFromImage(picture))


#: Colours of the default mark: a mid-grey padlock on a near-black plate.
BADGE_PLATE_RGB = (12, 12, 16)
BADGE_GLYPH_RGB = (105, 105, 110)
#: Outline of the "outline" style's white padlock (dark blue).
OUTLINE_RGB = (18, 42, 96)
LOGO_STYLES = ("badge", "outline")


def default_logo(size: int = 256, style: str = "badge") -> np.ndarray:
    """MedLocker's own mark, RGBA uint8, ``size`` x ``size``.

    ``"badge"`` (the default): a grey padlock on an opaque near-black rounded plate. ``"outline"``: a white padlock
    outlined in dark blue with a see-through keyhole, transparent around it.

    Why the badge: classifiers trained to find lesions read a bright mark as one more lesion, so a white padlock
    flips "no lesion" images but can never hide a lesion; an opaque dark plate over a lesion reads as background.
    On the validation split (``bench/watermark_logo_ablation.py``) the badge raised ResNet18's white-box ASR with the
    paper's search settings from 63 % (outline) to 76 %.
    Drawn from signed distances (negative inside) so the edges are anti-aliased at any size.
    """
    if size < 16:
        raise InputError(f"logo size {size} is too small to draw a lock; use at least 16 pixels")
    if style not in LOGO_STYLES:
        raise InputError(f"unknown logo style {style!r}; use {' or '.join(LOGO_STYLES)}")
    s = float(size)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    mark = _padlock(rows, cols, s)
    fill = np.clip(0.5 - mark, 0.0, 1.0)
    if style == "badge":
        plate = np.clip(0.5 - _rounded_box(cols, rows, s / 2, s / 2, s / 2 - 1, s / 2 - 1, 0.12 * s), 0.0, 1.0)
        glyph, background = np.array(BADGE_GLYPH_RGB, dtype=np.float64), np.array(BADGE_PLATE_RGB, dtype=np.float64)
        color = fill[..., None] * glyph + (1.0 - fill[..., None]) * background
        rgba = np.concatenate([color, 255.0 * plate[..., None]], axis=2)
    else:
        covered = np.clip(0.5 - (mark - 0.035 * s), 0.0, 1.0)  # the mark grown by the outline width
        white, navy = np.array([255.0, 255.0, 255.0]), np.array(OUTLINE_RGB, dtype=np.float64)
        premultiplied = fill[..., None] * white + (covered - fill)[..., None] * navy
        color = np.divide(
            premultiplied, covered[..., None], out=np.zeros_like(premultiplied), where=covered[..., None] > 0
        )
        rgba = np.concatenate([color, 255.0 * covered[..., None]], axis=2)
    return np.clip(np.rint(rgba), 0, 255).astype(np.uint8)


def _padlock(rows, cols, s: float) -> np.ndarray:
    """Signed distance to a padlock (shackle + body, keyhole cut out) filling an s x s square."""
    cx = s / 2
    body = _rounded_box(cols, rows, cx, 0.68 * s, 0.33 * s, 0.22 * s, 0.05 * s)
    ring_row, radius, half_width = 0.42 * s, 0.21 * s, 0.065 * s
    arc = np.abs(np.hypot(cols - cx, rows - ring_row) - radius) - half_width
    legs = np.maximum(np.abs(np.abs(cols - cx) - radius) - half_width, rows - 0.68 * s)
    shackle = np.where(rows < ring_row, arc, legs)
    hole = np.minimum(
        np.hypot(cols - cx, rows - 0.63 * s) - 0.055 * s,
        _rounded_box(cols, rows, cx, 0.71 * s, 0.022 * s, 0.08 * s, 0.0),
    )
    return np.maximum(np.minimum(body, shackle), -hole)


def _rounded_box(cols, rows, cx, cy, half_w, half_h, corner):
    dx = np.abs(cols - cx) - (half_w - corner)
    dy = np.abs(rows - cy) - (half_h - corner)
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0) - corner


# --- size and placement ----------------------------------------------------------------------------------------


def fitted_size(image_shape, logo_shape, sl: float = DEFAULT_SL) -> tuple[int, int]:
    """(height, width) of the logo on an image of ``image_shape`` per eq. 2; InputError if it would not fit."""
    try:
        sl = float(sl)
    except (TypeError, ValueError):
        raise InputError(f"scale factor sl={sl!r} is not a number") from None
    if not np.isfinite(sl) or sl <= 0:
        raise InputError(f"scale factor sl={sl} must be a positive number (the paper uses {DEFAULT_SL:g})")
    height, width = int(image_shape[0]), int(image_shape[1])
    logo_h, logo_w = int(logo_shape[0]), int(logo_shape[1])
    factor = min(width / (sl * logo_w), height / (sl * logo_h))
    # floor(v + 0.5): round half up, and W/sl computed as W/(sl*M)*M lands back on W/sl despite float error.
    size = (max(1, int(np.floor(logo_h * factor + 0.5))), max(1, int(np.floor(logo_w * factor + 0.5))))
    if size[0] > height or size[1] > width:
        raise InputError(
            f"the logo ({size[0]}x{size[1]} px at sl={sl:g}) is larger than the image ({height}x{width}); use sl >= 1"
        )
    return size


def logo_region(x: int, y: int, size) -> Region:
    """The (rows, columns) slices covered by a logo of ``size`` = (h, w) with top-left (x, y)."""
    return slice(int(y), int(y) + int(size[0])), slice(int(x), int(x) + int(size[1]))


def position_limits(image_shape, size) -> tuple[int, int]:
    """Largest allowed (x, y) so that a logo of ``size`` = (h, w) lies wholly inside the image."""
    return int(image_shape[1]) - int(size[1]), int(image_shape[0]) - int(size[0])


def check_position(image_shape, size, x, y) -> tuple[int, int]:
    if size[0] > image_shape[0] or size[1] > image_shape[1]:
        raise InputError(
            f"the logo ({size[0]}x{size[1]} px) is larger than the image ({image_shape[0]}x{image_shape[1]})"
        )
    if not (_is_integral(x) and _is_integral(y)):
        raise InputError(f"logo position ({x}, {y}) must be whole pixels")
    x, y = int(x), int(y)
    max_x, max_y = position_limits(image_shape, size)
    if not (0 <= x <= max_x and 0 <= y <= max_y):
        raise InputError(
            f"logo position (x={x}, y={y}) puts the {size[1]}x{size[0]} logo outside the "
            f"{image_shape[1]}x{image_shape[0]} image; "
            f"use 0 <= x <= {max_x}, 0 <= y <= {max_y}"
        )
    return x, y


def _is_integral(value) -> bool:
    try:
        return float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        return False


def check_alpha(alpha) -> float:
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"transparency alpha={alpha!r} is not a number") from None
    if not (ALPHA_LIMITS[0] <= alpha <= ALPHA_LIMITS[1]):
        raise InputError(f"transparency alpha={alpha:g} is outside [0, 255]")
    return alpha


# --- blending --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedLogo:
    """A logo resized for one image size: opacity A in [0, 1] and premultiplied colour A*C in [0, 1]."""

    opacity: np.ndarray  # (h, w) float64
    premultiplied: np.ndarray  # (h, w, 3) float64

    @property
    def size(self) -> tuple[int, int]:
        return int(self.opacity.shape[0]), int(self.opacity.shape[1])

    def region(self, x: int, y: int) -> Region:
        return logo_region(x, y, self.size)


def fit_logo(logo, image_shape, sl: float = DEFAULT_SL) -> FittedLogo:
    """Resize ``logo`` for an image of ``image_shape`` (eq. 2), ready for ``blend``."""
    rgba = as_rgba(logo).astype(np.float64) / 255.0
    size = fitted_size(image_shape, rgba.shape, sl)
    # Premultiplied colour is what gets interpolated: resampling plain colour would bleed the (arbitrary) colour
    # of fully transparent pixels into the edges of the mark.
    opacity = rgba[:, :, 3]
    premultiplied = rgba[:, :, :3] * opacity[:, :, None]
    opacity = np.clip(_resize(opacity, size), 0.0, 1.0)
    premultiplied = np.stack([np.clip(_resize(premultiplied[:, :, c], size), 0.0, 1.0) for c in range(3)], axis=2)
    return FittedLogo(opacity, premultiplied)


def _resize(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling on pixel centres, Gaussian-smoothed first when shrinking so thin strokes do not alias."""
    if plane.shape == tuple(size):
        return plane.copy()
    from scipy import ndimage

    ratio = np.array(plane.shape, dtype=np.float64) / np.array(size, dtype=np.float64)
    sigma = np.maximum(0.0, (ratio - 1.0) / 2.0)
    if sigma.any():
        plane = ndimage.gaussian_filter(plane, sigma, mode="nearest")
    return ndimage.affine_transform(
        plane, ratio, offset=0.5 * ratio - 0.5, output_shape=tuple(size), order=1, mode="nearest"
    )


def blend_terms(fitted: FittedLogo, alpha: float, image_ndim: int, dtype, window=None) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with ``blended = round((1 - a) * original + b)`` over the logo region, broadcastable to the region."""
    weight = check_alpha(alpha) / 255.0
    low, high = check_window(window, dtype)
    a = weight * fitted.opacity
    b = (weight * low) * fitted.opacity[:, :, None] + weight * fitted.premultiplied * (high - low)
    if image_ndim == 2:
        return a, b @ LUMA
    return a[:, :, None], b


def composite(original: np.ndarray, a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    """Eq. 1 on a region: rounded to the nearest integer and kept inside the dtype's range."""
    values = (1.0 - a) * original.astype(np.float64) + b
    return np.clip(np.rint(values), 0, dtype_max(dtype)).astype(dtype)


def blend(image: np.ndarray, fitted: FittedLogo, alpha: float, x: int, y: int, window=None) -> np.ndarray:
    """A copy of ``image`` with the logo blended in at top-left (x, y); same dtype and shape as ``image``."""
    image = check_image(image)
    x, y = check_position(image.shape, fitted.size, x, y)
    a, b = blend_terms(fitted, alpha, image.ndim, image.dtype, window)
    out = image.copy()
    region = fitted.region(x, y)
    out[region] = composite(image[region], a, b, image.dtype)
    return out


def blend_batch(image: np.ndarray, fitted: FittedLogo, params, window=None) -> np.ndarray:
    """Render candidates ``params`` = (M, 3) rows of (alpha, x, y) into an (M, *image.shape) array."""
    image = check_image(image)
    params = np.asarray(params, dtype=np.float64).reshape(-1, 3)
    out = np.repeat(image[None], len(params), axis=0)
    for index, (alpha, x, y) in enumerate(params):
        x, y = check_position(image.shape, fitted.size, x, y)
        a, b = blend_terms(fitted, alpha, image.ndim, image.dtype, window)
        region = fitted.region(x, y)
        out[index][region] = composite(image[region], a, b, image.dtype)
    return out


def watermark(
    image: np.ndarray, logo, alpha: float, x: int, y: int, sl: float = DEFAULT_SL, window=None
) -> tuple[np.ndarray, Region]:
    """Fit ``logo`` to ``image`` with scale factor ``sl`` and blend it at (x, y); returns (image, region covered)."""
    image = check_image(image)
    fitted = fit_logo(logo, image.shape, sl)
    x, y = check_position(image.shape, fitted.size, x, y)
    return blend(image, fitted, alpha, x, y, window), fitted.region(x, y)
