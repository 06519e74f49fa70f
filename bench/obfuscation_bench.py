"""ObfuscationPrivacy speed, bytes and memory with the shipped VAE and a loopback server (CPU unless it has a GPU).

Prints (and writes to --out as JSON):
- frames per second obfuscated on the client (normalise, resize, VAE with keyed latent noise, keyed dither, table),
  for angiography-sized frames (512x512, 12-bit) and for frames already at the VAE's size;
- classify overhead ratio: seconds per frame of the obfuscated path (obfuscate here + POST /v1/obfuscation/classify)
  divided by the plain path through the same endpoint and the same model (normalise + resize to the model size +
  8-bit + POST), both from the same 512x512 frames, so the ratio is what obfuscation adds end to end;
- bytes per pixel on the wire: request body bytes of the classify calls / frames / pixels, per pixel of the model
  frame and per pixel of the original 512x512 frame, obfuscated and plain;
- peak memory (VmHWM) of a fresh client process that obfuscates a run of --run-frames 512x512 frames (held as
  12-bit integers, as a loaded run would be), and of the server.

Figures, not pass/fail. ``--quick`` for a fast smoke run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def vm_hwm_mb(pid: str = "self") -> float | None:
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    line = next((line for line in status.read_text(encoding="utf-8").splitlines() if line.startswith("VmHWM")), None)
    return int(line.split()[1]) / 1024 if line else None


def angiography_frames(count: int, size: int, start: int = 0) -> np.ndarray:
    from medprivacy.obfuscation.data import render_angio

    return np.stack(
        [np.round(render_angio(902_000 + start + i, size).image * 4095).astype(np.uint16) for i in range(count)]
    )


def run_memory(key_dir: Path, frames: int, threads: int) -> int:
    """Obfuscate a run of ``frames`` 512x512 12-bit frames and print this process's peak memory (MB)."""
    import torch

    from medprivacy.obfuscation.key import SiteKey
    from medprivacy.obfuscation.transform import Obfuscator

    torch.set_num_threads(threads)
    obfuscator = Obfuscator(SiteKey.load(key_dir))
    distinct = angiography_frames(min(frames, 16), 512)
    run = np.concatenate([distinct] * (-(-frames // len(distinct))))[:frames]
    obfuscator.obfuscate(run)
    print(vm_hwm_mb())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "obfuscation_bench.json")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "Resources" / "Models")
    parser.add_argument("--frames", type=int, default=256, help="512x512 frames timed per path (default 256)")
    parser.add_argument(
        "--run-frames", type=int, default=500, help="frames of the run obfuscated for the memory figure (default 500)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating plain/obfuscated repetitions (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and on the server (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 frames, a 40-frame run, one repetition")
    parser.add_argument("--run-memory", type=Path, default=None, help=argparse.SUPPRESS)  # key folder: the memory child
    args = parser.parse_args()
    if args.run_memory:
        return run_memory(args.run_memory, args.run_frames, args.threads)
    if args.quick:
        args.frames, args.run_frames, args.repeats = 32, 40, 1
    import os

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from medprivacy.obfuscation.key import SiteKey
    from medprivacy.obfuscation.keygen import create_site_key
    from medprivacy.obfuscation.transform import BATCH, Obfuscator
    from medprivacy.server.local import start_local_server
    from medprivacy.transport.obfuscation_client import ObfuscationClient

    results: dict = {
        "settings": {
            "frames": args.frames,
            "frame_size": [512, 512],
            "bits": 12,
            "threads": args.threads,
            "quick": args.quick,
        }
    }
    work = Path(tempfile.mkdtemp(prefix="obfuscation-bench-"))
    key = create_site_key(work / "key", models_dir=args.models_dir)
    obfuscator = Obfuscator(SiteKey.load(key.directory))
    size = obfuscator.frame_size
    results["key"] = key.describe()
    print(f"{key.describe()}", flush=True)

    big = angiography_frames(args.frames, 512)
    obfuscator.obfuscate(big[:4])  # warm-up
    tic = time.perf_counter()
    codes = obfuscator.obfuscate(big)
    big_seconds = time.perf_counter() - tic
    prepared = obfuscator.prepare(big)
    tic = time.perf_counter()
    obfuscator.obfuscate_prepared(prepared)
    small_seconds = time.perf_counter() - tic
    results["obfuscate"] = {
        "frames_per_second_512": args.frames / big_seconds,
        "frames_per_second_model_size": args.frames / small_seconds,
        "model_size": list(size),
    }
    print(
        f"client: {args.frames / big_seconds:.1f} frames/s from 512x512 12-bit, {args.frames / small_seconds:.1f} "
        "frames/s "
        f"from {size[0]}x{size[1]} prepared frames",
        flush=True,
    )

    server = start_local_server(["--host", "127.0.0.1", "--models-dir", str(args.models_dir)], work / "server.log")
    process, url = server.process, server.url
    try:
        client = ObfuscationClient(url, read_timeout=600)
        train = obfuscator.obfuscate(angiography_frames(64, 128, start=10_000))
        labels = np.arange(64) % 2
        job = client.submit_training(train, labels, ["LCA", "RCA"], key.key_id, steps=20)
        model = client.wait(job["job"], poll=0.2)["model"]
        client.classify(codes[:8], model, key.key_id)  # warm-up

        def plain_path():
            # Prepared a batch at a time, like the obfuscated path: normalising 256 large frames at once in float64
            # is slower per frame than in batches, and would be charged to the plain side of the ratio.
            prepared = np.concatenate([obfuscator.prepare(big[i : i + BATCH]) for i in range(0, len(big), BATCH)])
            return client.classify(np.round(prepared * 255).astype(np.uint8), model, key.key_id)

        def obfuscated_path():
            return client.classify(obfuscator.obfuscate(big), model, key.key_id)

        timings = {"plain": 0.0, "obfuscated": 0.0}
        sent = {"plain": 0, "obfuscated": 0}
        for _ in range(args.repeats):
            for name, call in (("plain", plain_path), ("obfuscated", obfuscated_path)):
                before = client.bytes_sent
                tic = time.perf_counter()
                call()
                timings[name] += time.perf_counter() - tic
                sent[name] += client.bytes_sent - before
        frames_total = args.frames * args.repeats
        per_frame = {name: timings[name] / frames_total for name in timings}
        results["classify"] = {
            "seconds_per_frame": per_frame,
            "overhead_ratio": per_frame["obfuscated"] / per_frame["plain"],
            "definition": "obfuscate here + classify request ÷ normalise + resize + 8-bit + the same request",
        }
        results["wire"] = {
            name: {
                "bytes_per_model_pixel": sent[name] / frames_total / (size[0] * size[1]),
                "bytes_per_original_pixel": sent[name] / frames_total / (512 * 512),
            }
            for name in sent
        }
        print(
            f"classify: {1000 * per_frame['plain']:.2f} ms/frame plain, {1000 * per_frame['obfuscated']:.2f} "
            "ms/frame obfuscated; "
            f"overhead ratio {results['classify']['overhead_ratio']:.2f}",
            flush=True,
        )
        for name, row in results["wire"].items():
            print(
                f"wire ({name}): {row['bytes_per_model_pixel']:.3f} bytes per {size[0]}x{size[1]} pixel, "
                f"{row['bytes_per_original_pixel']:.4f} bytes per original 512x512 pixel",
                flush=True,
            )
        results["server_peak_rss_mb"] = vm_hwm_mb(str(process.pid))
    finally:
        server.stop()

    # In a fresh process, so that the figure is the run's own peak, not this process's earlier work.
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--run-memory",
            str(key.directory),
            "--run-frames",
            str(args.run_frames),
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        encoding="utf-8",
        check=True,
    )
    results["client_peak_rss_mb"] = float(child.stdout.split()[-1])
    results["run_frames"] = args.run_frames
    print(
        f"peak memory: client {results['client_peak_rss_mb']:.0f} MB (obfuscating a {args.run_frames}-frame 512x512 "
        "run), "
        f"server {results['server_peak_rss_mb'] or float('nan'):.0f} MB",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
