"""Mixup-Privacy speed, traffic, memory and leakage figures on a 256³ 1 mm brain volume with a loopback server.

Prints (and writes to --out as JSON):
- plain (baseline endpoint) vs private k=1, k=8 and the default level's k wall time, end to end and server part
  only;
- overhead ratio private k=1 ÷ plain (target ≤ 1.5) and k=8 ÷ k=1 (target ≤ 8);
- bytes up/down per uploaded voxel per TTA copy;
- peak client memory per mode (each mode runs in its own process; target ≤ 3 GB) and server peak;
- leakage: Pearson r between each upload and the patient patch it carries (median, 90th percentile, max); what a
  server can rebuild from all uploads together is measured by `make audit` (medprivacy mixup audit).

Figures, not pass/fail: run with `make bench`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_volume(path: Path) -> None:
    """The held-out sample brain placed in a 256³ 1 mm oblique grid (a typical isotropic T1 matrix)."""
    import SimpleITK as sitk

    from medprivacy.data.synth import HELD_OUT_SEED_BASE, synthesize_subject, to_scanner_space

    seed = HELD_OUT_SEED_BASE + 555
    image, _ = to_scanner_space(synthesize_subject(seed), seed, spacing=(1.0, 1.0, 1.0))
    grid = sitk.Image([256, 256, 256], sitk.sitkFloat32)
    grid.SetDirection(image.GetDirection())
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    grid.SetOrigin((center - np.array(image.GetDirection()).reshape(3, 3) @ np.full(3, 127.5)).tolist())
    sitk.WriteImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0), str(path))


def child(mode: str, url: str, volume: str, key_dir: str) -> dict:
    """One measurement in a fresh process, so the peak memory is this mode's alone."""
    from medprivacy.mixup.bank import ReferenceBank
    from medprivacy.mixup.io import read_image
    from medprivacy.mixup.pipeline import prepare_scan, segment_plain, segment_private
    from medprivacy.transport import InferenceClient

    bank = ReferenceBank.load(key_dir)
    client = InferenceClient(url)
    image = read_image(volume)
    started = time.perf_counter()
    if mode == "plain":
        _, stats = segment_plain(image, client, bank.patch_size)
        patches = len(prepare_scan(image, bank.patch_size).patches)
        stats.update(patches_sent=patches, tta=1)
    else:
        k = int(mode.split("=")[1])
        stats = segment_private(image, client, bank, tta=k).stats
    stats["seconds"] = time.perf_counter() - started
    # Linux keeps ru_maxrss across fork and exec, so it would report the bench parent's peak (which holds the 256³
    # volume) whenever that is larger; VmHWM starts afresh at exec.
    try:
        stats["peak_rss_mb"] = _peak_rss_mb("self")
    except (OSError, StopIteration):
        stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stats


def _peak_rss_mb(pid) -> float:
    """Peak resident memory (VmHWM) of process ``pid`` ("self" for this one), in MB; Linux only."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def server_time(url: str, key_dir: str, volume: str, endpoint: str, tta: int) -> float:
    """Seconds spent sending N·k patches and getting answers (preprocessing excluded), same process for all."""
    from medprivacy.mixup.audit.capture import capture
    from medprivacy.mixup.bank import ReferenceBank
    from medprivacy.mixup.io import read_image
    from medprivacy.mixup.pipeline import prepare_scan
    from medprivacy.mixup.privacy import privacy_settings
    from medprivacy.transport import InferenceClient

    bank = ReferenceBank.load(key_dir)
    prepared = prepare_scan(read_image(volume), bank.patch_size)
    if endpoint == "mixup":  # exactly what a private run at the default level sends
        rows = capture(prepared, bank, privacy_settings(None, tta), np.random.default_rng(0)).uploads
    else:
        rows = prepared.patches
    client = InferenceClient(url)
    started = time.perf_counter()
    # One request's answers at a time, as the pipeline consumes them: decoding all N·k answers into one array
    # would time a 600 MB allocation at k=8 rather than the server.
    for start in range(0, len(rows), client.request_patches):
        client.segment(rows[start : start + client.request_patches, None], endpoint=endpoint)
    return time.perf_counter() - started


def leakage(key_dir: str, volume: str) -> dict:
    """Pearson r between each upload of a k=1 run at the default level and the patient patch it carries (as cut,
    filled and turned): how much of the patient one upload shows by itself."""
    from medprivacy.mixup.bank import ReferenceBank
    from medprivacy.mixup.io import read_image
    from medprivacy.mixup.pipeline import make_uploads, plan_session, prepare_scan
    from medprivacy.mixup.privacy import privacy_settings

    bank = ReferenceBank.load(key_dir)
    prepared = prepare_scan(read_image(volume), bank.patch_size)
    session = plan_session(prepared, bank, privacy_settings(None, 1), np.random.default_rng(1))
    uploads, _, parts, _ = make_uploads(session, bank, slice(None))
    uploads, parts = uploads.reshape(len(uploads), -1), parts.reshape(len(parts), -1)
    informative = parts.std(axis=1) > 0.02

    def standardise(x):
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)

    r = (standardise(uploads[informative]) * standardise(parts[informative])).sum(axis=1)
    return {
        "uploads": int(informative.sum()),
        "median_r": float(np.median(r)),
        "p90_r": float(np.percentile(r, 90)),
        "max_r": float(r.max()),
        "share_above_0.95": float((r > 0.95).mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixup_bench.json")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "URL", "VOLUME", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from medprivacy.mixup.bank import generate_bank
    from medprivacy.mixup.privacy import privacy_settings
    from medprivacy.server.local import start_local_server

    default_k = privacy_settings().tta
    default_mode = f"private k={default_k}"
    work = Path(tempfile.mkdtemp(prefix="mixup-bench-"))
    volume = work / "brain_256.nii.gz"
    make_volume(volume)
    key_dir = work / "key"
    patch_size = generate_bank(key_dir).patch_size
    server = start_local_server(["--host", "127.0.0.1", "--enable-baseline"], work / "server.log")
    process, url = server.process, server.url
    results: dict = {"volume": "256x256x256, 1 mm, oblique, held-out synthetic brain from the MNI152 T1"}
    try:
        for mode in ("plain", "private k=1", "private k=8", default_mode):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode.split()[-1], url, str(volume), str(key_dir)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{mode:<12} {results[mode]['seconds']:7.1f} s   client peak {results[mode]['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
        results["server_only_seconds"] = {
            "plain": server_time(url, str(key_dir), str(volume), "baseline", 1),
            "mixed k=1": server_time(url, str(key_dir), str(volume), "mixup", 1),
            "mixed k=8": server_time(url, str(key_dir), str(volume), "mixup", 8),
        }
        results["server_peak_rss_mb"] = _peak_rss_mb(process.pid)
    finally:
        server.stop()

    results["leakage_upload_vs_its_patient_patch_r"] = leakage(str(key_dir), str(volume))

    private1, private8, private_default, plain = (
        results["private k=1"],
        results["private k=8"],
        results[default_mode],
        results["plain"],
    )
    voxels_per_patch = int(np.prod(patch_size))
    results["overhead_private_k1_over_plain"] = private1["seconds"] / plain["seconds"]
    results["k8_over_k1"] = private8["seconds"] / private1["seconds"]
    results[f"k{default_k}_over_k1"] = private_default["seconds"] / private1["seconds"]
    results["bytes_up_per_voxel_per_copy"] = private8["bytes_sent"] / (private8["patches_sent"] * voxels_per_patch)
    results["bytes_down_per_voxel_per_copy"] = private8["bytes_received"] / (
        private8["patches_sent"] * voxels_per_patch
    )
    only = results["server_only_seconds"]
    print(
        f"overhead private k=1 / plain: {results['overhead_private_k1_over_plain']:.2f} end to end, "
        f"{only['mixed k=1'] / only['plain']:.2f} server part only (target ≤ 1.5)"
    )
    print(
        f"private k=8 / k=1: {results['k8_over_k1']:.2f} end to end, "
        f"{only['mixed k=8'] / only['mixed k=1']:.2f} server part only (target ≤ 8)"
    )
    print(f"private k={default_k} (the default) / k=1: {results[f'k{default_k}_over_k1']:.2f} end to end")
    print(
        f"bytes per uploaded voxel per TTA copy: {results['bytes_up_per_voxel_per_copy']:.3f} up, "
        f"{results['bytes_down_per_voxel_per_copy']:.3f} down"
    )
    print(
        f"peak memory: client {max(r['peak_rss_mb'] for r in (plain, private1, private8, private_default)):.0f} MB "
        f"(target ≤ 3072), server {results['server_peak_rss_mb']:.0f} MB"
    )
    leak = results["leakage_upload_vs_its_patient_patch_r"]
    print(
        f"leakage, Pearson r upload↔the patient patch it carries: median {leak['median_r']:.3f}, "
        f"p90 {leak['p90_r']:.3f}, max {leak['max_r']:.3f}, share > 0.95 {leak['share_above_0.95']:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
