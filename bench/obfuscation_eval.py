"""The ObfuscationPrivacy evaluation with the shipped VAE and threat-(a) attackers, kept in bench/results/.

Runs `medprivacy obfuscate eval` (utility: plain vs obfuscated classifier; privacy: attacks a and b and the
key-known bound on angiograms and fundus crops) and writes the report and the example grid. Figures, not
pass/fail. Extra arguments after `--` go to `medprivacy obfuscate eval` (e.g. `-- --task stenosis`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "obfuscation_eval.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "bench" / "results" / "obfuscation_eval_examples.png")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more `medprivacy obfuscate eval` options")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    command = [sys.executable, "-m", "medprivacy.cli", "obfuscate", "eval", "--out", str(args.out), "--grid", str(args.grid),
               "--threads", str(args.threads), *extra]
    print("$ medprivacy " + " ".join(command[3:]), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
