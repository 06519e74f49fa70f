"""The curious server's attacks on one scan's uploads, and what each recovers.

Variants, each a full attack a server can run with public means (the template, the code, its own keys):
- ``template``: place each raw upload on the template, average the placed copies, undo the mixing on average;
- ``separated``: the same with the separator's estimate of each upload's scan part (separator.py);
- ``rematched``: the better of the two, placed again against its own first rebuild instead of the template
  (a rebuild holds the patient's own features, which the template lacks), then averaged again;
- each rebuild also blended with the template (the server falls back to its prior where its evidence is weak).
``oracle`` averages the copies at their true places: not an attack, the bound a perfect placement would reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .capture import CapturedUploads
from .placement import Placement, pairing_accuracy, place_all, placement_accuracy
from .rebuild import average_placed, image_measures, template_guess, with_template

#: Blends with the template scored for every rebuild (trust in the rebuild); the best is kept, which favours the
#: attacker (it could not pick the weight on the patient).
TRUSTS = (1.0, 0.75, 0.5, 0.25)


@dataclass
class Attacker:
    """What the server knows: the level's settings (Kerckhoffs: the code is public; here, how many orientations to
    search and, for public grids, their starts) and its separator network."""

    orientations: int
    separator: object | None = None
    lattice: tuple = ()

    @classmethod
    def for_settings(cls, settings, models_dir=None, lattice=()):
        from .separator import load_separator

        try:
            separator = load_separator(models_dir)
        except Exception as exc:  # noqa: BLE001 - the audit still runs the template attacks, and says why
            separator = exc
        return cls(settings.target_orientations, separator, lattice)


@dataclass
class Rebuild:
    name: str
    volume: np.ndarray
    coverage: np.ndarray
    placement: Placement | None = None
    patches: np.ndarray | None = None  # what was placed when not the raw uploads (the separator's estimates)


def _rebuild(name, patches, placement, shape) -> Rebuild:
    """Placed patches averaged (weighted by how well each matched). A mixture's average is λ̄·x + (1 − λ̄)·r̄ plus
    what the references did not cancel: an affine function of the patient's image, which ``with_template`` maps onto
    the template's intensities, so neither λ̄ nor r̄ needs to be known."""
    weights = np.clip(placement.score, 0.0, None)
    mean, coverage = average_placed(patches, placement.start, placement.orientation, shape, weights)
    return Rebuild(name, mean, coverage, placement)


def _score(rebuild: Rebuild, patient: np.ndarray) -> dict:
    """Measures of the rebuild and of its template blends; the blend with the highest r is the one reported."""
    candidates = {trust: with_template(rebuild.volume, rebuild.coverage, trust) for trust in TRUSTS}
    measured = {trust: image_measures(volume, patient) for trust, volume in candidates.items()}
    best = max(measured, key=lambda trust: (measured[trust]["r"], measured[trust]["ms_ssim"]))
    rebuild.volume = candidates[best]
    return {**measured[best], "trust": best, "best_ms_ssim_any_blend": max(m["ms_ssim"] for m in measured.values())}


def attack_uploads(
    captured: CapturedUploads, attacker: Attacker, shape, variants=("template", "separated", "rematched"), progress=None
) -> list[Rebuild]:
    """Run the attack variants on ``captured``; returns the rebuilds (unscored)."""
    say = progress or (lambda message, fraction=None: None)
    uploads = captured.uploads
    out = []
    if "template" in variants or "rematched" in variants:
        say("template matching of the raw uploads")
        placement = place_all(uploads, template_guess(), attacker.orientations, attacker.lattice, progress)
        out.append(_rebuild("template", uploads, placement, shape))
    if ("separated" in variants or "rematched" in variants) and not isinstance(
        attacker.separator, (type(None), Exception)
    ):
        from .separator import separate

        say("separating each upload with the attacker's network")
        estimates = separate(attacker.separator, uploads)
        placement = place_all(estimates, template_guess(), attacker.orientations, attacker.lattice, progress)
        separated = _rebuild("separated", estimates, placement, shape)
        separated.patches = estimates
        out.append(separated)
    if "rematched" in variants and out:
        # The server cannot score against the patient: it keeps the variant whose uploads matched best.
        first = max(out, key=lambda r: float(r.placement.score.mean()))
        patches = first.patches if first.patches is not None else uploads
        reference = with_template(first.volume, first.coverage)
        say("matching the uploads again against the first rebuild")
        placement = place_all(patches, reference, attacker.orientations, attacker.lattice, progress)
        out.append(_rebuild("rematched", patches, placement, shape))
    return out


def oracle_rebuild(captured: CapturedUploads, shape) -> Rebuild | None:
    truth = captured.truth
    if truth is None:
        return None
    real = truth.copy >= 0
    placement = Placement(truth.start, truth.orientation, real.astype(np.float32))
    return _rebuild("oracle (true places; not an attack)", captured.uploads, placement, shape)


def projected_rebuild(captured: CapturedUploads, share: float, shape, rng: np.random.Generator) -> Rebuild | None:
    """The oracle rebuild from a random ``share`` of the real uploads (None when that is none of them)."""
    real = np.nonzero(captured.truth.copy >= 0)[0]
    count = int(round(share * len(real)))
    if count == 0:
        return None
    subset = captured.sample(count, rng)
    return oracle_rebuild(subset, shape)


def audit_uploads(
    captured: CapturedUploads,
    patient: np.ndarray,
    attacker: Attacker,
    rng: np.random.Generator,
    pairing_queries: int = 4,
    variants=("template", "separated", "rematched"),
    progress=None,
    sample: int | None = None,
) -> tuple[dict, dict]:
    """Every attack on one scan's uploads, measured against ``patient`` (the normalised scan on the model grid).
    ``sample``: attack that many randomly drawn uploads only (the oracle bound and pairing still use them all).

    Returns (report, volumes): the report holds the template-only guess, each variant's measures and placement
    accuracy, the strongest attack, pairing and the oracle bound; volumes maps names to rebuilt arrays.
    """
    say = progress or (lambda message, fraction=None: None)
    shape = patient.shape
    guess = template_guess()
    attacked = captured.sample(sample, rng)
    report: dict = {
        "uploads": len(captured),
        "uploads_attacked": len(attacked),
        "template_only": image_measures(guess, patient),
        "attacks": {},
    }
    if isinstance(attacker.separator, Exception):
        report["separator_unavailable"] = str(attacker.separator)
    volumes = {"template only": guess}
    rebuilds = attack_uploads(attacked, attacker, shape, variants, progress)
    for rebuild in rebuilds:
        entry = _score(rebuild, patient)
        if attacked.truth is not None:
            entry["placement"] = placement_accuracy(
                rebuild.placement, attacked.truth, step=attacked.uploads.shape[-1] // 4
            )
        report["attacks"][rebuild.name] = entry
        volumes[rebuild.name] = rebuild.volume
    if report["attacks"]:
        strongest = max(
            report["attacks"], key=lambda name: (report["attacks"][name]["r"], report["attacks"][name]["ms_ssim"])
        )
        attacks = report["attacks"].values()
        report["strongest"] = {
            "attack": strongest,
            "r": max(a["r"] for a in attacks),
            "ms_ssim": max(a["best_ms_ssim_any_blend"] for a in attacks),
            "psnr_db": max(a["psnr_db"] for a in attacks),
        }
        if captured.truth is not None:
            report["strongest"]["placed_exactly"] = max(a["placement"]["placed_exactly"] for a in attacks)
            report["strongest"]["placed_within_one_step"] = max(
                a["placement"]["placed_within_one_step"] for a in attacks
            )
        volumes["strongest attack"] = volumes[strongest]
    if captured.truth is not None:
        oracle = oracle_rebuild(captured, shape)
        report["oracle_bound"] = _score(oracle, patient)
        volumes["oracle"] = oracle.volume
        if len(attacked) < len(captured) and "strongest" in report:
            # A rebuild from a sample averages few copies per voxel, so it understates what placing every upload
            # would give. Projection: the measured exact share of all uploads, averaged at their true places and
            # the misplaced ones left out, which favours the attacker (it cannot tell which ones it got right).
            share = report["strongest"]["placed_exactly"]
            projected = projected_rebuild(captured, share, shape, rng)
            report["projected_all_uploads"] = {
                "placed_share": share,
                **(_score(projected, patient) if projected else image_measures(guess, patient)),
            }
            report["strongest"]["r"] = max(report["strongest"]["r"], report["projected_all_uploads"]["r"])
            report["strongest"]["ms_ssim"] = max(
                report["strongest"]["ms_ssim"],
                report["projected_all_uploads"].get(
                    "best_ms_ssim_any_blend", report["projected_all_uploads"]["ms_ssim"]
                ),
            )
        if pairing_queries:
            say("pairing uploads by their overlaps")
            report["pairing"] = pairing_accuracy(
                captured.uploads, captured.truth, attacker.orientations, pairing_queries, rng, progress=progress
            )
    return report, volumes


def server_rebuild(session, bank, models_dir=None, variants=("template", "rematched"), progress=None, cancel=None):
    """What a curious server could rebuild from one private run's uploads (``PrivateSegmentation.session``): the
    strongest of ``variants`` judged as the server would judge it (its uploads' mean match score), as a SimpleITK
    image on the model grid. For "Show what a curious server could rebuild"."""
    import SimpleITK as sitk

    from ...data.template import load_template
    from ...errors import CancelledError
    from .capture import of_session

    captured = of_session(session, bank)
    if cancel is not None and cancel():
        raise CancelledError("cancelled before the server's rebuild")
    report = (lambda message, fraction=None: progress(message, fraction)) if progress else None
    attacker = Attacker.for_settings(session.settings, models_dir, captured.truth.lattice)
    rebuilds = attack_uploads(captured, attacker, session.volume.shape, variants, report)
    best = max(rebuilds, key=lambda r: float(r.placement.score.mean()))
    image = sitk.GetImageFromArray(with_template(best.volume, best.coverage))
    image.CopyInformation(load_template().image)
    return image
