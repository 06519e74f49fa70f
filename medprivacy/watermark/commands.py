"""What ``medprivacy watermark protect | unlock | verify | new-key-file | eval`` do, once ``watermark.cli`` has parsed
their arguments: the key's credentials, then each command's body.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli import client_from_args
from ..errors import InputError
from .worker_tasks import PASSPHRASE_ENV  # one name for the CLI and the worker

# --- credentials -----------------------------------------------------------------------------------------------


def _credentials(args, confirm: bool = False) -> dict:
    """``{"passphrase": ...}`` or ``{"key_file": ...}`` for keyfile.save_key / load_key."""
    if args.key_file is not None:
        return {"key_file": args.key_file}
    if args.passphrase_file is not None:
        try:
            text = Path(args.passphrase_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise InputError(
                f"cannot read passphrase file {args.passphrase_file} ({reason}); check the path and its permissions"
            ) from None
        lines = text.splitlines()
        # Only the line break an editor adds is dropped: spaces may be part of a passphrase.
        passphrase = lines[0] if lines else ""
        if not passphrase:
            raise InputError(f"passphrase file {args.passphrase_file} is empty; write the passphrase on its first line")
        return {"passphrase": passphrase}
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if passphrase:
        return {"passphrase": passphrase}
    if sys.stdin.isatty():
        import getpass

        passphrase = getpass.getpass("key passphrase: ")
        if confirm and passphrase and getpass.getpass("repeat passphrase: ") != passphrase:
            raise InputError("the two passphrases differ; run the command again")
        if passphrase:
            return {"passphrase": passphrase}
    raise InputError(
        f"the key needs a passphrase or a secret: give --passphrase-file, --key-file, or set {PASSPHRASE_ENV}"
    )


def _load_key(path: Path, credentials: dict):
    from .keyfile import load_key

    return load_key(path, **credentials)


# --- protect ---------------------------------------------------------------------------------------------------


def run_protect(args) -> int:
    from . import blending
    from .batch import (
        SearchSettings,
        check_classifiers,
        choose_lesion_source,
        plan_protection,
        prepare_folders,
        protect_files,
    )
    from .keyfile import WatermarkKey
    from .true_labels import classifier_labels, read_labels_csv, resolve_label, resolve_labels

    credentials = _credentials(args, confirm=not args.append)
    key_path = Path(args.key)
    if key_path.is_dir():
        raise InputError(f"--key {key_path} is a folder; give a file name for the key")
    if not key_path.parent.is_dir():
        raise InputError(f"the folder of --key {key_path} does not exist; create it first")
    if key_path.exists() and not args.append:
        raise InputError(
            f"key {key_path} already exists; pass --append to add these images to it, or choose a new key file"
        )
    key = _load_key(key_path, credentials) if key_path.exists() else WatermarkKey()
    logo = blending.load_logo(args.logo) if args.logo is not None else blending.default_logo()
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    weights = _weights(args.weights, models)
    if args.sl <= 0:
        raise InputError(f"--sl must be positive (got {args.sl:g})")

    raw_labels = read_labels_csv(args.labels) if args.labels is not None else None
    jobs = plan_protection(args.images, args.out, key, logo, args.sl, args.overwrite, key_label=f"key {args.key}")
    # Every place something will be written is tried now, before the server spends minutes on the first image.
    prepare_folders(args.out, key_path, "folder of --key")
    client = _client(args)
    info = check_classifiers(client, models)
    class_names = classifier_labels(info, models)
    label = resolve_label(args.label, class_names, "--label") if args.label is not None else None
    per_image = (
        resolve_labels(raw_labels, class_names, args.labels, [path for path, _ in jobs])
        if raw_labels is not None
        else None
    )
    lesions = choose_lesion_source(args.mode, args.lesions, info, note=lambda text: print(text, file=sys.stderr))
    settings = SearchSettings(
        mode=args.mode,
        models=models,
        weights=weights,
        label=label,
        sl=args.sl,
        population=args.population,
        generations=args.generations,
        crossover_rate=args.crossover_rate,
        step=args.step,
        local_iterations=args.local_iterations,
        alpha_range=(args.alpha_min, args.alpha_max),
        mutation=args.mutation,
        max_evaluations=args.max_evaluations,
        seed=args.seed,
    )

    bar = _progress(len(jobs))
    source = f"label from {args.labels.name}" if args.labels is not None else "--label"

    def report(path, target, image, answer) -> None:
        _report(bar, path, target, image, answer, source)
        bar.update(1)

    try:
        done = protect_files(
            jobs,
            client,
            key,
            logo,
            settings,
            lesions,
            key_path,
            credentials,
            on_image=report,
            on_partial_save=lambda text: print(f"medprivacy: {text}", file=sys.stderr),
            labels=per_image,
        )
    finally:
        bar.close()
    print(f"protected {done} image(s) into {args.out}; key {key_path} holds {len(key)} image(s)")
    return 0


def _weights(text: str | None, models: list[str] | None) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InputError(f"--weights {text!r} must be comma-separated numbers") from None
    if models is None:
        raise InputError("--weights needs --models, so each weight names its model")
    if len(weights) != len(models):
        raise InputError(f"--weights has {len(weights)} numbers for {len(models)} --models")
    return weights


def _client(args):
    from ..transport.watermark_client import WatermarkClient

    return client_from_args(args, WatermarkClient)


def _progress(total: int):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, pipes).
    return tqdm(total=total, desc="protecting", unit="image", file=sys.stderr, disable=None)


def _report(bar, path: Path, target: Path, image, answer: dict, label_source: str = "--label") -> None:
    from .true_labels import describe_target

    params = answer["params"]
    verdict = "fooled every model" if answer["fooled"] else "not every model fooled"
    if answer.get("target_source") == "label" and all(
        answer["before"][m]["predicted"][0] != answer["target"] for m in answer["models"]
    ):
        verdict = "every model was already wrong on the clean image"
    note = " (JPEG is lossy: written as PNG)" if image.format == "jpeg" else ""
    lines = [
        f"{path.name} -> {target}{note}: {verdict}; alpha {params['alpha']:.1f} at x={params['x']} y={params['y']}, "
        f"logo {answer['logo_size'][1]}x{answer['logo_size'][0]}, {answer['evaluations']} evaluations",
        f"  target: {describe_target(answer, label_source)}",
    ]
    for name in answer["models"]:
        before, after = answer["before"][name], answer["after"][name]
        lines.append(f"  {name}: {_top(before)} -> {_top(after)}")
    bar.write("\n".join(lines), file=sys.stdout)


def _top(prediction: dict) -> str:
    index = prediction["predicted"][0]
    label = prediction["labels"].get(str(index), f"class {index}")
    return f"{label} {prediction['probabilities'][0][index]:.2f}"


# --- unlock, verify, new-key-file ------------------------------------------------------------------------------


def run_unlock(args) -> int:
    from . import io as mio
    from .batch import check_target
    from .keyfile import unlock

    key = _load_key(args.key, _credentials(args))
    targets = []
    for path in args.images:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist or is not a file; give a protected image")
        target = Path(args.out) / mio.output_name(path)
        check_target(path, target, args.overwrite)
        targets.append((path, target))
    # Every image is checked against the key before any is written: a mistake in the list leaves no partial output.
    for path, _ in targets:
        if key.find(mio.read_image(path).pixels) is None:
            raise InputError(
                f"{path.name} is not protected by key {args.key}, or it was changed after protection; "
                "nothing was restored"
            )
    from .batch import make_output_folder

    make_output_folder(args.out)
    from tqdm import tqdm

    for path, target in tqdm(targets, desc="unlocking", unit="image", file=sys.stderr, disable=None):
        image = mio.read_image(path)
        mio.write_image(image, unlock(image.pixels, key), target)
    print(f"restored {len(targets)} image(s) into {args.out}")
    return 0


def run_verify(args) -> int:
    from . import io as mio

    key = _load_key(args.key, _credentials(args))
    image = mio.read_image(args.image)
    entry = key.find(image.pixels)
    if entry is None:
        print(f"{args.image}: not protected by this key (or changed after protection)")
        return 1
    print(
        f"{args.image}: protected by this key as {entry.name!r}: alpha {entry.alpha:.2f} at x={entry.x} y={entry.y}, "
        f"sl {entry.sl:g}, logo {entry.logo_size[1]}x{entry.logo_size[0]}, "
        f"{entry.dtype} {'x'.join(map(str, entry.shape))}, "
        f"{'exact unlock' if entry.original is not None else 'approximate unlock only'}"
    )
    return 0


def run_new_key_file(args) -> int:
    from .keyfile import generate_key_file

    path = generate_key_file(args.path)
    print(
        f"wrote a 32-byte secret to {path} (mode 0600); keep it safe: without it the keys it encrypts cannot be opened"
    )
    return 0


# --- eval: Tables 1-3 of the paper through a server (watermark.evaluate) ----------------------------------------------


def run_eval(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ..files import write_json
    from ..transport.watermark_client import WatermarkClient
    from . import blending
    from .eval_plan import EvalConfig
    from .eval_report import format_report
    from .evaluate import run_evaluation

    def json_default(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    for what, target in (("--out", args.out), ("--grid", args.grid)):
        if target is not None and not Path(target).parent.is_dir():
            raise InputError(f"the folder of {what} {target} does not exist; create it first")
        if target is not None and Path(target).is_dir():
            raise InputError(f"{what} {target} is a folder; give a file name")
    config = EvalConfig(
        images=args.images,
        start=args.start,
        split=args.split,
        seed=args.seed,
        data_seed=args.data_seed,
        size=args.size,
        attack=args.attack,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None,
        held_out=not args.no_held_out,
        table3=not args.no_table3,
        table3_source=args.table3_source,
        equal_budget_random=args.equal_budget_random,
        lesions=args.lesions,
        sl=args.sl,
        population=args.population,
        generations=args.generations,
        crossover_rate=args.crossover_rate,
        step=args.step,
        local_iterations=args.local_iterations,
        alpha_range=(args.alpha_min, args.alpha_max),
        max_evaluations=args.max_evaluations,
        grid_images=args.grid_images,
    )
    config.check()
    logo = blending.load_logo(args.logo) if args.logo is not None else None
    client = client_from_args(args, WatermarkClient)
    report = run_evaluation(client, config, logo=logo, grid=args.grid)
    write_json(json.loads(json.dumps(report, default=json_default)), args.out)
    print(format_report(report))
    print(f"report written to {args.out}" + (f", examples in {args.grid}" if args.grid else ""))
    return 0
