"""Which logo fools the classifiers best: white-box ASR per candidate logo on the validation split.

The paper's ablation varies "the type of logo"; this is how MedLocker's default mark was chosen. Starts
`medprivacy serve` on 127.0.0.1 with Resources/Models and runs `medprivacy watermark eval --split validation`
(images the test tables never see) once per logo, with the paper's search settings, on one source model
(ResNet18 by default). Prints ASR on all attacked images and separately on lesion / no-lesion images, PSNR and
mean alpha; writes bench/results/watermark_logo_ablation.json. Figures, not pass/fail.

Candidates: ``badge`` (the default: grey padlock on an opaque near-black plate), ``outline`` (white padlock,
transparent around it), ``plate-white`` (the white padlock on an opaque navy plate) and ``icon`` (the extension's
icon, Resources/MedPrivacy.png).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOGOS = ("badge", "outline", "plate-white", "icon")


def write_logos(folder: Path) -> dict[str, Path]:
    import SimpleITK as sitk

    from medprivacy.watermark import blending

    outline = blending.default_logo(256, "outline").astype(np.float64)
    opacity = outline[..., 3:4] / 255.0
    navy = np.array(blending.OUTLINE_RGB, dtype=np.float64)
    plate_white = np.concatenate(
        [opacity * outline[..., :3] + (1 - opacity) * navy, np.full((256, 256, 1), 255.0)], axis=2
    )
    pictures = {
        "badge": blending.default_logo(256),
        "outline": blending.default_logo(256, "outline"),
        "plate-white": np.clip(np.rint(plate_white), 0, 255).astype(np.uint8),
    }
    paths = {"icon": ROOT / "Resources" / "MedPrivacy.png"}
    for name, rgba in pictures.items():
        paths[name] = folder / f"{name}.png"
        sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(paths[name]))
    return {name: paths[name] for name in LOGOS}


def summarize(report: dict, source: str) -> dict:
    """Table 1's row for ``source`` plus the same ASR on lesion and on no-lesion images apart."""
    from medprivacy.watermark.eval_rates import attack_success_rate

    row = report["table1"][source]
    attacked = [im for im in report["images"] if im["attacked"]]
    by_label = {}
    for label, name in ((1, "lesion"), (0, "no_lesion")):
        images = [im for im in attacked if im["label"] == label]
        by_label[name] = attack_success_rate(
            [label] * len(images),
            [im["clean_predicted"][source] for im in images],
            [im["runs"][f"wap/basin-hopping/{source}"]["predicted"][source] for im in images],
        )
    return {
        "asr": row["asr"],
        "successes": row["successes"],
        "correct_before": row["correct_before"],
        "by_label": by_label,
        "psnr": row["psnr"],
        "ssim": row["ssim"],
        "mean_alpha": row["mean_alpha"],
    }


def rate_text(rate) -> str:
    return "  n/a" if rate is None else f"{100 * rate:5.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=80, help="validation images to draw (default 80)")
    parser.add_argument("--source", default="wm-cls-resnet18", help="source classifier (default wm-cls-resnet18)")
    parser.add_argument("--logos", default=",".join(LOGOS), help=f"comma-separated subset of {','.join(LOGOS)}")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "Resources" / "Models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the server (default: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "watermark_logo_ablation.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from medprivacy.files import write_json
    from medprivacy.server.local import start_local_server

    wanted = [name.strip() for name in args.logos.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(LOGOS))
    if unknown:
        parser.error(f"unknown logo(s) {', '.join(unknown)}; choose from {', '.join(LOGOS)}")
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="watermark-logos-"))
    logos = write_logos(work)
    server = start_local_server(["--host", "127.0.0.1", "--models-dir", str(args.models_dir)], work / "server.log")
    url = server.url
    results = {}
    try:
        for name in wanted:
            report_path = work / f"{name}.json"
            command = [
                sys.executable,
                "-m",
                "medprivacy.cli",
                "watermark",
                "eval",
                "--server",
                url,
                "--split",
                "validation",
                "--images",
                str(args.images),
                "--models",
                args.source,
                "--no-held-out",
                "--no-table3",
                "--logo",
                str(logos[name]),
                "--out",
                str(report_path),
            ]
            print("$ medprivacy " + " ".join(command[3:]), flush=True)
            done = subprocess.run(command, stdout=subprocess.DEVNULL)
            if done.returncode != 0:
                return done.returncode
            results[name] = summarize(json.loads(report_path.read_text(encoding="utf-8")), args.source)
            r = results[name]
            print(
                f"{name:12s} ASR {rate_text(r['asr'])} % ({r['successes']}/{r['correct_before']}), lesion "
                f"{rate_text(r['by_label']['lesion']['asr'])} %, "
                f"no lesion {rate_text(r['by_label']['no_lesion']['asr'])} %, "
                f"PSNR {r['psnr']:.1f} dB, mean alpha {r['mean_alpha']:.0f}",
                flush=True,
            )
    finally:
        server.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        {
            "split": "validation",
            "images": args.images,
            "source": args.source,
            "search": "paper defaults: sl=4, Np=50, Ng=3, CR=0.9, s=10, Niter=3, alpha in [100, 255]; WAP",
            "logos": results,
        },
        args.out,
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
