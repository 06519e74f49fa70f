"""``medprivacy watermark eval``: the MedLocker paper's Tables 1-3 on held-out images, through a real server.

Images. The held-out ``test`` split of :mod:`medprivacy.watermark.data` (sample seeds 900000+, which training
never optimises on; ``--split validation`` draws the validation seeds instead, for choosing settings such as the
logo without looking at the test images), rendered as 8-bit RGB at the classifiers' input size from the server's ``/v1/info``, with
their true labels (odd seed: lesion) and ground-truth lesion masks.

Which images are attacked (``--attack``). ``all-correct`` (default, the paper's protocol: "we only attack samples
that are successfully classified by all networks"): images every evaluated classifier gets right on the clean
image. ``all``: every drawn image (rates then still only count images the model got right before).

Every search is one ``/v1/watermark/optimize`` request per image and configuration, with the true label as the
class to move away from and the same search seed for every configuration of an image (``--seed`` + image index),
so configurations start from the same random population. A search stops once every source model misclassifies
(the server's rule), so an ensemble search runs on until all its members are fooled. Every watermarked image is re-rendered here from the
returned (alpha, x, y) with the key code (``WatermarkKey.protect``) and classified by every classifier through
``/v1/watermark/classify``; all rates below use those predictions.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError

ATTACK_SETS = ("all-correct", "all")
#: Never "train": the classifiers were fitted to those images, so rates there say nothing about new data.
EVAL_SPLITS = ("test", "validation")
LESION_SOURCES = ("auto", "server", "truth")
ENSEMBLE = "ensemble"
HELD_OUT_PREFIX = "ensemble-without-"
TABLE3_PREFERRED = "wm-cls-resnet18"
MUTATION_RANDOM_EQUAL = "random-equal-evaluations"
REPORT_FORMAT = "medprivacy-watermark-eval"


# --- rates -----------------------------------------------------------------------------------------------------

def _rate(successes: int, total: int) -> float | None:
    return successes / total if total else None


def attack_success_rate(labels, clean_pred, watermarked_pred) -> dict[str, Any]:
    """ASR = successful attacks ÷ images the model classified correctly before (per-image arrays of classes).

    Returns ``{"asr", "successes", "correct_before", "images"}``; ``asr`` is None when nothing was right before.
    """
    labels, clean_pred, watermarked_pred = (np.asarray(a).reshape(-1) for a in (labels, clean_pred, watermarked_pred))
    if not (labels.shape == clean_pred.shape == watermarked_pred.shape):
        raise ValueError(f"labels and predictions differ in length: {labels.shape}, {clean_pred.shape}, {watermarked_pred.shape}")
    correct = clean_pred == labels
    success = correct & (watermarked_pred != labels)
    return {"asr": _rate(int(success.sum()), int(correct.sum())), "successes": int(success.sum()),
            "correct_before": int(correct.sum()), "images": int(labels.size)}


def transfer_success_rate(labels, source_clean, source_watermarked, target_clean, target_watermarked) -> dict[str, Any]:
    """Transfer ASR = target fooled ÷ images whose watermark fooled the source and that the target got right clean.

    Returns ``{"asr", "fooled", "pool"}``; ``asr`` is None when the pool is empty.
    """
    arrays = [np.asarray(a).reshape(-1) for a in (labels, source_clean, source_watermarked, target_clean, target_watermarked)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("labels and predictions differ in length")
    labels, source_clean, source_watermarked, target_clean, target_watermarked = arrays
    pool = (source_clean == labels) & (source_watermarked != labels) & (target_clean == labels)
    fooled = pool & (target_watermarked != labels)
    return {"asr": _rate(int(fooled.sum()), int(pool.sum())), "fooled": int(fooled.sum()), "pool": int(pool.sum())}


def ensemble_prediction(probabilities: dict[str, np.ndarray], members: Sequence[str], weights=None) -> np.ndarray:
    """argmax of the weighted mean of the members' class probabilities (eq. 8); weights default to 1/K."""
    stack = np.stack([np.asarray(probabilities[m], dtype=np.float64) for m in members])
    beta = np.full(len(members), 1.0 / len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.einsum("k,k...c->...c", beta, stack).argmax(axis=-1)


# --- configuration ---------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    images: int = 20
    start: int = 0  # offset into the split
    split: str = "test"  # "validation" to choose settings (e.g. the logo) without looking at the test images
    seed: int = 0  # search seed of the first image; image i uses seed + i
    data_seed: int = 0
    size: tuple[int, int] | None = None  # default: the classifiers' input size
    attack: str = "all-correct"
    models: tuple[str, ...] | None = None  # default: every two-class classifier on the server
    held_out: bool = True
    table3: bool = True
    table3_source: str | None = None
    equal_budget_random: bool = False
    lesions: str = "auto"
    sl: float = 4.0
    population: int = 50
    generations: int = 3
    crossover_rate: float = 0.9
    step: int = 10
    local_iterations: int = 3
    alpha_range: tuple[float, float] = (100.0, 255.0)
    max_evaluations: int | None = None
    grid_images: int = 4

    def check(self) -> None:
        if self.images < 1:
            raise InputError(f"--images must be at least 1 (got {self.images})")
        if self.start < 0 or self.seed < 0 or self.data_seed < 0:
            raise InputError("--start, --seed and --data-seed must not be negative")
        if self.split not in EVAL_SPLITS:
            raise InputError(f"--split must be one of {', '.join(EVAL_SPLITS)}")
        if self.attack not in ATTACK_SETS:
            raise InputError(f"--attack must be one of {', '.join(ATTACK_SETS)}")
        if self.lesions not in LESION_SOURCES:
            raise InputError(f"--lesions must be one of {', '.join(LESION_SOURCES)}")
        if self.population < 1 or self.generations < 0 or self.local_iterations < 0 or self.step < 1:
            raise InputError("--population and --step must be at least 1, --generations and --local-iterations at least 0")
        if not 0.0 <= self.crossover_rate <= 1.0:
            raise InputError(f"--crossover-rate {self.crossover_rate} must lie in [0, 1]")
        low, high = self.alpha_range
        if not 0.0 <= low <= high <= 255.0:
            raise InputError(f"alpha range {low:g}-{high:g} must satisfy 0 <= min <= max <= 255")
        if not self.sl > 0:
            raise InputError(f"--sl must be positive (got {self.sl:g})")
        if self.grid_images < 0:
            raise InputError("--grid-images must not be negative")

    def search(self) -> dict[str, Any]:
        return {"sl": self.sl, "population": self.population, "generations": self.generations,
                "crossover_rate": self.crossover_rate, "step": self.step, "local_iterations": self.local_iterations,
                "alpha_range": [float(v) for v in self.alpha_range], "max_evaluations": self.max_evaluations}


@dataclass(frozen=True)
class Run:
    """One search configuration applied to every attacked image it suits."""

    key: str
    source: str  # the row name: a classifier, "ensemble" or "ensemble-without-<name>"
    models: tuple[str, ...]
    mode: str = "wap"
    mutation: str = "basin-hopping"
    lesion_only: bool = False  # keep-in / keep-out: lesion images with lesion boxes only


def plan_runs(classifiers: Sequence[str], config: EvalConfig, table3_source: str | None) -> list[Run]:
    runs = [Run(f"wap/basin-hopping/{name}", name, (name,)) for name in classifiers]
    if len(classifiers) > 1:
        runs.append(Run(f"wap/basin-hopping/{ENSEMBLE}", ENSEMBLE, tuple(classifiers)))
    if config.held_out and len(classifiers) > 2:
        for name in classifiers:
            others = tuple(m for m in classifiers if m != name)
            runs.append(Run(f"wap/basin-hopping/{HELD_OUT_PREFIX}{name}", HELD_OUT_PREFIX + name, others))
    if table3_source is not None:
        mutations = ["basin-hopping", "random"] + ([MUTATION_RANDOM_EQUAL] if config.equal_budget_random else [])
        for mode in ("wap", "keep-in", "keep-out"):
            for mutation in mutations:
                if mode == "wap" and mutation == "basin-hopping":
                    continue  # the Table 1 run of the same source, same seed
                runs.append(Run(f"{mode}/{mutation}/{table3_source}", table3_source, (table3_source,), mode, mutation, mode != "wap"))
    return runs


# --- the evaluation --------------------------------------------------------------------------------------------

@dataclass(eq=False)  # compared by identity: the fields hold arrays
class _Image:
    index: int
    seed: int
    label: int
    source: str
    pixels: np.ndarray  # (H, W, 3) uint8
    truth_mask: np.ndarray
    mask: np.ndarray | None = None  # lesion mask used for keep-in/keep-out
    boxes: list = field(default_factory=list)
    feasible: set = field(default_factory=set)  # lesion-constrained modes with room for the logo
    clean: dict[str, np.ndarray] = field(default_factory=dict)  # model -> probabilities (C,)
    runs: dict[str, dict] = field(default_factory=dict)  # run key -> record
    watermarked: dict[str, np.ndarray] = field(default_factory=dict)


def _server_classifiers(info: dict, wanted: Sequence[str] | None, url: str) -> dict[str, dict]:
    classifiers = {n: d for n, d in sorted(info.get("models", {}).items()) if d.get("task") == "classify"}
    if not classifiers:
        raise InputError(f"{url} holds no watermark classifier; serve the MedLocker models (medprivacy watermark train) first")
    if wanted:
        unknown = [m for m in wanted if m not in classifiers]
        if unknown:
            raise InputError(f"{url} has no classifier {', '.join(map(repr, unknown))}; it has {', '.join(classifiers)}")
        return {m: classifiers[m] for m in dict.fromkeys(wanted)}
    binary = {n: d for n, d in classifiers.items() if d.get("out_channels") in (None, 2)}
    if not binary:
        raise InputError(f"{url} holds no two-class (lesion / no lesion) classifier; pick --models explicitly")
    # The paper's four backbones first, in its order, then anything else.
    from .models import CLASSIFIER_NAMES

    return {n: binary[n] for n in sorted(binary, key=lambda n: (CLASSIFIER_NAMES.index(n) if n in CLASSIFIER_NAMES else 99, n))}


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
        answer = client.classify(np.stack([_planar(p) for p in images[start:start + batch]]), models=list(models))
        for m in models:
            out[m].append(np.asarray(answer["models"][m]["probabilities"], dtype=np.float64))
    return {m: np.concatenate(parts) for m, parts in out.items()}


def run_evaluation(client, config: EvalConfig, logo: np.ndarray | None = None, grid: Path | None = None,
                   progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
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
                raise InputError(f"--table3-source {config.table3_source!r} is not an evaluated classifier ({', '.join(names)})")
            table3_source = config.table3_source
        else:
            table3_source = TABLE3_PREFERRED if TABLE3_PREFERRED in classifiers else names[0]
    lesion_source = None
    if table3_source is not None:
        if config.lesions == "server" and not segmenters:
            raise InputError(f"{client.url} holds no lesion segmenter; use --lesions truth (the synthetic images' own masks)")
        lesion_source = "server" if config.lesions in ("auto", "server") and segmenters else "truth"
    size = _input_size(classifiers, config.size)
    logo = blending.default_logo() if logo is None else blending.as_rgba(logo)
    logo_size = blending.fitted_size(size, logo.shape, config.sl)  # a logo that does not fit stops here, before any search

    data_config = DataConfig(size=size, seed=config.data_seed)
    log(f"rendering {config.images} {config.split} images ({size[0]}x{size[1]}, {config.split} split from seed "
        f"{SPLIT_SEED_BASES[config.split] + config.start})")
    split = make_split(config.split, config.images, data_config, start=config.start, dtype=np.uint8, progress=bool(progress))
    images = [_Image(i, int(split.seeds[i]), int(split.labels[i]), split.sources[i], split.images[i], split.masks[i])
              for i in range(len(split))]
    labels = np.array([im.label for im in images])

    clean = _classify(client, [im.pixels for im in images], names)
    for im in images:
        im.clean = {m: clean[m][im.index] for m in names}
    clean_pred = {m: clean[m].argmax(axis=1) for m in names}
    if len(names) > 1:
        clean_pred[ENSEMBLE] = ensemble_prediction(clean, names)
    correct_all = np.all([clean_pred[m] == labels for m in names], axis=0)
    attacked = [im for im in images if config.attack == "all" or correct_all[im.index]]
    log("clean accuracy: " + ", ".join(f"{m} {np.mean(clean_pred[m] == labels):.3f}" for m in clean_pred)
        + f"; attacking {len(attacked)} of {len(images)} image(s) ({config.attack})")

    if table3_source is not None:
        params = boxes.MaskParams.for_image(size)
        lesion_images = [im for im in attacked if im.label == 1]
        for im in tqdm(lesion_images, desc="lesion masks", unit="image", file=sys.stderr, leave=False,
                       disable=None if progress is None else not progress):
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
    bar = tqdm(total=len(todo), desc="watermark searches", unit="search", file=sys.stderr,
               disable=None if progress is None else not progress)
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
                answer = client.optimize(im.pixels, logo, mask=im.mask if wsm else None, mode=run.mode,
                                         lesions="mask" if wsm else "none", models=list(run.models), label=im.label,
                                         seed=config.seed + im.index, **options)
                wall = time.perf_counter() - tic
                found = answer["params"]
                watermarked = key.protect(f"{im.seed}:{run.key}", im.pixels, logo, found["alpha"], found["x"], found["y"], config.sl)
                im.watermarked[run.key] = watermarked
                im.runs[run.key] = {
                    "alpha": float(found["alpha"]), "x": int(found["x"]), "y": int(found["y"]),
                    "logo_size": list(answer["logo_size"]), "fooled_all_source_models": bool(answer["fooled"]),
                    "evaluations": int(answer["evaluations"]), "stop_reason": answer["stop_reason"],
                    "seconds": wall, "server_seconds": float(answer.get("elapsed_s", wall)),
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
    report = _report(config, client, info, classifiers, images, attacked, labels, clean_pred, runs, table3_source, lesion_source,
                     data_config, unlock, time.perf_counter() - started)
    if grid is not None:
        write_grid(grid, attacked, names, table3_source, config.grid_images)
        report["grid"] = str(grid)
    return report


def _applies(run: Run, im: _Image) -> bool:
    # keep-in / keep-out only where lesion boxes constrain the logo (without boxes keep-out would just be WAP).
    return not run.lesion_only or (im.label == 1 and bool(im.boxes) and run.mode in im.feasible)


def _quality(original: np.ndarray, watermarked: np.ndarray) -> dict[str, float | None]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(original, watermarked):
        return {"psnr": None, "ssim": 1.0}
    psnr = float(peak_signal_noise_ratio(original, watermarked, data_range=255))
    ssim = float(structural_similarity(original, watermarked, channel_axis=-1, data_range=255))
    return {"psnr": psnr, "ssim": ssim}


def _unlock_check(key, attacked: list[_Image]) -> dict[str, Any]:
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
    return {"checked": checked, "bit_exact": exact, "all_bit_exact": checked == exact,
            "key_file_bytes": size, "key_file_bytes_per_image": (size / checked) if checked else None,
            "method": "WatermarkKey.protect with the found parameters, key encrypted with a key file (AES-GCM), "
                      "loaded back, keyfile.unlock, compared pixel by pixel with the original"}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _predictions(records: list[tuple[_Image, dict]], members: Sequence[str]) -> np.ndarray:
    return np.array([ensemble_prediction(rec["probabilities"], members) if len(members) > 1
                     else int(np.argmax(rec["probabilities"][members[0]])) for _, rec in records])


def _clean_predictions(records: list[tuple[_Image, dict]], members: Sequence[str]) -> np.ndarray:
    return np.array([ensemble_prediction(im.clean, members) if len(members) > 1 else int(np.argmax(im.clean[members[0]]))
                     for im, _ in records])


def _row(records: list[tuple[_Image, dict]], members: Sequence[str]) -> dict[str, Any]:
    labels = np.array([im.label for im, _ in records], dtype=np.int64)
    rates = attack_success_rate(labels, _clean_predictions(records, members), _predictions(records, members))
    rates.update({
        "attacked": len(records),
        "fooled_all_source_models": sum(rec["fooled_all_source_models"] for _, rec in records),
        "mean_evaluations": _mean([rec["evaluations"] for _, rec in records]),
        "mean_seconds": _mean([rec["seconds"] for _, rec in records]),
        "mean_server_seconds": _mean([rec["server_seconds"] for _, rec in records]),
        "mean_alpha": _mean([rec["alpha"] for _, rec in records]),
        "psnr": _mean([rec["psnr"] for _, rec in records]),
        "ssim": _mean([rec["ssim"] for _, rec in records]),
    })
    return rates


def _report(config, client, info, classifiers, images, attacked, labels, clean_pred, runs, table3_source, lesion_source,
            data_config, unlock, seconds) -> dict[str, Any]:
    from .boxes import MaskParams

    names = list(classifiers)
    members = {run.source: run.models for run in runs}
    targets = names + ([ENSEMBLE] if len(names) > 1 else [])
    target_members = {**{m: (m,) for m in names}, ENSEMBLE: tuple(names)}

    def records(run_key: str, label: int | None = None) -> list[tuple[_Image, dict]]:
        return [(im, im.runs[run_key]) for im in attacked if run_key in im.runs and (label is None or im.label == label)]

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
                    [im.label for im, _ in recs], _clean_predictions(recs, run.models), _predictions(recs, run.models),
                    _clean_predictions(recs, tm), _predictions(recs, tm))
            else:
                cell = {"asr": None, "fooled": 0, "pool": 0}
            cell["white_box"] = bool(set(tm) & set(run.models))
            row[target] = cell
        table2_rows[run.source] = row
    held_out = {name: table2_rows[HELD_OUT_PREFIX + name][name] | {"source": HELD_OUT_PREFIX + name}
                for name in names if HELD_OUT_PREFIX + name in table2_rows}

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
            "lesion_source": ("server segmenter (/v1/watermark/lesions, probability >= 0.5)" if lesion_source == "server"
                              else "ground-truth masks of the synthetic images"),
            "mask_params": asdict(MaskParams.for_image(data_config.size)),
            "lesion_images_attacked": len(lesion_attacked),
            "lesion_images_with_boxes": sum(bool(im.boxes) for im in lesion_attacked),
            "lesion_images_with_room": {mode: sum(mode in im.feasible for im in lesion_attacked) for mode in ("keep-in", "keep-out")},
            "definition": "ASR on the source (successes / correct before); keep-in and keep-out on lesion images with at "
                          "least one lesion box and room for the logo, WAP on lesion and no-lesion images separately; 'random' uses the same "
                          "Np, Ng, CR as basin hopping (fewer evaluations: no hops)"
                          + ("; 'random-equal-evaluations' runs Ng*(Niter+1) generations so it scores as many candidates"
                             if config.equal_budget_random else ""),
            "rows": rows,
        }

    per_image = []
    for im in images:
        entry = {"index": im.index, "seed": im.seed, "label": im.label, "source": im.source, "attacked": im in attacked,
                 "clean_predicted": {m: int(np.argmax(p)) for m, p in im.clean.items()}, "lesion_boxes": im.boxes, "runs": {}}
        for run_key, rec in im.runs.items():
            entry["runs"][run_key] = {k: v for k, v in rec.items() if k != "probabilities"} | {
                "predicted": {m: int(np.argmax(p)) for m, p in rec.get("probabilities", {}).items()}}
        per_image.append(entry)

    return {
        "format": REPORT_FORMAT,
        "server": {"url": client.url, "server_version": info.get("server_version"), "device": info.get("device"),
                   "classifiers": {n: {"sha256": d.get("sha256"), "arch": d.get("arch"), "patch_size": d.get("patch_size")}
                                   for n, d in classifiers.items()}},
        "data": {"description": data_config.describe(), "split": config.split, "start": config.start, "images": len(images),
                 "lesion_images": int(labels.sum()), "attack_set": config.attack, "attacked": len(attacked)},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "search": {**config.search(), "mode": "wap (Tables 1-2)", "label": "true label", "seed": config.seed,
                   "seed_rule": "image i uses seed + i for every configuration",
                   "stop_rule": "a search stops once every source model misclassifies the candidate, else after Ng generations; "
                                "an ensemble row counts a success when the ensemble's mean probability is wrong"},
        "definitions": {
            "asr": "successful attacks / images the source classified correctly before (ensemble: argmax of the mean probability)",
            "transfer_asr": "target fooled / images whose watermark fooled the source and that the target classified correctly before; "
                            "white_box marks targets that are (part of) the source",
            "attack_set": "all-correct: images every evaluated classifier classifies correctly (the paper's protocol); all: every image",
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
    lines = [f"MedLocker evaluation: {report['data']['attacked']} of {report['data']['images']} held-out image(s) attacked "
             f"({report['data']['attack_set']}), {report['seconds']:.0f} s"]
    lines.append("Table 1 (white-box, WAP): ASR = successes / correct before")
    lines.append(f"{'source':<24}{'ASR':>8}{'succ/n':>10}{'clean acc':>11}{'evals':>8}{'s/image':>9}{'PSNR':>7}{'SSIM':>7}")
    for source, row in report["table1"].items():
        lines.append(f"{_short(source):<24}{_pct(row['asr']):>8}{row['successes']:>5}/{row['correct_before']:<4}"
                     f"{row['clean_accuracy']:>11.3f}{row['mean_evaluations'] or 0:>8.0f}{row['mean_seconds'] or 0:>9.2f}"
                     f"{row['psnr'] or 0:>7.1f}{row['ssim'] or 0:>7.3f}")
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
            lines.append(f"{mutation:<26}" + "".join(f"{_pct(c['asr']) + ' (' + str(c['attacked']) + ')':>12}" for c in cells))
    unlock = report["unlock"]
    lines.append(f"unlock: {unlock['bit_exact']}/{unlock['checked']} watermarked images restored bit-exactly"
                 + (f"; key {unlock['key_file_bytes_per_image']:.0f} bytes/image" if unlock["key_file_bytes"] else ""))
    return "\n".join(lines)


def write_grid(path: Path, attacked: list[_Image], names: Sequence[str], table3_source: str | None, count: int) -> None:
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
    height, width = (chosen[0].pixels.shape[:2] if chosen else (128, 128))
    zoom = max(1, 256 // max(height, width))
    panel_w, text_h = width * zoom, 12 * (len(names) + 3)
    canvas = Image.new("RGB", (3 * panel_w + 4 * 6, max(1, len(chosen)) * (height * zoom + text_h + 6) + 6 + (0 if chosen else 20)), "white")
    draw = ImageDraw.Draw(canvas)
    if not chosen:
        draw.text((6, 6), "no attacked image to show", fill="black", font=font)

    def label_text(probs: dict, label: int) -> list[str]:
        lines = []
        for m in names:
            p = np.asarray(probs[m])
            guess = int(np.argmax(p))
            lines.append(f"{_short(m)[:12]}: {'lesion' if guess else 'normal'} {p[guess]:.2f}{'' if guess == label else ' X'}")
        if len(names) > 1:
            guess = int(ensemble_prediction(probs, names))
            lines.append(f"ensemble: {'lesion' if guess else 'normal'}{'' if guess == label else ' X'}")
        return lines

    for row, im in enumerate(chosen):
        top = 6 + row * (height * zoom + text_h + 6)
        constrained = [f"{mode}/basin-hopping/{table3_source}" for mode in ("keep-out", "keep-in")] if table3_source else []
        keyout = next((k for k in constrained if k in im.runs), None)
        wap = next((k for k in (wap_key, *im.runs) if k in im.runs), None)
        panels = [(im.pixels, f"original ({'lesion' if im.label else 'no lesion'}, seed {im.seed})", im.clean, None)]
        panels.append((im.watermarked[wap], f"watermarked: {wap.split('/')[-1][:22]}", im.runs[wap]["probabilities"], im.runs[wap]))
        if keyout in im.runs:
            panels.append((im.watermarked[keyout], f"{keyout.split('/')[0]} + lesion boxes", im.runs[keyout]["probabilities"], im.runs[keyout]))
        else:
            panels.append((im.pixels, "lesion boxes" + ("" if im.boxes else " (none)"), im.clean, None))
        for col, (pixels, title, probs, rec) in enumerate(panels):
            left = 6 + col * (panel_w + 6)
            picture = Image.fromarray(pixels).resize((width * zoom, height * zoom), Image.NEAREST)
            canvas.paste(picture, (left, top))
            if col == 2:
                for x, y, w, h in im.boxes:
                    draw.rectangle([left + x * zoom, top + y * zoom, left + (x + w) * zoom - 1, top + (y + h) * zoom - 1], outline=(255, 40, 40), width=2)
            if rec is not None:
                lh, lw = rec["logo_size"]
                x, y = rec["x"], rec["y"]
                draw.rectangle([left + x * zoom, top + y * zoom, left + (x + lw) * zoom - 1, top + (y + lh) * zoom - 1], outline=(0, 200, 255), width=1)
            text = [title] + label_text(probs, im.label)
            for line_no, line in enumerate(text):
                draw.text((left, top + height * zoom + 1 + 12 * line_no), line, fill="black", font=font)
    array = np.asarray(canvas, dtype=np.uint8)
    write_atomically(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(tmp)))

