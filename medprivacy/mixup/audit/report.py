"""The audit's picture (patient | what the server could rebuild) and its one-screen summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_audit_png(volumes: dict, path: Path) -> None:
    """One column per volume (patient first), one row per plane (axial, coronal, sagittal mid-slices of the brain),
    intensities clipped to [0, 1]. Volumes are (Z, Y, X) on the model grid (LPS: flipped so superior is up)."""
    import SimpleITK as sitk

    from ...files import write_atomically
    from ..model_space import analysis_mask
    from ..patches import brain_bounding_box

    box = brain_bounding_box(analysis_mask(), margin=0)
    z, y, x = ((a + b) // 2 for a, b in box)
    region = tuple(slice(a, b) for a, b in box)
    rows = []
    for cut in (lambda v: v[z][::-1, :], lambda v: v[:, y][::-1, :], lambda v: v[:, :, x][::-1, ::-1]):
        tiles = [np.clip(cut(np.pad(np.asarray(v)[region], 0)), 0, 1) for v in volumes.values()]
        height = max(t.shape[0] for t in tiles)
        row = []
        for tile in tiles:
            padded = np.zeros((height, tile.shape[1]))
            padded[: tile.shape[0]] = tile
            row.extend([padded, np.ones((height, 3))])
        rows.append(np.concatenate(row[:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    mosaic = np.concatenate([np.pad(r, ((0, 3), (0, width - r.shape[1])), constant_values=1.0) for r in rows])[:-3]
    image = sitk.GetImageFromArray((mosaic * 255).astype(np.uint8))
    write_atomically(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp)))


def format_audit(report: dict) -> str:
    lines = []
    level = report.get("privacy", {}).get("level", "?")
    lines.append(f"Privacy audit, level {level}: {report['scan']['uploads']} uploads of {report['scan']['name']}")
    guess = report["scan"]["template_only"]
    lines.append(
        f"  template only (no upload)      r {guess['r']:.3f}  PSNR {guess['psnr_db']:5.2f} dB  MS-SSIM "
        f"{guess['ms_ssim']:.3f}"
    )
    for name, entry in report["scan"].get("attacks", {}).items():
        placed = entry.get("placement", {})
        where = (
            f"  placed exactly {100 * placed['placed_exactly']:5.1f} %, "
            f"within a step {100 * placed['placed_within_one_step']:5.1f} %"
            if placed
            else ""
        )
        lines.append(
            f"  attack {name:<23} r {entry['r']:.3f}  PSNR {entry['psnr_db']:5.2f} dB  MS-SSIM "
            f"{entry['ms_ssim']:.3f}{where}"
        )
    if "projected_all_uploads" in report["scan"]:
        projected = report["scan"]["projected_all_uploads"]
        lines.append(
            f"  projected to all {report['scan']['uploads']} uploads    r {projected['r']:.3f}  PSNR "
            f"{projected['psnr_db']:5.2f} dB  MS-SSIM {projected['ms_ssim']:.3f}"
            f"  ({100 * projected['placed_share']:.1f} % at true places; {report['scan']['uploads_attacked']} attacked)"
        )
    if "oracle_bound" in report["scan"]:
        bound = report["scan"]["oracle_bound"]
        lines.append(
            f"  bound: copies at true places   r {bound['r']:.3f}  PSNR {bound['psnr_db']:5.2f} dB  MS-SSIM "
            f"{bound['ms_ssim']:.3f}"
        )
    if "pairing" in report["scan"]:
        pairing = report["scan"]["pairing"]
        lines.append(
            f"  overlap pairing: true neighbour first in {100 * pairing['true_neighbour_first']:.0f} % of "
            f"{pairing['queries']} queries"
        )
    if "reidentification" in report:
        reid = report["reidentification"]
        lines.append(
            f"  re-identification ({reid['subjects']} subjects x 2 scans): mAP {reid['attack_map']:.3f} "
            f"(chance {reid['chance']:.3f}, no protection {max(reid['no_protection'].values()):.3f}, "
            f"copies at true places {max(reid['oracle_bound'].values()):.3f})"
        )
    verdict = report.get("verdict")
    if verdict:
        lines.append("  " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()))
    return "\n".join(lines)
