"""The privacy-utility trade-off of ObfuscationPrivacy: `medprivacy obfuscate eval` on angiograms at several settings.

Each point changes the per-frame latent temperature or the mapping (codes, dither) and runs the whole evaluation
at that setting: utility (plain vs obfuscated classifier, same budget), a threat-(a) attacker retrained for that
setting, the threat-(b) attacks and the key-known bound. To fit a CPU, the attack networks of the curve are
smaller and shorter than the default evaluation's (--attack-channels 16,32,64,128, 1500 steps); the summary says
so. Writes one report per point to bench/results/tradeoff/ and the summary to bench/results/obfuscation_tradeoff.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (name, eval options)
POINTS = [
    ("t0-c8-d1", ["--temperature", "0", "--codes", "8", "--dither", "1"]),
    ("t0.25-c8-d1", ["--temperature", "0.25", "--codes", "8", "--dither", "1"]),
    ("t0.5-c8-d1", ["--temperature", "0.5", "--codes", "8", "--dither", "1"]),
    ("t1-c8-d1", ["--temperature", "1", "--codes", "8", "--dither", "1"]),
    ("t0-c4-d2", ["--temperature", "0", "--codes", "4", "--dither", "2"]),
]
BUDGET = ["--attack-channels", "16,32,64,128", "--attack-steps", "1500", "--retrain-attack-a", "1500"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--points", default=",".join(name for name, _ in POINTS), help="comma-separated subset of the points"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "obfuscation_tradeoff.json")
    args = parser.parse_args()
    wanted = [p.strip() for p in args.points.split(",") if p.strip()]
    folder = args.out.parent / "tradeoff"
    folder.mkdir(parents=True, exist_ok=True)
    for name, options in POINTS:
        if name not in wanted:
            continue
        report = folder / f"{name}.json"
        command = [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "obfuscate",
            "eval",
            "--domains",
            "angio",
            "--out",
            str(report),
            "--threads",
            str(args.threads),
            *BUDGET,
            *options,
        ]
        print("$ medprivacy " + " ".join(command[3:]), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            return 1
    summary = {"budget": BUDGET, "points": {}}
    for name, options in POINTS:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        privacy, targets = report["privacy"]["angio"], report["targets"]
        summary["points"][name] = {
            "mapping": report["mapping"],
            "options": options,
            "accuracy_plain": report["utility"]["plain"]["accuracy"],
            "accuracy_obfuscated": report["utility"]["obfuscated"]["accuracy"],
            "accuracy_ratio": report["utility"]["accuracy_ratio"],
            "mean_frame_ssim": privacy["baselines"]["mean-frame"]["ssim"],
            "vae_output": privacy["reference"]["vae-output"],
            "threats": {
                threat: {
                    k: row[k] for k in ("ssim", "ssim_attack", "vessel_dice", "dice_attack", "ssim_met", "dice_met")
                }
                for threat, row in targets["angio"].items()
            },
        }
        point = summary["points"][name]
        print(
            f"{name}: accuracy ratio {point['accuracy_ratio']}; "
            + "; ".join(f"{t}: SSIM {r['ssim']} Dice {r['vessel_dice']}" for t, r in point["threats"].items())
        )
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
