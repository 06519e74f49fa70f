"""``medprivacy mixup keygen | segment | eval | train | calibrate | audit | train-attacker``: the arguments of each
command; what the commands do is in ``mixup.commands``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_server_arguments
from .commands import (
    run_audit,
    run_calibrate,
    run_eval,
    run_keygen,
    run_segment,
    run_train,
    run_train_attacker,
)
from .privacy import LEVELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mixup_command", required=True)

    keygen = sub.add_parser("keygen", help="create this site's private reference bank (the key)")
    keygen.add_argument(
        "--key-dir", type=Path, default=None, help="where to write the key (default: ~/.medprivacy/mixup-key)"
    )
    keygen.add_argument(
        "--from-image",
        action="append",
        default=[],
        metavar="IMG",
        help="a labelled scan of your own (repeat; pair with --from-label)",
    )
    keygen.add_argument(
        "--from-label", action="append", default=[], metavar="LAB", help="its CSF/GM/WM labelmap (1/2/3)"
    )
    keygen.add_argument("--subjects", type=int, default=None, help="synthetic reference subjects to draw (default 4)")
    keygen.add_argument("--patches", type=int, default=None, help="reference patches to keep (default 512)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(_mixup=run_keygen)

    segment = sub.add_parser("segment", help="segment a scan through the private (mixed) path")
    segment.add_argument("input", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    segment.add_argument(
        "-o", "--output", required=True, type=Path, help="labelmap .nii.gz/.nrrd or segmentation .seg.nrrd"
    )
    add_server_arguments(segment, 300.0, "seconds to wait for each server answer")
    segment.add_argument(
        "--key-dir", type=Path, default=None, help="private reference bank (default: ~/.medprivacy/mixup-key)"
    )
    _add_privacy_arguments(segment)
    segment.add_argument("--unmix", choices=("naive", "learned"), default="learned")
    segment.add_argument(
        "--seed", type=int, default=None, help="fix the random draws (testing only; default: OS randomness)"
    )
    segment.add_argument(
        "--save-uploaded", type=Path, default=None, help="also write the mixed volume the server received"
    )
    segment.set_defaults(_mixup=run_segment)

    evaluate = sub.add_parser("eval", help="Table-1-shaped Dice report (baseline, naive, learned, ± TTA) and ICC")
    evaluate.add_argument("--image", action="append", default=[], help="held-out image (repeat)")
    evaluate.add_argument("--label", action="append", default=[], help="its labelmap (repeat, same order)")
    evaluate.add_argument(
        "--synthetic", type=int, default=0, help="add N held-out synthetic subjects (never used in training)"
    )
    add_server_arguments(evaluate, 300.0, "seconds to wait for each server answer")
    evaluate.add_argument("--key-dir", type=Path, default=None)
    _add_privacy_arguments(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", type=Path, required=True, help="report.json")
    evaluate.set_defaults(_mixup=run_eval)

    train = sub.add_parser("train", help="train the segmentation, unmixing and baseline networks (seeded)")
    train.add_argument("--preset", choices=("cpu-small", "gpu-paper", "smoke"), default="cpu-small")
    train.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    train.add_argument(
        "--dataset",
        default=None,
        help="nnU-Net/MSD folder (dataset.json, imagesTr/, labelsTr/) instead of synthetic data",
    )
    train.add_argument(
        "--init-from",
        default=None,
        metavar="MODELS_DIR",
        help="continue from these weights (second stage, fresh schedule)",
    )
    train.add_argument(
        "--arch", choices=("unet", "unetplusplus"), default=None, help="segmentation network (paper: unetplusplus)"
    )
    train.add_argument("--iterations", type=int, default=None)
    train.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="end after N iterations of the --iterations learning-rate schedule "
        "(reproduces a stage that was cut short)",
    )
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate (cosine-decayed to 5 %%)")
    train.add_argument("--patch-size", type=int, default=None)
    train.add_argument("--subjects", type=int, default=None, help="training subjects")
    train.add_argument(
        "--reference-oversampling",
        type=int,
        default=None,
        metavar="N",
        help="train with the most textured of N reference draws, as keygen builds banks (N=4); default 1: uniform",
    )
    train.add_argument(
        "--target-sampling",
        choices=("box", "private"),
        default=None,
        help="box: targets inside the analysis box (the first stages); "
        "private: cut, turned, filled and deformed as the "
        "privacy levels cut them (the server model must be trained for it)",
    )
    train.add_argument(
        "--fill-probability",
        type=float,
        default=None,
        help="with --target-sampling private: share of targets filled outside the brain region",
    )
    train.add_argument(
        "--warp-rms",
        type=float,
        default=None,
        help="with --target-sampling private: largest RMS deformation (voxels) applied to targets",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    train.add_argument(
        "--calibration-subjects",
        type=int,
        default=None,
        metavar="N",
        help="validation subjects to fit the decision weights on after training (default 4; 0 skips)",
    )
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(_mixup=run_train)

    calibrate = sub.add_parser(
        "calibrate", help="fit the per-class decision weights of trained models on validation subjects"
    )
    calibrate.add_argument("--models", type=Path, default=None, help="models folder (default: Resources/Models)")
    calibrate.add_argument("--subjects", type=int, default=None, help="validation subjects (default 8)")
    calibrate.add_argument(
        "--tta",
        type=int,
        default=None,
        help="TTA copies of the private path being calibrated (default: the default level's)",
    )
    calibrate.add_argument(
        "--reference-subjects", type=int, default=4, help="synthetic subjects of the calibration key (default 4)"
    )
    calibrate.add_argument(
        "--privacy",
        choices=tuple(LEVELS),
        default=None,
        help="privacy level to fit the private path's weights at (default: the default level)",
    )
    calibrate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    calibrate.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    calibrate.set_defaults(_mixup=run_calibrate)

    audit = sub.add_parser(
        "audit",
        help="measure what a curious server could recover from a scan's uploads (placement, averaging, separation, "
        "re-identification)",
    )
    audit.add_argument("input", nargs="?", default=None, help="the scan (default: the demo's held-out sample brain)")
    audit.add_argument(
        "--uploads",
        type=Path,
        default=None,
        metavar="AUDIT_DIR",
        help="attack what a server saved with --audit-dir instead of making the uploads here (no placement truth then)",
    )
    audit.add_argument(
        "--key-dir", type=Path, default=None, help="private reference bank (default: ~/.medprivacy/mixup-key)"
    )
    audit.add_argument(
        "--seeded-key",
        action="store_true",
        help="use the seeded calibration key instead of yours (reproducible figures)",
    )
    _add_privacy_arguments(audit)
    audit.add_argument(
        "--reid-subjects",
        type=int,
        default=10,
        help="subjects scanned twice for re-identification (0 skips; default 10)",
    )
    audit.add_argument(
        "--pairing-queries",
        type=int,
        default=4,
        help="uploads whose overlap partners are searched (0 skips; default 4)",
    )
    audit.add_argument("--attacks", default="template,separated,rematched", help="attack variants (comma-separated)")
    audit.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="attack N randomly drawn uploads per scan instead of all (placement costs about a second per upload on a "
        "CPU); the oracle bound always uses all",
    )
    audit.add_argument(
        "--reid-sample",
        type=int,
        default=None,
        metavar="N",
        help="uploads attacked per re-identification scan (default: --sample)",
    )
    audit.add_argument(
        "--models", type=Path, default=None, help="folder holding the attacker's separator (default: Resources/Models)"
    )
    audit.add_argument("--seed", type=int, default=None, help="fix the client's secret draws (default: OS randomness)")
    audit.add_argument("--out", type=Path, required=True, help="report.json")
    audit.add_argument("--png", type=Path, default=None, help="picture: patient | template | strongest rebuild | bound")
    audit.set_defaults(_mixup=run_audit)

    attacker = sub.add_parser(
        "train-attacker", help="train the audit's single-upload separator (the attacker's network)"
    )
    attacker.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    attacker.add_argument("--iterations", type=int, default=1500)
    attacker.add_argument("--subjects", type=int, default=4, help="attacker-seeded synthetic patients")
    attacker.add_argument("--seed", type=int, default=0)
    attacker.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    attacker.add_argument("--quiet", action="store_true")
    attacker.set_defaults(_mixup=run_train_attacker)


def _add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    from .privacy import DEFAULT_LEVEL

    parser.add_argument(
        "--privacy",
        choices=tuple(LEVELS),
        default=None,
        help=f"defences against a curious server (default {DEFAULT_LEVEL}; "
        "README, 'What a curious server can recover', measures each)",
    )
    parser.add_argument(
        "--tta",
        type=int,
        default=None,
        help="mixed copies per patch, averaged (default: the level's: "
        + ", ".join(f"{name} {settings.tta}" for name, settings in LEVELS.items())
        + ")",
    )


def run(args: argparse.Namespace) -> int:
    return args._mixup(args)
