"""The report of ``medprivacy watermark eval``: the JSON tables, their text form and the example PNG grid."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .eval_plan import ENSEMBLE, HELD_OUT_PREFIX, MUTATION_RANDOM_EQUAL, REPORT_FORMAT, EvalImage
from .eval_rates import attack_success_rate, ensemble_prediction, transfer_success_rate


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _predictions(records: list[tuple[EvalImage, dict]], members: Sequence[str]) -> np.ndarray:
    return np.array(
        [
            ensemble_prediction(rec["probabilities"], members)
            if len(members) > 1
            else int(np.argmax(rec["probabilities"][members[0]]))
            for _, rec in records
        ]
    )


def _clean_predictions(records: list[tuple[EvalImage, dict]], members: Sequence[str]) -> np.ndarray:
    return np.array(
        [
            ensemble_prediction(im.clean, members) if len(members) > 1 else int(np.argmax(im.clean[members[0]]))
            for im, _ in records
        ]
    )


def _row(records: list[tuple[EvalImage, dict]], members: Sequence[str]) -> dict[str, Any]:
    labels = np.array([im.label for im, _ in records], dtype=np.int64)
    rates = attack_success_rate(labels, _clean_predictions(records, members), _predictions(records, members))
    rates.update(
        {
            "attacked": len(records),
            "fooled_all_source_models": sum(rec["fooled_all_source_models"] for _, rec in records),
            "mean_evaluations": _mean([rec["evaluations"] for _, rec in records]),
            "mean_seconds": _mean([rec["seconds"] for _, rec in records]),
            "mean_server_seconds": _mean([rec["server_seconds"] for _, rec in records]),
            "mean_alpha": _mean([rec["alpha"] for _, rec in records]),
            "psnr": _mean([rec["psnr"] for _, rec in records]),
            "ssim": _mean([rec["ssim"] for _, rec in records]),
        }
    )
    return rates


def build_report(
    config,
    client,
    info,
    classifiers,
    images,
    attacked,
    labels,
    clean_pred,
    runs,
    table3_source,
    lesion_source,
    data_config,
    unlock,
    seconds,
) -> dict[str, Any]:
    from .boxes import MaskParams

    names = list(classifiers)
    members = {run.source: run.models for run in runs}
    targets = names + ([ENSEMBLE] if len(names) > 1 else [])
    target_members = {**{m: (m,) for m in names}, ENSEMBLE: tuple(names)}

    def records(run_key: str, label: int | None = None) -> list[tuple[EvalImage, dict]]:
        return [
            (im, im.runs[run_key]) for im in attacked if run_key in im.runs and (label is None or im.label == label)
        ]

    def accuracy(source: str) -> float:
        pred = clean_pred.get(source)
        if pred is None:
            stack = {m: np.stack([im.clean[m] for im in images]) for m in members[source]}
            pred = ensemble_prediction(stack, members[source])
        return float(np.mean(pred == labels))

    table1 = {}
    wap_runs = [run for run in runs if run.mode == "wap" and run.mutation == "basin-hopping"]
    for run in wap_runs:
        if run.source.startswith(HELD_OUT_PREFIX):
            continue
        row = _row(records(run.key), run.models)
        row["clean_accuracy"] = accuracy(run.source)
        row["models"] = list(run.models)
        table1[run.source] = row

    table2_rows: dict[str, dict] = {}
    for run in wap_runs:
        recs = records(run.key)
        row = {}
        for target in targets:
            tm = target_members[target]
            if recs:
                cell = transfer_success_rate(
                    [im.label for im, _ in recs],
                    _clean_predictions(recs, run.models),
                    _predictions(recs, run.models),
                    _clean_predictions(recs, tm),
                    _predictions(recs, tm),
                )
            else:
                cell = {"asr": None, "fooled": 0, "pool": 0}
            cell["white_box"] = bool(set(tm) & set(run.models))
            row[target] = cell
        table2_rows[run.source] = row
    held_out = {
        name: table2_rows[HELD_OUT_PREFIX + name][name] | {"source": HELD_OUT_PREFIX + name}
        for name in names
        if HELD_OUT_PREFIX + name in table2_rows
    }

    table3 = None
    if table3_source is not None:
        mutations = ["basin-hopping", "random"] + ([MUTATION_RANDOM_EQUAL] if config.equal_budget_random else [])
        rows: dict[str, dict] = {}
        for mutation in mutations:
            row = {}
            for mode in ("wap", "keep-in", "keep-out"):
                run_key = f"{mode}/{mutation}/{table3_source}"
                groups = {"lesion": 1, "no-lesion": 0} if mode == "wap" else {"lesion": 1}
                row[mode] = {group: _row(records(run_key, label), (table3_source,)) for group, label in groups.items()}
            rows[mutation] = row
        lesion_attacked = [im for im in attacked if im.label == 1]
        table3 = {
            "source": table3_source,
            "lesion_source": (
                "server segmenter (/v1/watermark/lesions, probability >= 0.5)"
                if lesion_source == "server"
                else "ground-truth masks of the synthetic images"
            ),
            "mask_params": asdict(MaskParams.for_image(data_config.size)),
            "lesion_images_attacked": len(lesion_attacked),
            "lesion_images_with_boxes": sum(bool(im.boxes) for im in lesion_attacked),
            "lesion_images_with_room": {
                mode: sum(mode in im.feasible for im in lesion_attacked) for mode in ("keep-in", "keep-out")
            },
            "definition": "ASR on the source (successes / correct before); keep-in and keep-out on lesion images "
            "with at least one lesion box and room for the logo, WAP on lesion and no-lesion images separately; "
            "'random' uses the same Np, Ng, CR as basin hopping (fewer evaluations: no hops)"
            + (
                "; 'random-equal-evaluations' runs Ng*(Niter+1) generations so it scores as many candidates"
                if config.equal_budget_random
                else ""
            ),
            "rows": rows,
        }

    per_image = []
    for im in images:
        entry = {
            "index": im.index,
            "seed": im.seed,
            "label": im.label,
            "source": im.source,
            "attacked": im in attacked,
            "clean_predicted": {m: int(np.argmax(p)) for m, p in im.clean.items()},
            "lesion_boxes": im.boxes,
            "runs": {},
        }
        for run_key, rec in im.runs.items():
            entry["runs"][run_key] = {k: v for k, v in rec.items() if k != "probabilities"} | {
                "predicted": {m: int(np.argmax(p)) for m, p in rec.get("probabilities", {}).items()}
            }
        per_image.append(entry)

    return {
        "format": REPORT_FORMAT,
        "server": {
            "url": client.url,
            "server_version": info.get("server_version"),
            "device": info.get("device"),
            "classifiers": {
                n: {"sha256": d.get("sha256"), "arch": d.get("arch"), "patch_size": d.get("patch_size")}
                for n, d in classifiers.items()
            },
        },
        "data": {
            "description": data_config.describe(),
            "split": config.split,
            "start": config.start,
            "images": len(images),
            "lesion_images": int(labels.sum()),
            "attack_set": config.attack,
            "attacked": len(attacked),
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "search": {
            **config.search(),
            "mode": "wap (Tables 1-2)",
            "label": "true label",
            "seed": config.seed,
            "seed_rule": "image i uses seed + i for every configuration",
            "stop_rule": "a search stops once every source model misclassifies the candidate, "
            "else after Ng generations; "
            "an ensemble row counts a success when the ensemble's mean probability is wrong",
        },
        "definitions": {
            "asr": "successful attacks / images the source classified correctly before "
            "(ensemble: argmax of the mean probability)",
            "transfer_asr": "target fooled / images whose watermark fooled the source and that the target classified "
            "correctly before; "
            "white_box marks targets that are (part of) the source",
            "attack_set": "all-correct: images every evaluated classifier classifies correctly (the paper's protocol); "
            "all: every image",
        },
        "clean_accuracy": {m: float(np.mean(p == labels)) for m, p in clean_pred.items()},
        "table1": table1,
        "table2": {"targets": targets, "rows": table2_rows, "held_out_target": held_out},
        "table3": table3,
        "unlock": unlock,
        "seconds": seconds,
        "images": per_image,
    }


# --- text and picture ------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return f"{'-':>6}" if value is None else f"{100 * value:5.1f}%"


def _short(name: str) -> str:
    return name.replace(HELD_OUT_PREFIX, "ens w/o ").replace("wm-cls-", "")


def format_report(report: dict) -> str:
    lines = [
        f"MedLocker evaluation: {report['data']['attacked']} of {report['data']['images']} held-out image(s) attacked "
        f"({report['data']['attack_set']}), {report['seconds']:.0f} s"
    ]
    lines.append("Table 1 (white-box, WAP): ASR = successes / correct before")
    lines.append(
        f"{'source':<24}{'ASR':>8}{'succ/n':>10}{'clean acc':>11}{'evals':>8}{'s/image':>9}{'PSNR':>7}{'SSIM':>7}"
    )
    for source, row in report["table1"].items():
        lines.append(
            f"{_short(source):<24}{_pct(row['asr']):>8}{row['successes']:>5}/{row['correct_before']:<4}"
            f"{row['clean_accuracy']:>11.3f}{row['mean_evaluations'] or 0:>8.0f}{row['mean_seconds'] or 0:>9.2f}"
            f"{row['psnr'] or 0:>7.1f}{row['ssim'] or 0:>7.3f}"
        )
    targets = report["table2"]["targets"]
    lines.append("Table 2 (transfer): ASR on targets of the watermarks that fooled the source (* white-box)")
    corner = "source / target"
    lines.append(f"{corner:<24}" + "".join(f"{_short(t)[:15]:>16}" for t in targets))
    for source, row in report["table2"]["rows"].items():
        cells = "".join(f"{_pct(row[t]['asr']) + ('*' if row[t]['white_box'] else ' '):>16}" for t in targets)
        lines.append(f"{_short(source):<24}{cells}")
    if report["table3"]:
        t3 = report["table3"]
        lines.append(f"Table 3 (source {_short(t3['source'])}, lesion boxes from {t3['lesion_source']}): ASR")
        lines.append(f"{'mutation':<26}{'WAP lesion':>12}{'WAP none':>12}{'keep-in':>12}{'keep-out':>12}")
        for mutation, row in t3["rows"].items():
            cells = [row["wap"]["lesion"], row["wap"]["no-lesion"], row["keep-in"]["lesion"], row["keep-out"]["lesion"]]
            lines.append(
                f"{mutation:<26}" + "".join(f"{_pct(c['asr']) + ' (' + str(c['attacked']) + ')':>12}" for c in cells)
            )
    unlock = report["unlock"]
    lines.append(
        f"unlock: {unlock['bit_exact']}/{unlock['checked']} watermarked images restored bit-exactly"
        + (f"; key {unlock['key_file_bytes_per_image']:.0f} bytes/image" if unlock["key_file_bytes"] else "")
    )
    return "\n".join(lines)


def write_grid(
    path: Path, attacked: list[EvalImage], names: Sequence[str], table3_source: str | None, count: int
) -> None:
    """PNG: per image, original / watermarked (ensemble WAP, else the first source) / lesion boxes (keep-out run),
    each with the predictions; lesion and no-lesion images alternate."""
    import SimpleITK as sitk
    from PIL import Image, ImageDraw, ImageFont

    from ..files import write_atomically

    path = Path(path)
    lesion = [im for im in attacked if im.label == 1 and im.runs]
    normal = [im for im in attacked if im.label == 0 and im.runs]
    chosen = [im for pair in zip(lesion, normal) for im in pair]
    chosen += [im for im in lesion + normal if im not in chosen]
    chosen = chosen[:count]
    wap_key = next((f"wap/basin-hopping/{s}" for s in (ENSEMBLE, *names)), None)
    font = ImageFont.load_default()
    height, width = chosen[0].pixels.shape[:2] if chosen else (128, 128)
    zoom = max(1, 256 // max(height, width))
    panel_w, text_h = width * zoom, 12 * (len(names) + 3)
    canvas = Image.new(
        "RGB",
        (3 * panel_w + 4 * 6, max(1, len(chosen)) * (height * zoom + text_h + 6) + 6 + (0 if chosen else 20)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    if not chosen:
        draw.text((6, 6), "no attacked image to show", fill="black", font=font)

    def label_text(probs: dict, label: int) -> list[str]:
        lines = []
        for m in names:
            p = np.asarray(probs[m])
            guess = int(np.argmax(p))
            lines.append(
                f"{_short(m)[:12]}: {'lesion' if guess else 'normal'} {p[guess]:.2f}{'' if guess == label else ' X'}"
            )
        if len(names) > 1:
            guess = int(ensemble_prediction(probs, names))
            lines.append(f"ensemble: {'lesion' if guess else 'normal'}{'' if guess == label else ' X'}")
        return lines

    for row, im in enumerate(chosen):
        top = 6 + row * (height * zoom + text_h + 6)
        constrained = (
            [f"{mode}/basin-hopping/{table3_source}" for mode in ("keep-out", "keep-in")] if table3_source else []
        )
        keyout = next((k for k in constrained if k in im.runs), None)
        wap = next((k for k in (wap_key, *im.runs) if k in im.runs), None)
        panels = [(im.pixels, f"original ({'lesion' if im.label else 'no lesion'}, seed {im.seed})", im.clean, None)]
        panels.append(
            (
                im.watermarked[wap],
                f"watermarked: {wap.split('/')[-1][:22]}",
                im.runs[wap]["probabilities"],
                im.runs[wap],
            )
        )
        if keyout in im.runs:
            panels.append(
                (
                    im.watermarked[keyout],
                    f"{keyout.split('/')[0]} + lesion boxes",
                    im.runs[keyout]["probabilities"],
                    im.runs[keyout],
                )
            )
        else:
            panels.append((im.pixels, "lesion boxes" + ("" if im.boxes else " (none)"), im.clean, None))
        for col, (pixels, title, probs, rec) in enumerate(panels):
            left = 6 + col * (panel_w + 6)
            picture = Image.fromarray(pixels).resize((width * zoom, height * zoom), Image.NEAREST)
            canvas.paste(picture, (left, top))
            if col == 2:
                for x, y, w, h in im.boxes:
                    draw.rectangle(
                        [left + x * zoom, top + y * zoom, left + (x + w) * zoom - 1, top + (y + h) * zoom - 1],
                        outline=(255, 40, 40),
                        width=2,
                    )
            if rec is not None:
                lh, lw = rec["logo_size"]
                x, y = rec["x"], rec["y"]
                draw.rectangle(
                    [left + x * zoom, top + y * zoom, left + (x + lw) * zoom - 1, top + (y + lh) * zoom - 1],
                    outline=(0, 200, 255),
                    width=1,
                )
            text = [title] + label_text(probs, im.label)
            for line_no, line in enumerate(text):
                draw.text((left, top + height * zoom + 1 + 12 * line_no), line, fill="black", font=font)
    array = np.asarray(canvas, dtype=np.uint8)
    write_atomically(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(tmp)))
