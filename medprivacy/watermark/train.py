"""Training of the MedLocker classifiers and lesion segmenter (``medprivacy watermark train``).

One run, seeded, trains on the 2D lesion dataset of :mod:`medprivacy.watermark.data`:
- four "lesion / no lesion" classifiers (ResNet18, DenseNet121, EfficientNet-B0, VGG-style CNN), cross-entropy, Adam;
- a 2D U-Net lesion segmenter, Dice + cross-entropy, Adam.
Every model gets its own seed stream (weights init, batch order, augmentation), so training a subset of them gives
the same weights as a full run. Batch-norm statistics are re-estimated on training images before each validation
(EfficientNet's BN momentum of 0.01 otherwise lags far behind a short training). The weights of the best
validation score are kept; accuracy / Dice on the held-out test seeds is reported and written to the manifest,
whose ``watermark_training`` entry records the command, data, config and metrics (the mixup models' ``training``
entry is left alone).
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from .data import make_split
from .models import FAMILIES, SEGMENTER_FAMILY, model_name
from .train_loop import train_classifier, train_segmenter
from .train_manifest import write_record
from .train_plans import PRESETS, TARGET_ACCURACY, WatermarkTrainConfig, parse_families, plan_for

# ------------------------------------------------------------------------------------------------ training


def train_watermark_models(
    config: WatermarkTrainConfig, out_dir: str | os.PathLike, progress: bool = True, command: str | None = None
) -> dict:
    """Train ``config.families``, save each into ``out_dir`` as soon as it is done, and record the run in the
    manifest's ``watermark_training`` entry. Returns that entry."""
    import torch

    from ..nets import resolve_device

    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train_all(config, out_dir, progress, command, resolve_device(config.device))
    finally:
        torch.set_num_threads(previous_threads)


def _train_all(config: WatermarkTrainConfig, out_dir, progress: bool, command: str | None, device: str) -> dict:
    import torch

    started = time.time()
    unknown = [f for f in config.families if f not in FAMILIES]
    if unknown:
        raise InputError(f"unknown network families {unknown}; use {', '.join(FAMILIES)}")

    data_config = config.data_config()
    t0 = time.time()
    train = make_split("train", config.train_samples, data_config, dtype=np.uint8, progress=progress)
    validation = make_split("validation", config.validation_samples, data_config, dtype=np.uint8, progress=progress)
    test = make_split("test", config.test_samples, data_config, dtype=np.uint8, progress=progress)
    data_seconds = time.time() - t0
    data_description = (
        f"{data_config.describe()}; {len(train)} train / {len(validation)} validation / {len(test)} held-out test "
        "images, stored 8-bit"
    )
    record = {
        "command": command or f"medprivacy watermark train --preset {config.preset} --seed {config.seed}",
        "config": config.to_json(),
        "data": data_description,
        "data_seconds": round(data_seconds, 1),
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": {},
        "target_accuracy": TARGET_ACCURACY,
    }
    for family in config.families:
        plan = plan_for(config, family)
        if family == SEGMENTER_FAMILY:
            metrics = train_segmenter(config, plan, train, validation, test, device, out_dir, progress)
        else:
            metrics = train_classifier(config, plan, family, train, validation, test, device, out_dir, progress)
        record["models"][model_name(family)] = metrics
        record["seconds"] = round(time.time() - started, 1)
        write_record(out_dir, record)
        if progress:
            from tqdm import tqdm

            tqdm.write(f"{model_name(family)}: {_summary(metrics)}")
    return record


def _summary(metrics: dict) -> str:
    keys = ("held_out_accuracy", "held_out_dice", "validation_best", "steps", "seconds")
    return ", ".join(f"{k} {metrics[k]}" for k in keys if k in metrics)


# ------------------------------------------------------------------------------------------------------ CLI


def add_train_arguments(parser) -> None:
    """Options of ``medprivacy watermark train``."""
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="cpu-small",
        help="cpu-small: 128x128, about two hours on one CPU core; smoke: a few steps at 32x32 (tests)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="models folder (default: Resources/Models or $MEDPRIVACY_MODELS_DIR)"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (weights, batch order, augmentation)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default; on a machine busy with other jobs 1 can be much faster)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {','.join(FAMILIES)} to (re)train; the others keep their weights and "
        "manifest entries (each network has its own seed stream, so a subset gives the same weights as a full run)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def command_line(args) -> str:
    """The exact command that reproduces ``args`` (every option written out)."""
    parts = ["medprivacy", "watermark", "train", "--preset", args.preset]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    parts += ["--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads)]
    if getattr(args, "models", None):
        parts += ["--models", ",".join(parse_families(args.models))]
    return " ".join(shlex.quote(p) for p in parts)


def run_train(args) -> int:
    from ..nets import models_dir

    # Validation scores go to the log as they come: a run that does not learn shows it within minutes.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.threads < 0:
        raise InputError("--threads must be 0 (torch's default) or a positive number")
    if args.seed < 0:
        raise InputError("--seed must be 0 or a positive number")
    overrides = {"families": parse_families(args.models)} if args.models else {}
    config = WatermarkTrainConfig.preset_config(
        args.preset, seed=args.seed, device=args.device, threads=args.threads, **overrides
    )
    out = models_dir(args.out)
    record = train_watermark_models(config, out, progress=not args.quiet, command=command_line(args))
    for name, metrics in record["models"].items():
        print(f"{name}: {_summary(metrics)}")
    print(f"trained in {record['seconds']:.0f} s; models in {out}")
    return 0
