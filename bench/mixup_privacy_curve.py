"""The privacy–accuracy curve of MixupPrivacy: for each setting, held-out Dice and what the audit's attacks recover.

Settings: the three levels (paper, standard, strong) and ablations of the default that switch one defence off at a
time, so each defence's price and worth show separately. For each: Table 1 Dice (Baseline, Naive, Naive+TTA,
Learned, Learned+TTA; per class and mean) through a loopback server with the shipped models, Learned+TTA ÷ Baseline,
and the audit (template-only guess, each attack's r / PSNR / 3D MS-SSIM, share placed exactly and within one
step, the oracle bound, re-identification mAP). Figures, not pass/fail; written to bench/results/.

    python bench/mixup_privacy_curve.py [--subjects 2] [--sample 96] [--reid-subjects 10]
        [--settings paper,standard,strong]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ablations(default):
    """The default level with one defence switched off at a time."""
    out = {}
    if default.scan_warp:
        out[f"{default.level} without secret warp"] = default.with_changes(scan_warp=0.0)
    if default.fill_background:
        out[f"{default.level} without background fill"] = default.with_changes(fill_background=False)
    if default.target_orientations > 1:
        out[f"{default.level} without patch orientations"] = default.with_changes(target_orientations=1)
    if default.secret_offsets:
        out[f"{default.level} with public grids"] = default.with_changes(secret_offsets=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2, help="held-out synthetic subjects for Dice (default 2)")
    parser.add_argument("--settings", default="paper,standard,strong", help="levels to measure (comma-separated)")
    parser.add_argument(
        "--ablations", action="store_true", help="also the default level with one defence off at a time"
    )
    parser.add_argument(
        "--sample", type=int, default=96, help="uploads attacked per scan (default 96; the oracle uses all)"
    )
    parser.add_argument(
        "--reid-subjects", type=int, default=10, help="subjects scanned twice for re-identification (default 10)"
    )
    parser.add_argument("--attacks", default="template,separated,rematched")
    parser.add_argument("--skip-dice", action="store_true", help="audit only")
    parser.add_argument("--skip-audit", action="store_true", help="Dice only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixup_privacy_curve.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from medprivacy.mixup.audit import run_audit
    from medprivacy.mixup.bank import generate_bank
    from medprivacy.mixup.evaluate import evaluate
    from medprivacy.mixup.privacy import DEFAULT_LEVEL, privacy_settings
    from medprivacy.server.local import start_local_server
    from medprivacy.transport import InferenceClient

    settings = {name: privacy_settings(name) for name in args.settings.split(",") if name}
    if args.ablations:
        settings.update(ablations(privacy_settings(DEFAULT_LEVEL)))
    work = Path(tempfile.mkdtemp(prefix="mixup-curve-"))
    key_dir = work / "key"
    bank = generate_bank(key_dir)  # one fresh key, as a new site makes it, shared by every setting
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    server = start_local_server(["--host", "127.0.0.1", "--enable-baseline"], work / "server.log")
    url = server.url
    try:
        client = InferenceClient(url)
        for name, setting in settings.items():
            entry = results.get(name, {})
            entry["settings"] = setting.to_json()
            started = time.perf_counter()
            if not args.skip_dice:
                report = evaluate([], [], args.subjects, client, key_dir=key_dir, privacy=setting)
                entry["dice"] = report["table1"]
                entry["learned_tta_over_baseline"] = round(report["learned_tta_over_baseline"], 4)
                entry["dice_subjects"] = args.subjects
            if not args.skip_audit:
                from medprivacy.data.synth import synthesize_subject, to_scanner_space
                from medprivacy.demo import DEMO_SEED

                image = to_scanner_space(synthesize_subject(DEMO_SEED), DEMO_SEED)[0]
                audit, _ = run_audit(
                    image,
                    name=f"demo held-out brain (seed {DEMO_SEED})",
                    bank=bank,
                    privacy=setting,
                    reid_subjects=args.reid_subjects,
                    variants=tuple(args.attacks.split(",")),
                    sample=args.sample,
                    seed=0,
                )
                entry["audit"] = audit
            entry["seconds"] = round(time.perf_counter() - started, 1)
            results[name] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            print(_line(name, entry), flush=True)
    finally:
        server.stop()
    return 0


def _line(name: str, entry: dict) -> str:
    parts = [f"{name:<38}"]
    if "dice" in entry:
        parts.append(
            f"Learned+TTA {entry['dice']['Learned+TTA']['mean']:.3f} / Baseline "
            f"{entry['dice']['Baseline']['mean']:.3f} = {entry['learned_tta_over_baseline']:.3f}"
        )
    if "audit" in entry:
        scan = entry["audit"]["scan"]
        strongest = scan.get("strongest", {})
        parts.append(
            f"rebuild r {strongest.get('r', float('nan')):.3f} (template {scan['template_only']['r']:.3f}, "
            f"bound {scan['oracle_bound']['r']:.3f})"
        )
        parts.append(f"placed exactly {strongest.get('placed_exactly', float('nan')):.3f}")
        if "reidentification" in entry["audit"]:
            parts.append(f"re-ID mAP {entry['audit']['reidentification']['attack_map']:.3f}")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
