"""``medprivacy watermark protect | unlock | verify | new-key-file``: MedLocker on image files.

``protect`` asks the server to search each image's watermark (``/v1/watermark/optimize``: the search runs next
to the models), blends the logo locally into the exact pixels, writes the result in the input's own format
(JPEG becomes PNG, see ``watermark.io``) and records every image in one encrypted key, saved before each protected
file is written, so an interrupted run never leaves an image the key cannot restore. Without labels (``--label``,
``--labels labels.csv``) each model is pushed away from its own answer on the clean image, and the report says so.
``unlock`` restores the originals bit for bit from that key; ``verify`` tells whether an image belongs to it
(exit 0, printing its entry) or not (exit 1).

The key is encrypted with a passphrase (``--passphrase-file``, else the MEDPRIVACY_KEY_PASSPHRASE environment
variable, else a prompt on a terminal) or with a 32-byte secret file (``--key-file``; make one with
``new-key-file``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli import add_server_arguments, client_from_args
from ..errors import InputError
from .worker_tasks import PASSPHRASE_ENV  # one name for the CLI and the worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .boxes import DEFAULT_MODE, MODES
    from .optimizer import (
        DEFAULT_ALPHA_BOUNDS,
        DEFAULT_CROSSOVER_RATE,
        DEFAULT_GENERATIONS,
        DEFAULT_LOCAL_ITERATIONS,
        DEFAULT_POPULATION,
        DEFAULT_STEP,
        MUTATIONS,
    )

    sub = parser.add_subparsers(dest="watermark_command", required=True)

    protect = sub.add_parser("protect", help="watermark images so unauthorised classifiers misread them; write the key",
                             description="Watermark images so unauthorised classifiers misread them, and write the key that restores them.")
    protect.add_argument("images", nargs="+", type=Path, help="PNG, JPEG, TIFF, NIfTI or DICOM files (2D, 8/16-bit, gray or RGB)")
    protect.add_argument("-o", "--out", required=True, type=Path, help="folder for the protected images (created if missing)")
    protect.add_argument("--key", required=True, type=Path, help="MedLocker key file to create (holds the pixels under each logo, encrypted)")
    protect.add_argument("--append", action="store_true", help="add the images to an existing --key instead of creating it")
    add_server_arguments(protect, 1800.0, "seconds to wait for each image's search")
    protect.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                         help=f"where the logo may go: keep-out of lesion boxes, keep-in them, or wap (anywhere) (default {DEFAULT_MODE})")
    protect.add_argument("--lesions", choices=("auto", "server", "none"), default="auto",
                         help="lesion boxes from the server's segmenter, or none (default auto: the segmenter when the server has one)")
    protect.add_argument("--logo", type=Path, default=None, help="logo picture (PNG, transparency respected; default: a grey padlock on a dark plate)")
    protect.add_argument("--models", default=None, help="comma-separated source classifiers (default: every classifier on the server)")
    protect.add_argument("--weights", default=None, help="comma-separated ensemble weights, one per --models entry (default equal)")
    labels = protect.add_mutually_exclusive_group()
    labels.add_argument("--label", default=None,
                        help="true class of every image, as a class index or the classifiers' class name "
                             "(default: each model is pushed away from its own answer on the clean image)")
    labels.add_argument("--labels", type=Path, default=None, metavar="CSV",
                        help="CSV with columns image,label giving each image's true class (index or class name); "
                             "images not listed are pushed away from each model's own clean answer")
    protect.add_argument("--sl", type=float, default=4.0, help="logo scale: the logo spans 1/sl of the image (default 4)")
    protect.add_argument("--population", type=int, default=DEFAULT_POPULATION, help=f"Np (default {DEFAULT_POPULATION})")
    protect.add_argument("--generations", type=int, default=DEFAULT_GENERATIONS, help=f"Ng (default {DEFAULT_GENERATIONS})")
    protect.add_argument("--crossover-rate", type=float, default=DEFAULT_CROSSOVER_RATE, help=f"CR (default {DEFAULT_CROSSOVER_RATE})")
    protect.add_argument("--step", type=int, default=DEFAULT_STEP, help=f"mutation step s in pixels (default {DEFAULT_STEP})")
    protect.add_argument("--local-iterations", type=int, default=DEFAULT_LOCAL_ITERATIONS, help=f"Niter (default {DEFAULT_LOCAL_ITERATIONS})")
    protect.add_argument("--alpha-min", type=float, default=DEFAULT_ALPHA_BOUNDS[0], help=f"lowest transparency (default {DEFAULT_ALPHA_BOUNDS[0]:g})")
    protect.add_argument("--alpha-max", type=float, default=DEFAULT_ALPHA_BOUNDS[1], help=f"highest transparency (default {DEFAULT_ALPHA_BOUNDS[1]:g})")
    protect.add_argument("--mutation", choices=MUTATIONS, default="basin-hopping", help="mutation operator (default basin-hopping)")
    protect.add_argument("--max-evaluations", type=int, default=None, help="stop each search after this many candidates")
    protect.add_argument("--seed", type=int, default=None, help="seed of the first image's search (the n-th image uses seed + n)")
    protect.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    _add_credential_arguments(protect)
    protect.set_defaults(_watermark=_protect)

    unlock = sub.add_parser("unlock", help="restore the original images exactly, using the key",
                            description="Restore the original images bit for bit, using the key.")
    unlock.add_argument("images", nargs="+", type=Path, help="protected images")
    unlock.add_argument("--key", required=True, type=Path, help="MedLocker key file")
    unlock.add_argument("-o", "--out", required=True, type=Path, help="folder for the restored images (created if missing)")
    unlock.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    _add_credential_arguments(unlock)
    unlock.set_defaults(_watermark=_unlock)

    verify = sub.add_parser("verify", help="exit 0 and print the key entry if the image belongs to the key, else exit 1",
                            description="Tell whether an image is one protected with this key (exit 0, entry printed) or not (exit 1).")
    verify.add_argument("image", type=Path)
    verify.add_argument("--key", required=True, type=Path, help="MedLocker key file")
    _add_credential_arguments(verify)
    verify.set_defaults(_watermark=_verify)

    new_key_file = sub.add_parser("new-key-file", help="write a random 32-byte secret to use with --key-file",
                                  description="Write a random 32-byte secret (mode 0600) to use with --key-file instead of a passphrase.")
    new_key_file.add_argument("path", type=Path)
    new_key_file.set_defaults(_watermark=_new_key_file)

    from .train import add_train_arguments, run_train

    train = sub.add_parser("train", help="train the source/target classifiers and the lesion segmenter (seeded)",
                           description="train the source/target classifiers and the lesion segmenter (seeded)")
    add_train_arguments(train)
    train.set_defaults(_watermark=run_train)

    evaluate = sub.add_parser("eval", help="Tables 1-3 of the paper (white-box, transfer, placement/mutation) on held-out images",
                              description="Evaluate MedLocker through a server on held-out images: white-box ASR, transfer ASR, "
                                          "placement and mutation ablation, PSNR/SSIM, bit-exact unlock, example grid.")
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(_watermark=_run_eval)


def _add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--passphrase-file", type=Path, default=None,
                       help=f"file whose first line is the key's passphrase (default: environment variable {PASSPHRASE_ENV})")
    group.add_argument("--key-file", type=Path, default=None, help="32-byte secret file that encrypts the key instead of a passphrase")


def run(args: argparse.Namespace) -> int:
    return args._watermark(args)


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
            raise InputError(f"cannot read passphrase file {args.passphrase_file} ({reason}); check the path and its permissions") from None
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
    raise InputError(f"the key needs a passphrase or a secret: give --passphrase-file, --key-file, or set {PASSPHRASE_ENV}")


def _load_key(path: Path, credentials: dict):
    from .keyfile import load_key

    return load_key(path, **credentials)


# --- protect ---------------------------------------------------------------------------------------------------

def _protect(args) -> int:
    from . import blending
    from .batch import (
        SearchSettings,
        check_classifiers,
        choose_lesion_source,
        classifier_labels,
        plan_protection,
        prepare_folders,
        protect_files,
        read_labels_csv,
        resolve_label,
        resolve_labels,
    )
    from .keyfile import WatermarkKey

    credentials = _credentials(args, confirm=not args.append)
    key_path = Path(args.key)
    if key_path.is_dir():
        raise InputError(f"--key {key_path} is a folder; give a file name for the key")
    if not key_path.parent.is_dir():
        raise InputError(f"the folder of --key {key_path} does not exist; create it first")
    if key_path.exists() and not args.append:
        raise InputError(f"key {key_path} already exists; pass --append to add these images to it, or choose a new key file")
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
    per_image = resolve_labels(raw_labels, class_names, args.labels, [path for path, _ in jobs]) if raw_labels is not None else None
    lesions = choose_lesion_source(args.mode, args.lesions, info, note=lambda text: print(text, file=sys.stderr))
    settings = SearchSettings(
        mode=args.mode, models=models, weights=weights, label=label, sl=args.sl, population=args.population,
        generations=args.generations, crossover_rate=args.crossover_rate, step=args.step,
        local_iterations=args.local_iterations, alpha_range=(args.alpha_min, args.alpha_max), mutation=args.mutation,
        max_evaluations=args.max_evaluations, seed=args.seed,
    )

    bar = _progress(len(jobs))
    source = f"label from {args.labels.name}" if args.labels is not None else "--label"

    def report(path, target, image, answer) -> None:
        _report(bar, path, target, image, answer, source)
        bar.update(1)

    try:
        done = protect_files(jobs, client, key, logo, settings, lesions, key_path, credentials, on_image=report,
                             on_partial_save=lambda text: print(f"medprivacy: {text}", file=sys.stderr), labels=per_image)
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
    from .batch import describe_target

    params = answer["params"]
    verdict = "fooled every model" if answer["fooled"] else "not every model fooled"
    if answer.get("target_source") == "label" and all(answer["before"][m]["predicted"][0] != answer["target"] for m in answer["models"]):
        verdict = "every model was already wrong on the clean image"
    note = " (JPEG is lossy: written as PNG)" if image.format == "jpeg" else ""
    lines = [f"{path.name} -> {target}{note}: {verdict}; alpha {params['alpha']:.1f} at x={params['x']} y={params['y']}, "
             f"logo {answer['logo_size'][1]}x{answer['logo_size'][0]}, {answer['evaluations']} evaluations",
             f"  target: {describe_target(answer, label_source)}"]
    for name in answer["models"]:
        before, after = answer["before"][name], answer["after"][name]
        lines.append(f"  {name}: {_top(before)} -> {_top(after)}")
    bar.write("\n".join(lines), file=sys.stdout)


def _top(prediction: dict) -> str:
    index = prediction["predicted"][0]
    label = prediction["labels"].get(str(index), f"class {index}")
    return f"{label} {prediction['probabilities'][0][index]:.2f}"


# --- unlock, verify, new-key-file ------------------------------------------------------------------------------

def _unlock(args) -> int:
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
            raise InputError(f"{path.name} is not protected by key {args.key}, or it was changed after protection; nothing was restored")
    from .batch import make_output_folder

    make_output_folder(args.out)
    from tqdm import tqdm

    for path, target in tqdm(targets, desc="unlocking", unit="image", file=sys.stderr, disable=None):
        image = mio.read_image(path)
        mio.write_image(image, unlock(image.pixels, key), target)
    print(f"restored {len(targets)} image(s) into {args.out}")
    return 0


def _verify(args) -> int:
    from . import io as mio

    key = _load_key(args.key, _credentials(args))
    image = mio.read_image(args.image)
    entry = key.find(image.pixels)
    if entry is None:
        print(f"{args.image}: not protected by this key (or changed after protection)")
        return 1
    print(f"{args.image}: protected by this key as {entry.name!r}: alpha {entry.alpha:.2f} at x={entry.x} y={entry.y}, "
          f"sl {entry.sl:g}, logo {entry.logo_size[1]}x{entry.logo_size[0]}, {entry.dtype} {'x'.join(map(str, entry.shape))}, "
          f"{'exact unlock' if entry.original is not None else 'approximate unlock only'}")
    return 0


def _new_key_file(args) -> int:
    from .keyfile import generate_key_file

    path = generate_key_file(args.path)
    print(f"wrote a 32-byte secret to {path} (mode 0600); keep it safe: without it the keys it encrypts cannot be opened")
    return 0


# --- eval: Tables 1-3 of the paper through a server (watermark.evaluate) ----------------------------------------------------------------------------------------------

def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_plan import ATTACK_SETS, EVAL_SPLITS, LESION_SOURCES, TABLE3_PREFERRED

    add_server_arguments(parser, 1800.0, "seconds to wait for each search")
    parser.add_argument("--out", required=True, type=Path, help="report.json to write (atomically)")
    parser.add_argument("--images", type=int, default=20, help="held-out test images to draw (default 20)")
    parser.add_argument("--start", type=int, default=0, help="first image of the split (default 0)")
    parser.add_argument("--split", choices=EVAL_SPLITS, default="test",
                        help="images to draw: the held-out test split (default) or the validation split, to choose settings such as the logo")
    parser.add_argument("--seed", type=int, default=0, help="search seed of the first image; image i uses seed + i (default 0)")
    parser.add_argument("--data-seed", type=int, default=0, help="data seed the models were trained with (default 0)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default: the classifiers' input size)")
    parser.add_argument("--attack", choices=ATTACK_SETS, default="all-correct",
                        help="attack images every classifier gets right (the paper's protocol, default) or all images")
    parser.add_argument("--models", default=None, help="comma-separated classifiers to evaluate (default: every two-class classifier)")
    parser.add_argument("--no-held-out", action="store_true", help="skip the ensemble-of-the-others sources (one search per classifier per image)")
    parser.add_argument("--no-table3", action="store_true", help="skip Table 3 (placement and mutation ablation)")
    parser.add_argument("--table3-source", default=None, help=f"source of Table 3 (default {TABLE3_PREFERRED})")
    parser.add_argument("--equal-budget-random", action="store_true",
                        help="add a random-mutation row with as many evaluations as basin hopping (Ng*(Niter+1) generations)")
    parser.add_argument("--lesions", choices=LESION_SOURCES, default="auto",
                        help="Table 3 lesion boxes from the server's segmenter or the images' true masks (default auto: segmenter if served)")
    parser.add_argument("--logo", type=Path, default=None, help="logo picture (default: the grey padlock on a dark plate)")
    parser.add_argument("--sl", type=float, default=4.0, help="logo scale (default 4)")
    parser.add_argument("--population", type=int, default=50, help="Np (default 50)")
    parser.add_argument("--generations", type=int, default=3, help="Ng (default 3)")
    parser.add_argument("--crossover-rate", type=float, default=0.9, help="CR (default 0.9)")
    parser.add_argument("--step", type=int, default=10, help="s in pixels (default 10)")
    parser.add_argument("--local-iterations", type=int, default=3, help="Niter (default 3)")
    parser.add_argument("--alpha-min", type=float, default=100.0)
    parser.add_argument("--alpha-max", type=float, default=255.0)
    parser.add_argument("--max-evaluations", type=int, default=None, help="cap on candidates per search")
    parser.add_argument("--grid", type=Path, default=None, help="PNG of examples: original / watermarked / lesion boxes")
    parser.add_argument("--grid-images", type=int, default=4, help="images in the PNG grid (default 4)")


def _run_eval(args: argparse.Namespace) -> int:
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
        images=args.images, start=args.start, split=args.split, seed=args.seed, data_seed=args.data_seed, size=args.size, attack=args.attack,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None,
        held_out=not args.no_held_out, table3=not args.no_table3, table3_source=args.table3_source,
        equal_budget_random=args.equal_budget_random, lesions=args.lesions, sl=args.sl, population=args.population,
        generations=args.generations, crossover_rate=args.crossover_rate, step=args.step,
        local_iterations=args.local_iterations, alpha_range=(args.alpha_min, args.alpha_max),
        max_evaluations=args.max_evaluations, grid_images=args.grid_images,
    )
    config.check()
    logo = blending.load_logo(args.logo) if args.logo is not None else None
    client = client_from_args(args, WatermarkClient)
    report = run_evaluation(client, config, logo=logo, grid=args.grid)
    write_json(json.loads(json.dumps(report, default=json_default)), args.out)
    print(format_report(report))
    print(f"report written to {args.out}" + (f", examples in {args.grid}" if args.grid else ""))
    return 0

