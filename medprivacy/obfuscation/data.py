"""Seeded 2D frames for ObfuscationPrivacy: synthetic coronary angiograms (the task) and fundus crops (a second domain).

No coronary angiography ships offline, so the frames are synthetic, drawn the way an X-ray angiogram forms:

``angio``   a textured chest background (heart shadow, diaphragm, rib and spine bands, lung texture, vignetting)
            attenuated by contrast-filled vessels, ``I = B · exp(-mu · c · chord)``, where ``chord`` is the
            length of the X-ray path through each vessel (a tube of tapering radius around a smooth centreline)
            and ``c`` the contrast filling; then quantum noise (standard deviation growing with sqrt(I)) and a
            slight detector blur. Vessel trees are one of two **views** (the label, :data:`VIEWS`):
            ``LCA`` - left main, then a long LAD with diagonal and septal branches and a curving LCx with obtuse
            marginals; ``RCA`` - one C-shaped artery with conus, acute-marginal and distal (PDA / PLV) branches.
            Each tree gets a random pose (rotation, scale, shift), curvature, branch count, radii and a guiding
            catheter ending at the ostium. Independently, half the frames carry a **stenosis** (a 50-85 %
            narrowing of a main segment), the second label, so a harder, finer task is available too.
            ``render_run`` draws a whole run (2D + time) of one tree: cardiac motion (contraction and twist),
            breathing drift, contrast wash-in and wash-out, fresh noise per frame.
``fundus``  scikit-image's ``data.retina()`` fundus photograph (CC0, real), green channel (where vessels show
            best): random zoomed crops inside the field of view, any rotation, flips, gain, gamma and noise.

Frames are float32 (H, W) in [0, 1], dark vessels on a brighter background in both domains. Everything comes from
one integer seed (``numpy.random.default_rng([data_seed, seed, stream])``); the view label is the seed's parity and
the stenosis label the parity of ``seed // 2``, so any run of four consecutive seeds holds every combination once.
Train, validation and held-out test draw from disjoint seed ranges (:data:`SPLIT_SEED_BASES`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .vessel_trees import Vessel, add_stenosis, catheter, left_tree, right_tree

DOMAINS = ("angio", "fundus")
VIEWS = ("LCA", "RCA")
STENOSIS = ("no stenosis", "stenosis")
TASKS = {"view": VIEWS, "stenosis": STENOSIS}
SPLITS = ("train", "validation", "test")
SPLIT_SEED_BASES = {"train": 1_000, "validation": 500_000, "test": 900_000}
SPLIT_CAPACITY = 99_000
DEFAULT_SIZE = 64
#: Frames are drawn at this multiple of the output size and averaged down, so thin vessels are anti-aliased.
SUPERSAMPLE = 2


@dataclass
class Frame:
    """One rendered frame: ``image`` (H, W) float32 in [0, 1]; ``vessels`` (H, W) bool, where the X-ray path
    through contrast-filled vessels is at least a fifth of a pixel (angiograms only, else None)."""

    image: np.ndarray
    labels: dict
    domain: str
    seed: int
    vessels: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@dataclass
class FrameSet:
    """A split as arrays: ``images`` (N, H, W) float32 in [0, 1], ``labels`` {task: (N,) int64}."""

    images: np.ndarray
    labels: dict
    seeds: np.ndarray
    domain: str
    split: str

    def __len__(self) -> int:
        return len(self.images)


def split_seeds(split: str, count: int, start: int = 0) -> np.ndarray:
    if split not in SPLIT_SEED_BASES:
        raise InputError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
    if count < 0 or start < 0 or start + count > SPLIT_CAPACITY:
        raise InputError(f"split {split!r} holds at most {SPLIT_CAPACITY} frames; asked for {start}..{start + count}")
    return SPLIT_SEED_BASES[split] + start + np.arange(count, dtype=np.int64)


def labels_of(seed: int) -> dict:
    return {"view": int(seed) % 2, "stenosis": (int(seed) // 2) % 2}


def make_split(
    domain: str, split: str, count: int, size: int = DEFAULT_SIZE, data_seed: int = 0, start: int = 0
) -> FrameSet:
    """Render ``count`` frames of ``domain`` from ``split``'s seeds."""
    if domain not in DOMAINS:
        raise InputError(f"unknown image domain {domain!r}; use {' or '.join(DOMAINS)}")
    seeds = split_seeds(split, count, start)
    images = np.zeros((count, size, size), dtype=np.float32)
    labels = {task: np.zeros(count, dtype=np.int64) for task in TASKS}
    render = render_angio if domain == "angio" else render_fundus
    for i, seed in enumerate(seeds):
        frame = render(int(seed), size, data_seed)
        images[i] = frame.image
        for task in TASKS:
            labels[task][i] = frame.labels.get(task, 0)
    return FrameSet(images, labels, seeds, domain, split)


@dataclass
class _Tree:
    vessels: list
    view: int
    info: dict


def _tree(seed: int, data_seed: int) -> _Tree:
    labels = labels_of(seed)
    rng = np.random.default_rng([data_seed, seed, 1])
    main, side = (left_tree if labels["view"] == 0 else right_tree)(rng)
    info = {"view": VIEWS[labels["view"]], "branches": len(side)}
    if labels["stenosis"]:
        info.update(add_stenosis(rng, main[int(rng.integers(len(main)))]))
    vessels = main + side + [catheter(rng, main[0].points[0])]
    # Pose: rotation, scale and shift of the whole tree about the image centre.
    angle = np.deg2rad(rng.uniform(-25, 25))
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.08, 0.08, 2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for vessel in vessels:
        vessel.points = (vessel.points - 0.5) @ rotation.T * scale + 0.5 + shift
        vessel.radii = vessel.radii * scale
    info.update({"angle_deg": round(float(np.rad2deg(angle)), 1), "scale": round(float(scale), 3)})
    return _Tree(vessels, labels["view"], info)


def _chord_map(vessels: list[Vessel], size: int, contrast: float, motion: np.ndarray | None = None) -> np.ndarray:
    """Sum over vessels of attenuation x the X-ray path length through the vessel (pixels of the ``size`` grid).

    Within one vessel the chord is the maximum over its segments (joints must not count twice); different vessels
    add up where they cross, as overlapping contrast does on a real angiogram. ``motion`` is a 2x3 affine applied
    to the centrelines first (cardiac motion)."""
    total = np.zeros(size * size)
    for vessel in vessels:
        points = vessel.points
        if motion is not None:
            points = points @ motion[:, :2].T + motion[:, 2]
        points = points * size
        radii = vessel.radii * size
        a, b = points[:-1], points[1:]
        ra, rb = radii[:-1], radii[1:]
        # Each segment only reaches the pixels of a small window around it: evaluate all segments on windows of
        # one common side at once, then keep the largest chord per pixel (np.maximum.at) within the vessel.
        corner = np.floor(np.minimum(a, b) - np.maximum(ra, rb)[:, None] - 1.0).astype(np.int64)
        side = int(np.ceil((np.abs(b - a) + 2 * np.maximum(ra, rb)[:, None] + 3.0).max()))
        offsets = np.arange(side)
        xs = corner[:, 0, None, None] + offsets[None, None, :]  # (segments, 1, side)
        ys = corner[:, 1, None, None] + offsets[None, :, None]  # (segments, side, 1)
        ab = b - a
        length2 = np.maximum((ab**2).sum(axis=1), 1e-12)[:, None, None]
        px, py = xs + 0.5 - a[:, 0, None, None], ys + 0.5 - a[:, 1, None, None]
        t = np.clip((px * ab[:, 0, None, None] + py * ab[:, 1, None, None]) / length2, 0.0, 1.0)
        d2 = (px - t * ab[:, 0, None, None]) ** 2 + (py - t * ab[:, 1, None, None]) ** 2
        r = ra[:, None, None] + t * (rb - ra)[:, None, None]
        chord = 2.0 * np.sqrt(np.maximum(r**2 - d2, 0.0))
        xs, ys = np.broadcast_to(xs, chord.shape), np.broadcast_to(ys, chord.shape)
        keep = (chord > 0) & (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
        if not keep.any():
            continue
        canvas = np.zeros(size * size)
        np.maximum.at(canvas, ys[keep] * size + xs[keep], chord[keep])
        weight = vessel.attenuation if vessel.name == "catheter" else vessel.attenuation * contrast
        total += weight * canvas
    return total.reshape(size, size)


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    from scipy.ndimage import zoom

    return zoom(coarse, size / coarse.shape[0], order=3, mode="nearest")[:size, :size]


def _background(rng, size: int) -> np.ndarray:
    """Chest background in [0.35, 0.95]: heart shadow, diaphragm, rib and spine bands, lung texture, vignetting."""
    from scipy.ndimage import gaussian_filter

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / size
    image = np.full((size, size), rng.uniform(0.62, 0.82))
    centre = np.array([rng.uniform(0.45, 0.7), rng.uniform(0.5, 0.75)])
    radii = rng.uniform(0.3, 0.45, 2)
    heart = np.hypot((xs - centre[0]) / radii[0], (ys - centre[1]) / radii[1])
    image -= rng.uniform(0.04, 0.12) / (1.0 + np.exp((heart - 1.0) / 0.08))
    dome = rng.uniform(0.75, 1.0) + rng.uniform(0.1, 0.3) * (xs - rng.uniform(0.3, 0.7)) ** 2
    image -= rng.uniform(0.08, 0.2) / (1.0 + np.exp(-(ys - dome) / 0.03))
    angle = rng.uniform(-0.6, 0.6)
    along = ys * np.cos(angle) + xs * np.sin(angle)
    ribs = np.sin(2 * np.pi * along * rng.uniform(3.0, 5.0) + rng.uniform(0, 2 * np.pi))
    image -= rng.uniform(0.01, 0.05) * np.clip(ribs, 0, None) ** 2
    spine = np.exp(-(((xs - rng.uniform(0.1, 0.35)) / rng.uniform(0.05, 0.1)) ** 2))
    image -= rng.uniform(0.0, 0.08) * spine
    texture = gaussian_filter(rng.normal(size=(size, size)), rng.uniform(1.0, 2.5) * size / 128)
    image += rng.uniform(0.01, 0.03) * texture / (texture.std() + 1e-8)
    image += _upsample(rng.normal(0.0, rng.uniform(0.01, 0.03), (4, 4)), size)
    image *= 1.0 - rng.uniform(0.0, 0.2) * (np.hypot(xs - 0.5, ys - 0.5) / 0.707) ** 2
    return np.clip(image, 0.35, 0.95)


def _acquire(
    background: np.ndarray, chord: np.ndarray, mu: float, noise: float, blur: float, rng, size: int
) -> np.ndarray:
    """Attenuate, average the supersampled grid down to ``size``, add quantum noise and detector blur."""
    from scipy.ndimage import gaussian_filter

    image = background * np.exp(-mu * chord)
    factor = image.shape[0] // size
    image = image.reshape(size, factor, size, factor).mean(axis=(1, 3))
    image = image + rng.normal(0.0, 1.0, image.shape) * noise * np.sqrt(np.clip(image, 0.0, None))
    if blur > 0:
        image = gaussian_filter(image, blur)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _motion(phase: float, twist: float, drift) -> np.ndarray:
    """Cardiac motion at ``phase`` in [0, 1): contraction towards the heart centre and a small twist, plus drift."""
    squeeze = 1.0 - 0.07 * np.sin(np.pi * phase) ** 2
    angle = twist * np.sin(2 * np.pi * phase)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * squeeze
    centre = np.array([0.55, 0.6])
    return np.concatenate([rotation, (centre - rotation @ centre + np.asarray(drift))[:, None]], axis=1)


def _vessel_scale(size: int) -> float:
    # mu is per pixel of chord at the rendered size; chords scale with the size, so mu scales inversely.
    return 64.0 / size


def render_angio(seed: int, size: int = DEFAULT_SIZE, data_seed: int = 0) -> Frame:
    """One angiography frame: a random cardiac phase and contrast filling of the tree of ``seed``."""
    tree = _tree(seed, data_seed)
    rng = np.random.default_rng([data_seed, seed, 2])
    big = size * SUPERSAMPLE
    phase, contrast = rng.uniform(0, 1), rng.uniform(0.6, 1.0)
    motion = _motion(phase, rng.uniform(-0.05, 0.05), rng.uniform(-0.02, 0.02, 2))
    chord = _chord_map(tree.vessels, big, contrast, motion)
    mu = rng.uniform(0.22, 0.32) * _vessel_scale(big)
    acquisition = np.random.default_rng([data_seed, seed, 3])
    background = _background(acquisition, big)
    image = _acquire(
        background, chord, mu, acquisition.uniform(0.012, 0.03), acquisition.uniform(0.3, 0.6), acquisition, size
    )
    vessels = chord.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)) >= 0.2 * SUPERSAMPLE
    info = dict(tree.info, phase=round(float(phase), 3), contrast=round(float(contrast), 3))
    return Frame(image, labels_of(seed), "angio", int(seed), vessels, info)


def render_run(seed: int, frames: int = 12, size: int = DEFAULT_SIZE, data_seed: int = 0) -> np.ndarray:
    """A whole angiography run of the tree of ``seed``: (frames, size, size) float32 in [0, 1], about one and a half
    heartbeats with contrast washing in over the first third and out over the last, breathing drift, fresh noise."""
    if frames < 1:
        raise InputError(f"a run needs at least one frame (got {frames})")
    tree = _tree(seed, data_seed)
    rng = np.random.default_rng([data_seed, seed, 4])
    big = size * SUPERSAMPLE
    background = _background(np.random.default_rng([data_seed, seed, 3]), big)
    mu = rng.uniform(0.22, 0.32) * _vessel_scale(big)
    twist, phase0, beats = rng.uniform(-0.05, 0.05), rng.uniform(0, 1), rng.uniform(1.2, 1.8)
    drift = rng.uniform(-0.02, 0.02, 2)
    out = np.zeros((frames, size, size), dtype=np.float32)
    for t in range(frames):
        progress = t / max(1, frames - 1)
        contrast = float(np.clip(min(progress / 0.3, (1.0 - progress) / 0.35 + 0.3, 1.0), 0.05, 1.0))
        motion = _motion((phase0 + beats * progress) % 1.0, twist, drift * progress)
        shift = np.round(drift * progress * big).astype(int)
        moved = np.roll(background, (int(shift[1]), int(shift[0])), axis=(0, 1))
        chord = _chord_map(tree.vessels, big, contrast, motion)
        out[t] = _acquire(moved, chord, mu, 0.02, 0.4, rng, size)
    return out


# ------------------------------------------------------------------------------------------------------ fundus


@functools.lru_cache(maxsize=1)
def _retina() -> tuple[np.ndarray, np.ndarray, float]:
    """The fundus photograph's green channel (float32 [0, 1]), its field-of-view centre (row, col) and radius."""
    try:
        from skimage import data
    except ImportError:
        raise InputError(
            "the fundus domain needs scikit-image (its data.retina() photograph); run 'pip install scikit-image'"
        ) from None
    try:
        photo = data.retina()
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise InputError(
            f"scikit-image could not load its bundled retina image ({exc}); reinstall scikit-image"
        ) from None
    green = photo[..., 1].astype(np.float32) / 255.0
    fov = photo.astype(np.float32).mean(axis=2) / 255.0 > 0.06
    rows, cols = np.nonzero(fov)
    return green, np.array([rows.mean(), cols.mean()]), float(np.sqrt(fov.sum() / np.pi))


def render_fundus(seed: int, size: int = DEFAULT_SIZE, data_seed: int = 0) -> Frame:
    """A zoomed crop of the real fundus photograph (a quarter to a half of the field of view across)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    green, centre, radius = _retina()
    rng = np.random.default_rng([data_seed, seed, 5])
    side = 2 * radius * rng.uniform(0.25, 0.5)
    offset = radius * 0.55 * np.sqrt(rng.random())
    direction = rng.uniform(0, 2 * np.pi)
    view_centre = centre + offset * np.array([np.sin(direction), np.cos(direction)])
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    v = (rows + 0.5 - size / 2) * side / size
    u = (cols + 0.5 - size / 2) * side / size
    if rng.random() < 0.5:
        u = -u
    coords = np.stack(
        [view_centre[0] + np.cos(angle) * v - np.sin(angle) * u, view_centre[1] + np.sin(angle) * v + np.cos(angle) * u]
    )
    factor = side / size
    source = gaussian_filter(green, 0.5 * (factor - 1.0) + 0.3) if factor > 1.05 else green
    image = map_coordinates(source, coords, order=1, mode="constant", cval=0.0)
    image = np.clip(image * rng.uniform(1.2, 1.8), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.02), image.shape)
    info = {"view": "fundus", "field_px": round(float(side), 1), "angle_deg": round(float(np.rad2deg(angle)), 1)}
    return Frame(np.clip(image, 0.0, 1.0).astype(np.float32), {}, "fundus", int(seed), None, info)
