"""``medprivacy mixup audit``: what a curious server could recover from a scan's uploads, measured.

The server is honest but curious: it holds the public code, the public MNI152 template, its own synthetic brains and
keys, and everything that arrives on the wire. The audit runs, on exactly what the client would send (or on a
server's ``--audit-dir`` copy), each attack of attack.py, the overlap pairing of placement.py and the
re-identification of reid.py, and reports r, PSNR and 3D MS-SSIM of every rebuild against the patient next to the
template-only guess, the share of uploads placed exactly / within one patch step, and re-identification mAP next to
chance and to no protection, in JSON plus a PNG (patient | template | what the server could rebuild | bound).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: What the product promises at its default level; the audit says yes or no to each
#: (README, "What a curious server can recover").
MARGIN_OVER_TEMPLATE = 0.05
MAX_PLACED_EXACTLY = 0.10
MAX_REID_MAP = 0.40


def verdict(report: dict) -> dict:
    scan = report["scan"]
    guess = scan["template_only"]
    out = {}
    strongest = scan.get("strongest")
    if strongest:
        out["rebuild r within template + 0.05"] = strongest["r"] <= guess["r"] + MARGIN_OVER_TEMPLATE
        out["rebuild MS-SSIM within template + 0.05"] = strongest["ms_ssim"] <= guess["ms_ssim"] + MARGIN_OVER_TEMPLATE
        if "placed_exactly" in strongest:
            out["placed exactly <= 10 %"] = strongest["placed_exactly"] <= MAX_PLACED_EXACTLY
    if "reidentification" in report:
        out["re-identification mAP <= 0.40"] = report["reidentification"]["attack_map"] <= MAX_REID_MAP
    return out


def run_audit(
    image=None,
    *,
    name: str = "scan",
    bank=None,
    uploads_dir=None,
    privacy=None,
    tta: int | None = None,
    reid_subjects: int = 10,
    pairing_queries: int = 4,
    variants=("template", "separated", "rematched"),
    sample: int | None = None,
    reid_sample: int | None = None,
    seed: int | None = None,
    models_dir=None,
    out_json: Path | None = None,
    out_png: Path | None = None,
    progress=None,
) -> tuple[dict, dict]:
    """Audit one scan (SimpleITK image) at a privacy level; returns (report, volumes) and writes JSON/PNG if asked."""
    from ..pipeline import prepare_scan
    from ..privacy import PrivacySettings, privacy_settings
    from .attack import Attacker, audit_uploads
    from .capture import capture, load_audit_dir
    from .reid import reidentification

    started = time.perf_counter()
    say = progress or (lambda message, fraction=None: None)
    settings = privacy if isinstance(privacy, PrivacySettings) else privacy_settings(privacy, tta)
    rng = np.random.default_rng(seed)
    say("aligning the scan to the brain template")
    prepared = prepare_scan(image, bank.patch_size)
    if uploads_dir is not None:
        captured = load_audit_dir(uploads_dir)
        if tuple(captured.uploads.shape[1:]) != tuple(bank.patch_size):
            from ...errors import InputError

            raise InputError(
                f"the audit copies hold {captured.uploads.shape[1:]} patches, the key {tuple(bank.patch_size)}; "
                "use the key of that run"
            )
    else:
        say("making the uploads exactly as a private run would")
        captured = capture(prepared, bank, settings, rng)
    lattice = captured.truth.lattice if captured.truth is not None else ()
    attacker = Attacker.for_settings(settings, models_dir, lattice)
    scan_report, volumes = audit_uploads(
        captured, prepared.volume, attacker, rng, pairing_queries, variants, progress, sample
    )
    scan_report["name"] = name
    if captured.session is not None and captured.session.warp is not None and "strongest attack" in volumes:
        from .rebuild import image_measures

        # Against what the server actually received (the scan under the secret deformation), for reference.
        scan_report["strongest_vs_deformed_scan"] = image_measures(volumes["strongest attack"], captured.session.volume)
    report = {"privacy": settings.to_json(), "scan": scan_report}
    if reid_subjects and uploads_dir is None and "strongest" in scan_report:
        say("re-identification")
        variant = scan_report["strongest"]["attack"]
        report["reidentification"] = reidentification(
            settings, bank, attacker, reid_subjects, variant, rng, progress, reid_sample or sample
        )
    report["verdict"] = verdict(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    shown = {
        "patient": prepared.volume,
        **{k: v for k, v in volumes.items() if k in ("template only", "strongest attack", "oracle")},
    }
    if out_json is not None:
        from ...files import write_json

        write_json(report, out_json)
    if out_png is not None:
        from .report import write_audit_png

        write_audit_png(shown, out_png)
    return report, shown
