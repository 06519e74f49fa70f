"""The MedLocker paper's Tables 1-3 on held-out images, through a loopback server with the shipped models.

Starts `medprivacy serve` on 127.0.0.1 with Resources/Models, runs `medprivacy watermark eval` with the paper's
search settings and keeps the report and the example grid in bench/results/. Figures, not pass/fail.
Extra arguments after `--` go to `medprivacy watermark eval` (e.g. `-- --equal-budget-random --no-held-out`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="held-out test images to draw (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "Resources" / "Models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the server (default: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "watermark_eval.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "bench" / "results" / "watermark_eval_examples.png")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more `medprivacy watermark eval` options")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from medprivacy.server.local import start_local_server

    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="watermark-eval-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = start_local_server(["--host", "127.0.0.1", "--models-dir", str(args.models_dir)], work / "server.log")
    url = server.url
    try:
        extra = [a for a in args.extra if a != "--"]
        command = [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "watermark",
            "eval",
            "--server",
            url,
            "--images",
            str(args.images),
            "--seed",
            str(args.seed),
            "--out",
            str(args.out),
            "--grid",
            str(args.grid),
            *extra,
        ]
        print("$ medprivacy " + " ".join(command[3:]), flush=True)
        return subprocess.run(command).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
