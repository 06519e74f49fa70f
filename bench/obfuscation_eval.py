"""The ObfuscationPrivacy evaluation with the shipped VAE, kept in bench/results/.

Runs `medprivacy obfuscate eval` (utility: plain vs obfuscated classifier; privacy: attacks a and b and the
key-known bound on angiograms and fundus crops) and writes the report and the example grid. The threat-(a) attackers
shipped for the default key parameters (role attack, evaluation only) are used when the models folder has them;
otherwise each run trains its own for the parameters it measures (--retrain-attack-a with the train-models budget).
With --parallel the two domains run as two processes at once (angiograms with the utility part, fundus crops
without) and their reports and grids are merged: the same figures as one run (every part is seeded), in about half
the time on two cores.
Figures, not pass/fail. Extra arguments after `--` go to `medprivacy obfuscate eval` (e.g. `-- --task stenosis`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "obfuscation_eval.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "bench" / "results" / "obfuscation_eval_examples.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parallel", action="store_true", help="run the two domains as two processes and merge the reports"
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more `medprivacy obfuscate eval` options")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    if not any(a.startswith("--retrain-attack-a") for a in extra) and not _attackers_shipped(extra):
        # No threat-(a) attackers in the models folder: train them here, with the budget `train-models` would give
        # them, for exactly the parameters being measured.
        from medprivacy.obfuscation.train import ObfuscationTrainConfig

        steps = ObfuscationTrainConfig.preset_config("cpu-small").attack_steps
        print(f"no shipped threat-(a) attackers: each domain trains its own ({steps} steps)", flush=True)
        extra += ["--retrain-attack-a", str(steps)]
    base = [sys.executable, "-m", "medprivacy.cli", "obfuscate", "eval", "--threads", str(args.threads)]
    if not args.parallel:
        command = base + ["--out", str(args.out), "--grid", str(args.grid), *extra]
        print("$ medprivacy " + " ".join(command[3:]), flush=True)
        return subprocess.run(command, cwd=ROOT).returncode
    work = Path(tempfile.mkdtemp(prefix="obfuscation-eval-"))
    parts = {"angio": ["--domains", "angio"], "fundus": ["--domains", "fundus", "--skip-utility"]}
    processes = {}
    for domain, options in parts.items():
        command = base + [
            "--out",
            str(work / f"{domain}.json"),
            "--grid",
            str(work / f"{domain}.png"),
            *options,
            *extra,
        ]
        print("$ medprivacy " + " ".join(command[3:]), flush=True)
        with open(work / f"{domain}.log", "w") as log:
            processes[domain] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    codes = {domain: process.wait() for domain, process in processes.items()}
    for domain in parts:
        print((work / f"{domain}.log").read_text(), end="")
    if any(codes.values()):
        return 1
    report = json.loads((work / "angio.json").read_text())
    fundus = json.loads((work / "fundus.json").read_text())
    report["privacy"]["fundus"] = fundus["privacy"]["fundus"]
    report["targets"]["fundus"] = fundus["targets"]["fundus"]
    report["config"]["domains"] = ["angio", "fundus"]
    report["seconds"] = max(report["seconds"], fundus["seconds"])
    report["parallel"] = "domains evaluated by two processes at once; seconds is the longer of the two"
    report["grid"] = str(args.grid)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _stack([work / "angio.png", work / "fundus.png"], args.grid)
    from medprivacy.obfuscation.evaluate import summary

    print(summary(report))
    print(f"wrote {args.out} and {args.grid}")
    return 0


def _attackers_shipped(extra: list) -> bool:
    from medprivacy.nets.registry import load_manifest
    from medprivacy.obfuscation.train import ATTACK_NAMES

    models_dir = extra[extra.index("--models-dir") + 1] if "--models-dir" in extra[:-1] else None
    models = load_manifest(models_dir).get("models", {})
    return all(name in models for name, _ in ATTACK_NAMES.values())


def _stack(paths, target: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in paths]
    width = max(i.shape[1] for i in images)
    padded = [np.pad(i, ((0, 2), (0, width - i.shape[1])), constant_values=255) for i in images]
    sitk.WriteImage(sitk.GetImageFromArray(np.concatenate(padded)[:-2]), str(target))


if __name__ == "__main__":
    sys.exit(main())
