"""Where a logo may go: lesion mask -> lesion boxes -> feasible logo positions (MedLocker sec. 2.2, "WSM").

Pipeline (paper steps 1-5): binary lesion mask -> dilation by a square kernel K(size, n_iter) so that nearby
specks join -> removal of connected regions whose area is at most ``min_area`` -> bounding boxes -> boxes whose IoU
exceeds ``gamma`` merged, repeatedly, until no pair does -> each box expanded up and left by the logo's width and
height. A logo whose top-left (x, y) lies outside an expanded box cannot overlap that lesion box (a logo whose
top-left lies inside overlaps it or touches its edge).

Placement modes:

``"keep-out"`` (clinical default; the paper's "WSM-out bbxs")  top-left outside every expanded box, so the logo
               never covers a lesion box. With no lesion, anywhere.
``"keep-in"``  (the paper's "WSM-in bbxs")  top-left inside an expanded box, so the logo sits on a lesion box.
``"wap"``      (watermark at arbitrary position)  anywhere the whole logo fits.

Boxes are (x, y, w, h) in pixels, x the column and y the row, covering columns [x, x+w) and rows [y, y+h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from ..errors import InputError

MODES = ("keep-out", "keep-in", "wap")
DEFAULT_MODE = "keep-out"
_MODE_ALIASES = {"wsm-out": "keep-out", "wsm-in": "keep-in"}

#: The paper chose its mask parameters (sec. 3: K(10, 10), area 5e4, gamma 0.5) on IDRiD photographs of
#: 4288 x 2848 pixels; ``MaskParams.for_image`` scales them to other image sizes.
PAPER_IMAGE_SHAPE = (2848, 4288)
PAPER_KERNEL = 10
PAPER_ITERATIONS = 10
PAPER_MIN_AREA = 50_000
PAPER_GAMMA = 0.5
#: A lesion mask with more separate regions than this is noise, not lesions.
MAX_LESION_BOXES = 256


class Box(NamedTuple):
    x: int
    y: int
    w: int
    h: int

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def area(self) -> int:
        return self.w * self.h

    def intersection(self, other: Box) -> int:
        return max(0, min(self.x1, other.x1) - max(self.x, other.x)) * max(
            0, min(self.y1, other.y1) - max(self.y, other.y)
        )

    def iou(self, other: Box) -> float:
        inter = self.intersection(other)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def union(self, other: Box) -> Box:
        x, y = min(self.x, other.x), min(self.y, other.y)
        return Box(x, y, max(self.x1, other.x1) - x, max(self.y1, other.y1) - y)

    def contains(self, x, y):
        """Whether pixel(s) (x, y) lie in the box; works elementwise on arrays."""
        return (self.x <= x) & (x < self.x1) & (self.y <= y) & (y < self.y1)


@dataclass(frozen=True)
class MaskParams:
    """Mask-to-box parameters: square kernel side, dilation iterations, minimum region area (px), IoU to merge."""

    kernel: int = PAPER_KERNEL
    iterations: int = PAPER_ITERATIONS
    min_area: int = PAPER_MIN_AREA
    gamma: float = PAPER_GAMMA

    @classmethod
    def for_image(cls, shape) -> MaskParams:
        """The paper's parameters scaled from its 4288 x 2848 photographs to an image of ``shape``.

        Lengths (kernel) scale with the square root of the pixel count, areas with the pixel count; the
        iteration count and gamma are kept.
        """
        scale = float(np.sqrt(shape[0] * shape[1] / (PAPER_IMAGE_SHAPE[0] * PAPER_IMAGE_SHAPE[1])))
        kernel = max(1, int(round(1 + (PAPER_KERNEL - 1) * scale)))
        return cls(
            kernel=kernel,
            iterations=PAPER_ITERATIONS,
            min_area=int(round(PAPER_MIN_AREA * scale**2)),
            gamma=PAPER_GAMMA,
        )

    @property
    def dilation_side(self) -> int:
        """Side of the one square that dilates as much as ``iterations`` dilations by a ``kernel`` square."""
        return self.iterations * (self.kernel - 1) + 1


def check_mask(mask, image_shape=None) -> np.ndarray:
    """The lesion mask as a 2D bool array (nonzero = lesion), or an InputError."""
    if not isinstance(mask, np.ndarray):
        raise InputError(f"the lesion mask is a {type(mask).__name__}, not a pixel array")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise InputError(f"the lesion mask has shape {mask.shape}; give one 2D mask (H, W) for the image")
    if image_shape is not None and tuple(mask.shape) != tuple(image_shape[:2]):
        raise InputError(
            f"the lesion mask is {mask.shape[0]}x{mask.shape[1]} but the image is {image_shape[0]}x{image_shape[1]}; "
            "give the mask of this image"
        )
    return mask != 0


def lesion_boxes(mask, params: MaskParams | None = None) -> list[Box]:
    """Steps 2-4: dilate, drop small regions, box, merge. ``params`` default: the paper's, scaled to the mask."""
    from scipy import ndimage

    mask = check_mask(mask)
    params = params or MaskParams.for_image(mask.shape)
    if params.kernel < 1 or params.iterations < 0 or params.min_area < 0 or not (0.0 <= params.gamma <= 1.0):
        raise InputError(
            f"invalid mask parameters {params}: kernel >= 1, iterations >= 0, min_area >= 0, 0 <= gamma <= 1"
        )
    if not mask.any():
        return []
    side = params.dilation_side
    # Repeated dilation by a k x k square equals one dilation by an (n(k-1)+1) square (Minkowski sums of
    # squares), and maximum_filter does that in separable passes: fast even at the paper's 4288 x 2848.
    grown = ndimage.maximum_filter(mask, size=side, mode="constant", cval=False) if side > 1 else mask
    labels, count = ndimage.label(grown, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    kept = int((areas[1:] > params.min_area).sum())
    if kept > MAX_LESION_BOXES:
        # Merging is quadratic in the boxes per pass; a speckled mask would keep the search from ever starting.
        raise InputError(
            f"the lesion mask has {kept} separate regions (at most {MAX_LESION_BOXES}); "
            "raise min_area or the dilation (kernel, iterations), or send a cleaner mask"
        )
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is not None and areas[index] > params.min_area:
            rows, cols = found
            boxes.append(Box(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start))
    return merge_boxes(boxes, params.gamma)


def merge_boxes(boxes: Sequence[Box], gamma: float = PAPER_GAMMA) -> list[Box]:
    """Replace any two boxes with IoU > ``gamma`` by their bounding box until no such pair is left.

    The paper's eq. 7 prints the merged box as (min x, min y, max w, max w), which need not cover either box; the
    text and Fig. 3 mean the box around both, which is what is used here.
    """
    boxes = [Box(*map(int, b)) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if boxes[i].iou(boxes[j]) > gamma:
                    boxes[i] = boxes[i].union(boxes.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(boxes)


def expand_box(box: Box, logo_size) -> Box:
    """Step 5: the box grown up by the logo's height and left by its width (clipped at the image's top-left)."""
    logo_h, logo_w = int(logo_size[0]), int(logo_size[1])
    x, y = max(0, box.x - logo_w), max(0, box.y - logo_h)
    return Box(x, y, box.x1 - x, box.y1 - y)


def normalize_mode(mode: str) -> str:
    key = str(mode).strip().lower().replace("_", "-")
    key = _MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise InputError(f"unknown placement mode {mode!r}; use one of {', '.join(MODES)}")
    return key


class Placement:
    """The set of feasible logo top-left positions for one image, logo size and mode.

    The position range [0, W-w] x [0, H-h] is cut by the expanded boxes' edges into a few rectangular cells that
    are each wholly feasible or not; sampling and projection work on those cells, so both are exact (uniform over
    the feasible positions; nearest feasible position) without enumerating pixels.
    """

    def __init__(self, mode: str, image_shape, logo_size, lesions: Sequence[Box] = ()):
        self.mode = normalize_mode(mode)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.logo_size = (int(logo_size[0]), int(logo_size[1]))
        if (
            self.logo_size[0] > self.image_shape[0]
            or self.logo_size[1] > self.image_shape[1]
            or min(self.logo_size) < 1
        ):
            raise InputError(
                f"the logo ({self.logo_size[0]}x{self.logo_size[1]} px) does not fit in the image "
                f"({self.image_shape[0]}x{self.image_shape[1]})"
            )
        self.lesions = tuple(Box(*map(int, b)) for b in lesions) if self.mode != "wap" else ()
        self.expanded = tuple(expand_box(b, self.logo_size) for b in self.lesions)
        self.max_x = self.image_shape[1] - self.logo_size[1]
        self.max_y = self.image_shape[0] - self.logo_size[0]
        if self.mode == "keep-in" and not self.lesions:
            raise InputError("no lesion found in the mask; use keep-out or wap placement")
        self._cells = self._feasible_cells()
        if len(self._cells) == 0:
            raise InputError(
                f"the lesion boxes leave no room for the {self.logo_size[1]}x{self.logo_size[0]} logo outside them; "
                "use a larger sl (smaller logo), keep-in or wap placement"
            )

    @classmethod
    def from_mask(cls, mode: str, mask, logo_size, params: MaskParams | None = None) -> Placement:
        """Placement for an image whose lesion mask is ``mask`` (same height and width); ``mask`` unused for "wap"."""
        mode = normalize_mode(mode)
        mask = check_mask(mask)
        return cls(mode, mask.shape, logo_size, lesion_boxes(mask, params) if mode != "wap" else ())

    def _inside_expanded(self, x, y):
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        for box in self.expanded:
            inside |= box.contains(x, y)
        return inside

    def _feasible_cells(self) -> np.ndarray:
        edges_x = {0, self.max_x + 1} | {v for b in self.expanded for v in (b.x, b.x1)}
        edges_y = {0, self.max_y + 1} | {v for b in self.expanded for v in (b.y, b.y1)}
        xs = np.unique(np.clip(sorted(edges_x), 0, self.max_x + 1))
        ys = np.unique(np.clip(sorted(edges_y), 0, self.max_y + 1))
        x0, y0 = np.meshgrid(xs[:-1], ys[:-1], indexing="ij")
        x1, y1 = np.meshgrid(xs[1:], ys[1:], indexing="ij")
        inside = self._inside_expanded(x0, y0)
        keep = {"wap": np.ones_like(inside), "keep-out": ~inside, "keep-in": inside}[self.mode]
        return np.stack([x0[keep], x1[keep], y0[keep], y1[keep]], axis=1).astype(np.int64)

    @property
    def count(self) -> int:
        """Number of feasible top-left positions."""
        cells = self._cells
        return int(((cells[:, 1] - cells[:, 0]) * (cells[:, 3] - cells[:, 2])).sum())

    def feasible(self, x, y) -> np.ndarray:
        """Whether top-left position(s) (x, y) are allowed; elementwise on arrays."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = (x == np.round(x)) & (y == np.round(y)) & (0 <= x) & (x <= self.max_x) & (0 <= y) & (y <= self.max_y)
        if self.mode == "keep-out":
            ok &= ~self._inside_expanded(x, y)
        elif self.mode == "keep-in":
            ok &= self._inside_expanded(x, y)
        return ok

    def overlaps_lesion(self, x, y) -> np.ndarray:
        """Whether a logo with top-left (x, y) covers any pixel of a lesion box; elementwise on arrays."""
        x, y = np.asarray(x), np.asarray(y)
        hit = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        h, w = self.logo_size
        for box in self.lesions:
            hit |= (x < box.x1) & (box.x < x + w) & (y < box.y1) & (box.y < y + h)
        return hit

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` positions (x, y) drawn uniformly from the feasible ones, as an int64 (count, 2) array."""
        cells = self._cells
        areas = ((cells[:, 1] - cells[:, 0]) * (cells[:, 3] - cells[:, 2])).astype(np.float64)
        picked = cells[rng.choice(len(cells), size=count, p=areas / areas.sum())]
        xs = rng.integers(picked[:, 0], picked[:, 1])
        ys = rng.integers(picked[:, 2], picked[:, 3])
        return np.stack([xs, ys], axis=1).astype(np.int64)

    def project(self, positions) -> np.ndarray:
        """The feasible position nearest (Euclidean) to each row of ``positions`` (n, 2) = (x, y), rounded first."""
        points = np.rint(np.asarray(positions, dtype=np.float64).reshape(-1, 2))
        cells = self._cells.astype(np.float64)
        cx = np.clip(points[:, :1], cells[None, :, 0], cells[None, :, 1] - 1)
        cy = np.clip(points[:, 1:], cells[None, :, 2], cells[None, :, 3] - 1)
        nearest = np.argmin((cx - points[:, :1]) ** 2 + (cy - points[:, 1:]) ** 2, axis=1)
        rows = np.arange(len(points))
        return np.stack([cx[rows, nearest], cy[rows, nearest]], axis=1).astype(np.int64)
