"""``medprivacy mixup eval``: the paper's Table 1 on held-out scans, through the real server.

Per subject: Baseline (unmixed patches, baseline endpoint), then one private run with k TTA copies whose
answers are unmixed both naively and by the learned network — so Naive/Learned and ±TTA see the same mixed
uploads and differ only in the unmixing — plus a second, independent k=1 draw for the test–retest ICC.
Dice is computed on each scan's own grid, after the full register → segment → resample-back path.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import InputError
from ..labels import TISSUE_SEGMENTS
from .privacy import PrivacySettings, privacy_settings

METHODS = ("Baseline", "Naive", "Naive+TTA", "Learned", "Learned+TTA")
CLASS_NAMES = [name for _, (name, _) in sorted(TISSUE_SEGMENTS.items())]


def dice_per_class(prediction: np.ndarray, truth: np.ndarray) -> dict:
    out = {}
    for value, (name, _) in sorted(TISSUE_SEGMENTS.items()):
        p, t = prediction == value, truth == value
        denominator = int(p.sum()) + int(t.sum())
        out[name] = float(2 * np.logical_and(p, t).sum() / denominator) if denominator else 1.0
    out["mean"] = float(np.mean([out[n] for n in CLASS_NAMES]))
    return out


def icc_absolute_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """ICC(2,1), two-way random effects, absolute agreement, single measurement (McGraw & Wong 1996)."""
    data = np.stack([first, second], axis=1).astype(np.float64)
    n, k = data.shape
    if n < 2:
        return float("nan")
    grand = data.mean()
    ss_rows = k * ((data.mean(1) - grand) ** 2).sum()
    ss_cols = n * ((data.mean(0) - grand) ** 2).sum()
    ss_error = ((data - grand) ** 2).sum() - ss_rows - ss_cols
    ms_rows, ms_cols = ss_rows / (n - 1), ss_cols / (k - 1)
    ms_error = ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return float((ms_rows - ms_error) / denominator) if denominator > 0 else float("nan")


def _cases(images, labels, synthetic: int):
    import SimpleITK as sitk

    from .io import read_image

    if len(images) != len(labels):
        raise InputError("give one --label for each --image")
    for image_path, label_path in zip(images, labels):
        yield str(image_path), read_image(image_path), sitk.ReadImage(str(label_path))
    if synthetic:
        from ..data.synth import HELD_OUT_SEED_BASE, synthesize_subject, to_scanner_space

        for i in range(synthetic):
            seed = HELD_OUT_SEED_BASE + i
            image, label = to_scanner_space(synthesize_subject(seed), seed)
            yield f"synthetic held-out subject (seed {seed})", image, label


def evaluate(
    images,
    labels,
    synthetic: int,
    client,
    key_dir=None,
    tta: int | None = None,
    seed: int = 0,
    progress=None,
    privacy: str | PrivacySettings | None = None,
) -> dict:
    import SimpleITK as sitk

    from .bank import ReferenceBank
    from .pipeline import Unmixer, check_server_model, finish_labelmap, prepare_scan, private_scores, segment_plain

    if not images and not synthetic:
        raise InputError("nothing to evaluate: give --image/--label pairs and/or --synthetic N")
    settings = privacy if isinstance(privacy, PrivacySettings) else privacy_settings(privacy, tta)
    if settings.tta < 2:
        raise InputError("--tta must be at least 2 to compare with and without test-time augmentation")
    bank = ReferenceBank.load(key_dir)
    info = check_server_model(client, bank.patch_size)
    if not info.get("baseline_enabled"):
        raise InputError("the server's baseline endpoint is off; start it with --enable-baseline for evaluation")
    unmixers = {"naive": Unmixer("naive", info, bank.patch_size), "learned": Unmixer("learned", info, bank.patch_size)}
    rng = np.random.default_rng(seed)
    per_subject = []
    started = time.perf_counter()
    total = len(images) + synthetic
    for index, (name, image, label) in enumerate(_cases(images, labels, synthetic)):
        if progress:
            progress(f"evaluating {name} ({index + 1}/{total})", None)
        truth = sitk.GetArrayFromImage(label)
        prepared = prepare_scan(image, bank.patch_size)  # registration once, shared by every method
        baseline, _ = segment_plain(image, client, bank.patch_size, prepared=prepared)
        private = private_scores(prepared, client, bank, unmixers, settings, rng, score_first_copy=True)
        retest = private_scores(
            prepared,
            client,
            bank,
            {"learned": unmixers["learned"]},
            settings.with_changes(tta=1, level=settings.level),
            rng,
        )
        learned_weights = unmixers["learned"].decision_weights
        predictions = {
            "Baseline": baseline,
            "Naive": finish_labelmap(prepared, private.first_copy["naive"]),
            "Naive+TTA": finish_labelmap(prepared, private.averaged["naive"]),
            "Learned": finish_labelmap(prepared, private.first_copy["learned"], learned_weights),
            "Learned+TTA": finish_labelmap(prepared, private.averaged["learned"], learned_weights),
            "Learned (retest)": finish_labelmap(prepared, retest.averaged["learned"], learned_weights),
        }
        stats = private.stats
        dice = {method: dice_per_class(sitk.GetArrayFromImage(p), truth) for method, p in predictions.items()}
        per_subject.append(
            {"case": name, "dice": dice, "bytes_sent": stats["bytes_sent"], "patches_sent": stats["patches_sent"]}
        )

    table = {}
    for method in METHODS:
        table[method] = {c: float(np.mean([s["dice"][method][c] for s in per_subject])) for c in CLASS_NAMES + ["mean"]}
    icc = {
        c: icc_absolute_agreement(
            np.array([s["dice"]["Learned"][c] for s in per_subject]),
            np.array([s["dice"]["Learned (retest)"][c] for s in per_subject]),
        )
        for c in CLASS_NAMES
    }
    baseline_mean = table["Baseline"]["mean"]
    return {
        "table1": table,
        "icc_learned_two_reference_draws": icc,
        "learned_tta_over_baseline": table["Learned+TTA"]["mean"] / baseline_mean if baseline_mean else float("nan"),
        "tta": settings.tta,
        "privacy": settings.to_json(),
        "subjects": per_subject,
        "server": {
            "url": client.url if hasattr(client, "url") else None,
            "server_version": info.get("server_version"),
            "device": info.get("device"),
            "models": {k: v.get("sha256") for k, v in info["models"].items()},
        },
        "seconds": time.perf_counter() - started,
    }


def format_report(report: dict) -> str:
    header = f"{'Method':<14}" + "".join(f"{c:>14}" for c in CLASS_NAMES) + f"{'Avg':>10}"
    level = report.get("privacy", {}).get("level", "?")
    lines = [
        f"Dice on {len(report['subjects'])} held-out scan(s), privacy level {level}, TTA k={report['tta']}",
        header,
        "-" * len(header),
    ]
    for method, row in report["table1"].items():
        lines.append(f"{method:<14}" + "".join(f"{row[c]:>14.3f}" for c in CLASS_NAMES) + f"{row['mean']:>10.3f}")
    icc = report["icc_learned_two_reference_draws"]
    lines.append(f"{'ICC (Learned)':<14}" + "".join(f"{icc[c]:>14.3f}" for c in CLASS_NAMES))
    lines.append(f"Learned+TTA / Baseline mean Dice: {report['learned_tta_over_baseline']:.3f}")
    return "\n".join(lines)
