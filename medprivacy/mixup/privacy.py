"""Privacy levels of the private path: which defences against a curious server are on, and how many copies are sent.

Each defence answers an attack measured by ``medprivacy mixup audit`` (audit/), and each can be switched on its own
so the privacy–accuracy curve (bench/mixup_privacy_curve.py) shows what it buys:

- ``secret_offsets``: each TTA copy cuts the scan on a lattice at a secret random offset, drawn per scan and per
  copy, over a padded volume (no clamping at the edges, so no two uploads cover the same voxels). With the public
  shifted grids of the paper level, every upload sits at one of a few hundred known places on the template.
- ``target_orientations``: each uploaded patch of the scan is turned by a secret cube symmetry (48: axis order and
  flips), undone on the answer; the server model is trained for it. A server has to search 48 orientations for each
  upload before it can match it to the template or pair it with another upload.
- ``reference_orientations``: the same for the reference patch, so the two halves of a mixture look alike.
- ``fill_background``: outside the analysis region the scan is exactly 0; in a mixture that region shows the
  reference alone and draws the template's outline, which tells a server where the patch lies. The fill puts
  private reference texture there instead.
- ``scan_warp``: a secret smooth deformation of the scan (per scan; standard deviation in voxels of its control
  points), undone on the answer. Should a server still place and average the copies, what it rebuilds is the
  patient under a random deformation of about the size of the differences between subjects.
- ``decoy_fraction``: extra uploads mixed from two reference patches only, whose answers are dropped.
- ``tta``: copies per patch. More copies give the client more accurate averages, and give a server that managed
  to place them more to average too. ``strong`` keeps the 16 it was measured at: its deformation, not the count,
  is what it adds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import InputError


@dataclass(frozen=True)
class PrivacySettings:
    level: str
    tta: int
    secret_offsets: bool
    target_orientations: int
    reference_orientations: int
    fill_background: bool
    scan_warp: float
    decoy_fraction: float

    def with_changes(self, **changes) -> PrivacySettings:
        """The same settings with some fields changed (the level is then named 'custom' unless given)."""
        changes.setdefault("level", "custom")
        return replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)


#: The paper's scheme, as this product first shipped it: public shifted grids, reference flips, zero background.
#: Kept for comparison (the audit shows what it leaks); never the default. 16 copies, one per public grid shift
#: (model_space.TTA_GRID_SHIFTS); the paper finds 10–15 copies best.
PAPER = PrivacySettings(
    level="paper",
    tta=16,
    secret_offsets=False,
    target_orientations=1,
    reference_orientations=8,
    fill_background=False,
    scan_warp=0.0,
    decoy_fraction=0.0,
)
#: 32 copies: on six held-out subjects on their scanner grids the private path kept 0.959 of the baseline's mean Dice
#: with 32 (decision weights fitted at 32; 0.950–0.955 with other fits and keys) and 0.945 with 16, for twice the
#: uploads (about 174 MB against 87 MB per scan). The audit at 32 copies (bench/results/mixup_audit_k32.json,
#: mixup_audit_reid_k32.json) gives the same verdicts as at 16.
STANDARD = PrivacySettings(
    level="standard",
    tta=32,
    secret_offsets=True,
    target_orientations=48,
    reference_orientations=48,
    fill_background=True,
    scan_warp=0.0,
    decoy_fraction=0.0,
)
STRONG = PrivacySettings(
    level="strong",
    tta=16,
    secret_offsets=True,
    target_orientations=48,
    reference_orientations=48,
    fill_background=True,
    scan_warp=4.5,
    decoy_fraction=0.0,
)
LEVELS = {settings.level: settings for settings in (PAPER, STANDARD, STRONG)}
DEFAULT_LEVEL = "standard"


def privacy_settings(level: str | None = None, tta: int | None = None) -> PrivacySettings:
    """The settings of a named level (default: ``DEFAULT_LEVEL``), optionally with another number of copies."""
    name = level or DEFAULT_LEVEL
    if name not in LEVELS:
        raise InputError(f"unknown privacy level {name!r}; use one of {', '.join(LEVELS)}")
    settings = LEVELS[name]
    if tta is not None and tta != settings.tta:
        if tta < 1:
            raise InputError("--tta must be at least 1")
        settings = replace(settings, tta=int(tta))
    return settings
