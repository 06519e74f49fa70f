"""The paper's Table 1 on held-out synthetic subjects, through a loopback server with the shipped models.

Starts `medprivacy serve --enable-baseline` on 127.0.0.1, makes a fresh private key (as a new site would), runs
`medprivacy mixup eval --synthetic N` and keeps the report in bench/results/. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="held-out synthetic subjects (default 6)")
    parser.add_argument(
        "--tta", type=int, default=None, help="TTA copies (default: the default level's, as medprivacy mixup segment)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixup_eval.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from medprivacy.mixup.bank import generate_bank
    from medprivacy.server.local import start_local_server

    work = Path(tempfile.mkdtemp(prefix="mixup-eval-"))
    generate_bank(work / "key")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = start_local_server(["--host", "127.0.0.1", "--enable-baseline"], work / "server.log")
    url = server.url
    try:
        command = [
            sys.executable,
            "-m",
            "medprivacy.cli",
            "mixup",
            "eval",
            "--synthetic",
            str(args.subjects),
            "--server",
            url,
            "--key-dir",
            str(work / "key"),
            "--out",
            str(args.out),
        ]
        if args.tta is not None:
            command += ["--tta", str(args.tta)]
        print("$ medprivacy " + " ".join(command[3:]), flush=True)
        return subprocess.run(command).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
