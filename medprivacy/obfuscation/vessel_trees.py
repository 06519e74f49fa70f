"""Vessel trees of the synthetic coronary angiograms (:mod:`medprivacy.obfuscation.data`): smooth centrelines with
tapering radii in normalised [0, 1] image coordinates (y down), the two views' trees (LCA, RCA), the guiding catheter
and the stenosis that narrows a main segment. Geometry only: :mod:`.data` poses and renders the trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Vessel:
    points: np.ndarray  # (M, 2) (x, y), normalised [0, 1] coordinates, y down
    radii: np.ndarray  # (M,) normalised
    attenuation: float = 1.0  # relative to contrast-filled vessels (the catheter is denser and always visible)
    name: str = ""


def _smooth_noise(rng, count: int, knots: int = 5) -> np.ndarray:
    """A smooth random profile of ``count`` samples with unit-ish amplitude."""
    coarse = rng.normal(0.0, 1.0, knots)
    return np.interp(np.linspace(0, knots - 1, count), np.arange(knots), coarse)


def _path(
    rng,
    start,
    heading: float,
    length: float,
    curvature: float,
    r0: float,
    r1: float,
    wobble: float = 1.5,
    step: float = 0.01,
    name: str = "",
) -> Vessel:
    """A centreline from ``start`` with initial ``heading`` (radians; 0 = +x, pi/2 = +y which is down), bending by
    ``curvature`` (radians per unit length) plus a smooth random part, radius tapering from r0 to r1."""
    count = max(3, int(round(length / step)) + 1)
    bend = (curvature + wobble * _smooth_noise(rng, count)) * step
    angles = heading + np.concatenate([[0.0], np.cumsum(bend[:-1])])
    steps = np.stack([np.cos(angles), np.sin(angles)], axis=1) * step
    points = np.asarray(start, dtype=np.float64) + np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], axis=0)])
    radii = np.linspace(r0, r1, count) * (1.0 + 0.08 * _smooth_noise(rng, count))
    return Vessel(points, radii, name=name)


def _heading_at(vessel: Vessel, index: int) -> float:
    index = int(np.clip(index, 1, len(vessel.points) - 1))
    dx, dy = vessel.points[index] - vessel.points[index - 1]
    return float(np.arctan2(dy, dx))


def _branches(rng, parent: Vessel, count: int, positions, side: float, angle, length, ratio, name: str) -> list[Vessel]:
    """``count`` side branches leaving ``parent`` at relative ``positions`` (low, high) towards ``side`` (+1 turns
    clockwise on screen, -1 anticlockwise) at an ``angle`` (low, high, degrees)."""
    out = []
    for _ in range(count):
        index = int(rng.uniform(*positions) * (len(parent.points) - 1))
        heading = _heading_at(parent, index) + side * np.deg2rad(rng.uniform(*angle))
        radius = parent.radii[index] * rng.uniform(*ratio)
        out.append(
            _path(
                rng,
                parent.points[index],
                heading,
                rng.uniform(*length),
                side * rng.uniform(0.0, 2.0),
                radius,
                radius * 0.45,
                wobble=2.0,
                name=name,
            )
        )
    return out


def catheter(rng, ostium) -> Vessel:
    """The guiding catheter: from the ostium up and out of the field of view through the aortic root."""
    vessel = _path(
        rng,
        ostium,
        np.deg2rad(rng.uniform(-120, -75)),
        0.6,
        rng.uniform(-1.0, 1.0),
        0.009,
        0.009,
        wobble=0.8,
        name="catheter",
    )
    vessel.attenuation = rng.uniform(1.3, 1.8)
    return vessel


def left_tree(rng) -> tuple[list[Vessel], list[Vessel]]:
    """LCA: left main, LAD (diagonals to the right, septals to the left), LCx (obtuse marginals)."""
    ostium = np.array([rng.uniform(0.22, 0.38), rng.uniform(0.22, 0.38)])
    left_main = _path(
        rng,
        ostium,
        np.deg2rad(rng.uniform(5, 35)),
        rng.uniform(0.05, 0.1),
        0.0,
        0.024,
        0.022,
        wobble=0.5,
        name="left main",
    )
    fork = left_main.points[-1]
    lad = _path(
        rng,
        fork,
        np.deg2rad(rng.uniform(40, 70)),
        rng.uniform(0.55, 0.72),
        rng.uniform(-0.6, 0.6),
        0.02,
        0.007,
        name="LAD",
    )
    lcx = _path(
        rng,
        fork,
        np.deg2rad(rng.uniform(105, 140)),
        rng.uniform(0.35, 0.5),
        rng.uniform(-1.5, 0.5),
        0.018,
        0.008,
        name="LCx",
    )
    side = [
        *_branches(
            rng, lad, int(rng.integers(2, 4)), (0.15, 0.7), -1.0, (30, 60), (0.15, 0.3), (0.55, 0.75), "diagonal"
        ),
        *_branches(rng, lad, int(rng.integers(1, 4)), (0.1, 0.6), 1.0, (50, 80), (0.05, 0.1), (0.35, 0.5), "septal"),
        *_branches(
            rng,
            lcx,
            int(rng.integers(1, 4)),
            (0.25, 0.85),
            -1.0,
            (25, 55),
            (0.12, 0.25),
            (0.55, 0.75),
            "obtuse marginal",
        ),
    ]
    return [left_main, lad, lcx], side


def right_tree(rng) -> tuple[list[Vessel], list[Vessel]]:
    """RCA: one artery turning about 180 degrees (a C), conus and acute marginals outwards, PDA and PLV at its end."""
    ostium = np.array([rng.uniform(0.22, 0.4), rng.uniform(0.18, 0.32)])
    length = rng.uniform(0.85, 1.05)
    rca = _path(
        rng,
        ostium,
        np.deg2rad(rng.uniform(-10, 20)),
        length,
        rng.uniform(2.8, 3.6) / length,
        0.022,
        0.013,
        wobble=1.0,
        name="RCA",
    )
    side = [
        *_branches(rng, rca, 1, (0.03, 0.1), -1.0, (40, 70), (0.08, 0.14), (0.35, 0.5), "conus"),
        *_branches(
            rng, rca, int(rng.integers(2, 4)), (0.3, 0.75), -1.0, (40, 80), (0.1, 0.2), (0.45, 0.6), "acute marginal"
        ),
    ]
    end = len(rca.points) - 1
    heading = _heading_at(rca, end)
    side.append(
        _path(
            rng,
            rca.points[end],
            heading + np.deg2rad(rng.uniform(20, 45)),
            rng.uniform(0.15, 0.25),
            0.0,
            0.012,
            0.006,
            name="PDA",
        )
    )
    side.append(
        _path(
            rng,
            rca.points[end],
            heading - np.deg2rad(rng.uniform(20, 45)),
            rng.uniform(0.1, 0.2),
            0.0,
            0.011,
            0.005,
            name="PLV",
        )
    )
    return [rca], side


def add_stenosis(rng, vessel: Vessel) -> dict:
    """Narrow ``vessel`` by 50-85 % over a few radii, somewhere between 20 and 60 % of its length."""
    count = len(vessel.points)
    centre = rng.uniform(0.2, 0.6) * (count - 1)
    severity = rng.uniform(0.5, 0.85)
    # The narrowing spans about four local diameters (in points of 0.01 normalised units).
    half_width = max(2.0, 4.0 * vessel.radii[int(centre)] / 0.01)
    distance = np.abs(np.arange(count) - centre) / half_width
    profile = np.where(distance < 1.0, 0.5 * (1.0 + np.cos(np.pi * np.clip(distance, 0, 1))), 0.0)
    vessel.radii = vessel.radii * (1.0 - severity * profile)
    return {
        "stenosis_vessel": vessel.name,
        "stenosis_severity": round(float(severity), 3),
        "stenosis_at": round(float(centre / (count - 1)), 3),
    }
