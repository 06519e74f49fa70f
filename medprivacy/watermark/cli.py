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

The arguments of each command are defined here; what the commands do is in ``watermark.commands``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_server_arguments
from .commands import run_eval, run_new_key_file, run_protect, run_unlock, run_verify
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

    protect = sub.add_parser(
        "protect",
        help="watermark images so unauthorised classifiers misread them; write the key",
        description="Watermark images so unauthorised classifiers misread them, and write the key that restores them.",
    )
    protect.add_argument(
        "images", nargs="+", type=Path, help="PNG, JPEG, TIFF, NIfTI or DICOM files (2D, 8/16-bit, gray or RGB)"
    )
    protect.add_argument(
        "-o", "--out", required=True, type=Path, help="folder for the protected images (created if missing)"
    )
    protect.add_argument(
        "--key",
        required=True,
        type=Path,
        help="MedLocker key file to create (holds the pixels under each logo, encrypted)",
    )
    protect.add_argument(
        "--append", action="store_true", help="add the images to an existing --key instead of creating it"
    )
    add_server_arguments(protect, 1800.0, "seconds to wait for each image's search")
    protect.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="where the logo may go: keep-out of lesion boxes, keep-in them, "
        f"or wap (anywhere) (default {DEFAULT_MODE})",
    )
    protect.add_argument(
        "--lesions",
        choices=("auto", "server", "none"),
        default="auto",
        help="lesion boxes from the server's segmenter, or none (default auto: the segmenter when the server has one)",
    )
    protect.add_argument(
        "--logo",
        type=Path,
        default=None,
        help="logo picture (PNG, transparency respected; default: a grey padlock on a dark plate)",
    )
    protect.add_argument(
        "--models", default=None, help="comma-separated source classifiers (default: every classifier on the server)"
    )
    protect.add_argument(
        "--weights", default=None, help="comma-separated ensemble weights, one per --models entry (default equal)"
    )
    labels = protect.add_mutually_exclusive_group()
    labels.add_argument(
        "--label",
        default=None,
        help="true class of every image, as a class index or the classifiers' class name "
        "(default: each model is pushed away from its own answer on the clean image)",
    )
    labels.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with columns image,label giving each image's true class (index or class name); "
        "images not listed are pushed away from each model's own clean answer",
    )
    protect.add_argument(
        "--sl", type=float, default=4.0, help="logo scale: the logo spans 1/sl of the image (default 4)"
    )
    protect.add_argument(
        "--population", type=int, default=DEFAULT_POPULATION, help=f"Np (default {DEFAULT_POPULATION})"
    )
    protect.add_argument(
        "--generations", type=int, default=DEFAULT_GENERATIONS, help=f"Ng (default {DEFAULT_GENERATIONS})"
    )
    protect.add_argument(
        "--crossover-rate", type=float, default=DEFAULT_CROSSOVER_RATE, help=f"CR (default {DEFAULT_CROSSOVER_RATE})"
    )
    protect.add_argument(
        "--step", type=int, default=DEFAULT_STEP, help=f"mutation step s in pixels (default {DEFAULT_STEP})"
    )
    protect.add_argument(
        "--local-iterations",
        type=int,
        default=DEFAULT_LOCAL_ITERATIONS,
        help=f"Niter (default {DEFAULT_LOCAL_ITERATIONS})",
    )
    protect.add_argument(
        "--alpha-min",
        type=float,
        default=DEFAULT_ALPHA_BOUNDS[0],
        help=f"lowest transparency (default {DEFAULT_ALPHA_BOUNDS[0]:g})",
    )
    protect.add_argument(
        "--alpha-max",
        type=float,
        default=DEFAULT_ALPHA_BOUNDS[1],
        help=f"highest transparency (default {DEFAULT_ALPHA_BOUNDS[1]:g})",
    )
    protect.add_argument(
        "--mutation", choices=MUTATIONS, default="basin-hopping", help="mutation operator (default basin-hopping)"
    )
    protect.add_argument(
        "--max-evaluations", type=int, default=None, help="stop each search after this many candidates"
    )
    protect.add_argument(
        "--seed", type=int, default=None, help="seed of the first image's search (the n-th image uses seed + n)"
    )
    protect.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    _add_credential_arguments(protect)
    protect.set_defaults(_watermark=run_protect)

    unlock = sub.add_parser(
        "unlock",
        help="restore the original images exactly, using the key",
        description="Restore the original images bit for bit, using the key.",
    )
    unlock.add_argument("images", nargs="+", type=Path, help="protected images")
    unlock.add_argument("--key", required=True, type=Path, help="MedLocker key file")
    unlock.add_argument(
        "-o", "--out", required=True, type=Path, help="folder for the restored images (created if missing)"
    )
    unlock.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    _add_credential_arguments(unlock)
    unlock.set_defaults(_watermark=run_unlock)

    verify = sub.add_parser(
        "verify",
        help="exit 0 and print the key entry if the image belongs to the key, else exit 1",
        description="Tell whether an image is one protected with this key (exit 0, entry printed) or not (exit 1).",
    )
    verify.add_argument("image", type=Path)
    verify.add_argument("--key", required=True, type=Path, help="MedLocker key file")
    _add_credential_arguments(verify)
    verify.set_defaults(_watermark=run_verify)

    new_key_file = sub.add_parser(
        "new-key-file",
        help="write a random 32-byte secret to use with --key-file",
        description="Write a random 32-byte secret (mode 0600) to use with --key-file instead of a passphrase.",
    )
    new_key_file.add_argument("path", type=Path)
    new_key_file.set_defaults(_watermark=run_new_key_file)

    from .train import add_train_arguments, run_train

    train = sub.add_parser(
        "train",
        help="train the source/target classifiers and the lesion segmenter (seeded)",
        description="train the source/target classifiers and the lesion segmenter (seeded)",
    )
    add_train_arguments(train)
    train.set_defaults(_watermark=run_train)

    evaluate = sub.add_parser(
        "eval",
        help="Tables 1-3 of the paper (white-box, transfer, placement/mutation) on held-out images",
        description="Evaluate MedLocker through a server on held-out images: white-box ASR, transfer ASR, "
        "placement and mutation ablation, PSNR/SSIM, bit-exact unlock, example grid.",
    )
    _add_eval_arguments(evaluate)
    evaluate.set_defaults(_watermark=run_eval)


def _add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--passphrase-file",
        type=Path,
        default=None,
        help=f"file whose first line is the key's passphrase (default: environment variable {PASSPHRASE_ENV})",
    )
    group.add_argument(
        "--key-file", type=Path, default=None, help="32-byte secret file that encrypts the key instead of a passphrase"
    )


def run(args: argparse.Namespace) -> int:
    return args._watermark(args)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_plan import ATTACK_SETS, EVAL_SPLITS, LESION_SOURCES, TABLE3_PREFERRED

    add_server_arguments(parser, 1800.0, "seconds to wait for each search")
    parser.add_argument("--out", required=True, type=Path, help="report.json to write (atomically)")
    parser.add_argument("--images", type=int, default=20, help="held-out test images to draw (default 20)")
    parser.add_argument("--start", type=int, default=0, help="first image of the split (default 0)")
    parser.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="test",
        help="images to draw: the held-out test split (default) or the validation split, "
        "to choose settings such as the logo",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="search seed of the first image; image i uses seed + i (default 0)"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="data seed the models were trained with (default 0)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="image size (default: the classifiers' input size)",
    )
    parser.add_argument(
        "--attack",
        choices=ATTACK_SETS,
        default="all-correct",
        help="attack images every classifier gets right (the paper's protocol, default) or all images",
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated classifiers to evaluate (default: every two-class classifier)"
    )
    parser.add_argument(
        "--no-held-out",
        action="store_true",
        help="skip the ensemble-of-the-others sources (one search per classifier per image)",
    )
    parser.add_argument("--no-table3", action="store_true", help="skip Table 3 (placement and mutation ablation)")
    parser.add_argument("--table3-source", default=None, help=f"source of Table 3 (default {TABLE3_PREFERRED})")
    parser.add_argument(
        "--equal-budget-random",
        action="store_true",
        help="add a random-mutation row with as many evaluations as basin hopping (Ng*(Niter+1) generations)",
    )
    parser.add_argument(
        "--lesions",
        choices=LESION_SOURCES,
        default="auto",
        help="Table 3 lesion boxes from the server's segmenter or the images' true masks "
        "(default auto: segmenter if served)",
    )
    parser.add_argument(
        "--logo", type=Path, default=None, help="logo picture (default: the grey padlock on a dark plate)"
    )
    parser.add_argument("--sl", type=float, default=4.0, help="logo scale (default 4)")
    parser.add_argument("--population", type=int, default=50, help="Np (default 50)")
    parser.add_argument("--generations", type=int, default=3, help="Ng (default 3)")
    parser.add_argument("--crossover-rate", type=float, default=0.9, help="CR (default 0.9)")
    parser.add_argument("--step", type=int, default=10, help="s in pixels (default 10)")
    parser.add_argument("--local-iterations", type=int, default=3, help="Niter (default 3)")
    parser.add_argument("--alpha-min", type=float, default=100.0)
    parser.add_argument("--alpha-max", type=float, default=255.0)
    parser.add_argument("--max-evaluations", type=int, default=None, help="cap on candidates per search")
    parser.add_argument(
        "--grid", type=Path, default=None, help="PNG of examples: original / watermarked / lesion boxes"
    )
    parser.add_argument("--grid-images", type=int, default=4, help="images in the PNG grid (default 4)")
