"""``medprivacy watermark eval``: the MedLocker paper's Tables 1-3 on held-out images, through a real server.

Images. The held-out ``test`` split of :mod:`medprivacy.watermark.data` (sample seeds 900000+, which training
never optimises on; ``--split validation`` draws the validation seeds instead, for choosing settings such as the
logo without looking at the test images), rendered as 8-bit RGB at the classifiers' input size from the server's
``/v1/info``, with their true labels (odd seed: lesion) and ground-truth lesion masks.

Which images are attacked (``--attack``). ``all-correct`` (default, the paper's protocol: "we only attack samples
that are successfully classified by all networks"): images every evaluated classifier gets right on the clean
image. ``all``: every drawn image (rates then still only count images the model got right before).

Every search is one ``/v1/watermark/optimize`` request per image and configuration, with the true label as the
class to move away from and the same search seed for every configuration of an image (``--seed`` + image index),
so configurations start from the same random population. A search stops once every source model misclassifies
(the server's rule), so an ensemble search runs on until all its members are fooled. Every watermarked image is
re-rendered here from the returned (alpha, x, y) with the key code (``WatermarkKey.protect``) and classified by every
classifier through ``/v1/watermark/classify``; all rates below use those predictions.

Definitions (``A``: the attacked images; ``y``: true label; a model's prediction on an ensemble is the argmax of
the weighted mean probability, eq. 8, weights 1/K):

* ASR of a source (Tables 1 and 3) = #{i in A: source right on clean i, wrong on watermarked i} ÷ #{i in A:
  source right on clean i}: successful attacks ÷ images correctly classified before, as in the paper.
* Transfer ASR source -> target (Table 2) = #{i in P: target wrong on watermarked i} ÷ #P with P = {i in A: the
  watermark found on the source fooled the source, and the target is right on clean i}: the paper's "come from
  the samples that successfully attacked source models". Cells where the target is (part of) the source are
  marked ``white_box``.
* Table 3 runs on one source (ResNet18 by default) with WAP, keep-in and keep-out placement and with basin-hopping
  and random mutation at the same settings; keep-in/keep-out run on lesion images that have at least one lesion
  box (the paper's "DR" columns), WAP on lesion and no-lesion images separately.

Each row also reports clean accuracy over all drawn images, mean evaluations, mean seconds per image (client wall
clock, and the server's own figure), mean PSNR/SSIM of watermarked vs original (scikit-image), and the report
ends with a bit-exactness check: every watermarked image is unlocked with the key (after an encrypt/decrypt round
trip of the key file) and compared with the original.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from .eval_plan import ENSEMBLE, MUTATION_RANDOM_EQUAL, TABLE3_PREFERRED, EvalConfig, EvalImage, Run, plan_runs
from .eval_rates import ensemble_prediction
from .eval_report import build_report, write_grid


def _server_classifiers(info: dict, wanted: Sequence[str] | None, url: str) -> dict[str, dict]:
    classifiers = {n: d for n, d in sorted(info.get("models", {}).items()) if d.get("task") == "classify"}
    if not classifiers:
        raise InputError(
            f"{url} holds no watermark classifier; serve the MedLocker models (medprivacy watermark train) first"
        )
    if wanted:
        unknown = [m for m in wanted if m not in classifiers]
        if unknown:
            raise InputError(
                f"{url} has no classifier {', '.join(map(repr, unknown))}; it has {', '.join(classifiers)}"
            )
        return {m: classifiers[m] for m in dict.fromkeys(wanted)}
    binary = {n: d for n, d in classifiers.items() if d.get("out_channels") in (None, 2)}
    if not binary:
        raise InputError(f"{url} holds no two-class (lesion / no lesion) classifier; pick --models explicitly")
    # The paper's four backbones first, in its order, then anything else.
    from .models import CLASSIFIER_NAMES

    return {
        n: binary[n]
        for n in sorted(binary, key=lambda n: (CLASSIFIER_NAMES.index(n) if n in CLASSIFIER_NAMES else 99, n))
    }


def _input_size(classifiers: dict[str, dict], override) -> tuple[int, int]:
    if override is not None:
        return int(override[0]), int(override[1])
    sizes = {tuple(int(v) for v in d.get("patch_size", (128, 128))) for d in classifiers.values()}
    return max(s[0] for s in sizes), max(s[1] for s in sizes)


def _planar(pixels: np.ndarray) -> np.ndarray:
    return np.moveaxis(pixels, -1, 0).astype(np.float32) / np.float32(255.0)


def _classify(client, images: list[np.ndarray], models: Sequence[str], batch: int = 32) -> dict[str, np.ndarray]:
    """Probabilities per model (N, C) for uint8 RGB images, through /v1/watermark/classify (uint8 upload: exact)."""
    out: dict[str, list] = {m: [] for m in models}
    for start in range(0, len(images), batch):
        answer = client.classify(np.stack([_planar(p) for p in images[start : start + batch]]), models=list(models))
        for m in models:
            out[m].append(np.asarray(answer["models"][m]["probabilities"], dtype=np.float64))
    return {m: np.concatenate(parts) for m, parts in out.items()}


def run_evaluation(
    client,
    config: EvalConfig,
    logo: np.ndarray | None = None,
    grid: Path | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the evaluation against ``client`` (a WatermarkClient) and return the report (see module docstring)."""
    from tqdm import tqdm

    from . import blending, boxes
    from .data import SPLIT_SEED_BASES, DataConfig, make_split
    from .keyfile import WatermarkKey

    config.check()
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    info = client.info()
    classifiers = _server_classifiers(info, config.models, client.url)
    names = list(classifiers)
    segmenters = [n for n, d in info.get("models", {}).items() if d.get("task") == "segment-lesion"]
    table3_source = None
    if config.table3:
        if config.table3_source is not None:
            if config.table3_source not in classifiers:
                raise InputError(
                    f"--table3-source {config.table3_source!r} is not an evaluated classifier ({', '.join(names)})"
                )
            table3_source = config.table3_source
        else:
            table3_source = TABLE3_PREFERRED if TABLE3_PREFERRED in classifiers else names[0]
    lesion_source = None
    if table3_source is not None:
        if config.lesions == "server" and not segmenters:
            raise InputError(
                f"{client.url} holds no lesion segmenter; use --lesions truth (the synthetic images' own masks)"
            )
        lesion_source = "server" if config.lesions in ("auto", "server") and segmenters else "truth"
    size = _input_size(classifiers, config.size)
    logo = blending.default_logo() if logo is None else blending.as_rgba(logo)
    logo_size = blending.fitted_size(
        size, logo.shape, config.sl
    )  # a logo that does not fit stops here, before any search

    data_config = DataConfig(size=size, seed=config.data_seed)
    log(
        f"rendering {config.images} {config.split} images ({size[0]}x{size[1]}, {config.split} split from seed "
        f"{SPLIT_SEED_BASES[config.split] + config.start})"
    )
    split = make_split(
        config.split, config.images, data_config, start=config.start, dtype=np.uint8, progress=bool(progress)
    )
    images = [
        EvalImage(i, int(split.seeds[i]), int(split.labels[i]), split.sources[i], split.images[i], split.masks[i])
        for i in range(len(split))
    ]
    labels = np.array([im.label for im in images])

    clean = _classify(client, [im.pixels for im in images], names)
    for im in images:
        im.clean = {m: clean[m][im.index] for m in names}
    clean_pred = {m: clean[m].argmax(axis=1) for m in names}
    if len(names) > 1:
        clean_pred[ENSEMBLE] = ensemble_prediction(clean, names)
    correct_all = np.all([clean_pred[m] == labels for m in names], axis=0)
    attacked = [im for im in images if config.attack == "all" or correct_all[im.index]]
    log(
        "clean accuracy: "
        + ", ".join(f"{m} {np.mean(clean_pred[m] == labels):.3f}" for m in clean_pred)
        + f"; attacking {len(attacked)} of {len(images)} image(s) ({config.attack})"
    )

    if table3_source is not None:
        params = boxes.MaskParams.for_image(size)
        lesion_images = [im for im in attacked if im.label == 1]
        for im in tqdm(
            lesion_images,
            desc="lesion masks",
            unit="image",
            file=sys.stderr,
            leave=False,
            disable=None if progress is None else not progress,
        ):
            if lesion_source == "server":
                im.mask = client.lesions(_planar(im.pixels)) >= 0.5
            else:
                im.mask = im.truth_mask.copy()
            im.boxes = [list(map(int, b)) for b in boxes.lesion_boxes(im.mask, params)]
            for mode in ("keep-in", "keep-out"):
                try:
                    boxes.Placement(mode, size, logo_size, im.boxes)
                    im.feasible.add(mode)
                except InputError:  # no box (keep-in), or boxes leaving no room for the logo (keep-out)
                    pass

    runs = plan_runs(names, config, table3_source)
    todo = [(im, run) for im in attacked for run in runs if _applies(run, im)]
    key = WatermarkKey()
    search = {k: v for k, v in config.search().items() if v is not None}
    bar = tqdm(
        total=len(todo),
        desc="watermark searches",
        unit="search",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    try:
        for im in attacked:
            mine = [run for run in runs if _applies(run, im)]
            for run in mine:
                bar.set_postfix_str(f"image {im.index + 1}/{len(images)} {run.key}", refresh=False)
                options = dict(search)
                if run.mutation == MUTATION_RANDOM_EQUAL:
                    # Same number of scored candidates as basin hopping: Np + Ng*(Niter+1)*Np.
                    options.update(mutation="random", generations=config.generations * (config.local_iterations + 1))
                else:
                    options["mutation"] = run.mutation
                wsm = run.mode != "wap"
                tic = time.perf_counter()
                answer = client.optimize(
                    im.pixels,
                    logo,
                    mask=im.mask if wsm else None,
                    mode=run.mode,
                    lesions="mask" if wsm else "none",
                    models=list(run.models),
                    label=im.label,
                    seed=config.seed + im.index,
                    **options,
                )
                wall = time.perf_counter() - tic
                found = answer["params"]
                watermarked = key.protect(
                    f"{im.seed}:{run.key}", im.pixels, logo, found["alpha"], found["x"], found["y"], config.sl
                )
                im.watermarked[run.key] = watermarked
                im.runs[run.key] = {
                    "alpha": float(found["alpha"]),
                    "x": int(found["x"]),
                    "y": int(found["y"]),
                    "logo_size": list(answer["logo_size"]),
                    "fooled_all_source_models": bool(answer["fooled"]),
                    "evaluations": int(answer["evaluations"]),
                    "stop_reason": answer["stop_reason"],
                    "seconds": wall,
                    "server_seconds": float(answer.get("elapsed_s", wall)),
                    "lesion_boxes": answer.get("lesion_boxes", []),
                }
                bar.update(1)
            if mine:
                keys = list(im.watermarked)
                after = _classify(client, [im.watermarked[k] for k in keys], names)
                for row, run_key in enumerate(keys):
                    im.runs[run_key]["probabilities"] = {m: after[m][row] for m in names}
                    im.runs[run_key].update(_quality(im.pixels, im.watermarked[run_key]))
    finally:
        bar.close()

    unlock = _unlock_check(key, attacked)
    report = build_report(
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
        time.perf_counter() - started,
    )
    if grid is not None:
        write_grid(grid, attacked, names, table3_source, config.grid_images)
        report["grid"] = str(grid)
    return report


def _applies(run: Run, im: EvalImage) -> bool:
    # keep-in / keep-out only where lesion boxes constrain the logo (without boxes keep-out would just be WAP).
    return not run.lesion_only or (im.label == 1 and bool(im.boxes) and run.mode in im.feasible)


def _quality(original: np.ndarray, watermarked: np.ndarray) -> dict[str, float | None]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(original, watermarked):
        return {"psnr": None, "ssim": 1.0}
    psnr = float(peak_signal_noise_ratio(original, watermarked, data_range=255))
    ssim = float(structural_similarity(original, watermarked, channel_axis=-1, data_range=255))
    return {"psnr": psnr, "ssim": ssim}


def _unlock_check(key, attacked: list[EvalImage]) -> dict[str, Any]:
    """Encrypt the key to a file, read it back, unlock every watermarked image and compare with the original."""
    from .keyfile import generate_key_file, load_key, save_key, unlock

    checked = exact = 0
    size = None
    if len(key):
        with tempfile.TemporaryDirectory(prefix="watermark-eval-") as folder:
            secret = generate_key_file(Path(folder) / "secret")
            path = save_key(key, Path(folder) / "eval.mlkey", key_file=secret)
            size = path.stat().st_size
            key = load_key(path, key_file=secret)
        for im in attacked:
            for run_key, watermarked in im.watermarked.items():
                restored = unlock(watermarked, key[f"{im.seed}:{run_key}"])
                checked += 1
                exact += bool(restored.dtype == im.pixels.dtype and np.array_equal(restored, im.pixels))
    return {
        "checked": checked,
        "bit_exact": exact,
        "all_bit_exact": checked == exact,
        "key_file_bytes": size,
        "key_file_bytes_per_image": (size / checked) if checked else None,
        "method": "WatermarkKey.protect with the found parameters, key encrypted with a key file (AES-GCM), "
        "loaded back, keyfile.unlock, compared pixel by pixel with the original",
    }
