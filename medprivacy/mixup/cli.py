"""``medprivacy mixup keygen | segment | eval | train | calibrate``."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..cli import add_server_arguments, client_from_args
from .privacy import LEVELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mixup_command", required=True)

    keygen = sub.add_parser("keygen", help="create this site's private reference bank (the key)")
    keygen.add_argument("--key-dir", type=Path, default=None, help="where to write the key (default: ~/.medprivacy/mixup-key)")
    keygen.add_argument("--from-image", action="append", default=[], metavar="IMG", help="a labelled scan of your own (repeat; pair with --from-label)")
    keygen.add_argument("--from-label", action="append", default=[], metavar="LAB", help="its CSF/GM/WM labelmap (1/2/3)")
    keygen.add_argument("--subjects", type=int, default=None, help="synthetic reference subjects to draw (default 4)")
    keygen.add_argument("--patches", type=int, default=None, help="reference patches to keep (default 512)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(_mixup=_keygen)

    segment = sub.add_parser("segment", help="segment a scan through the private (mixed) path")
    segment.add_argument("input", help="image file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    segment.add_argument("-o", "--output", required=True, type=Path, help="labelmap .nii.gz/.nrrd or segmentation .seg.nrrd")
    add_server_arguments(segment, 300.0, "seconds to wait for each server answer")
    segment.add_argument("--key-dir", type=Path, default=None, help="private reference bank (default: ~/.medprivacy/mixup-key)")
    _add_privacy_arguments(segment)
    segment.add_argument("--unmix", choices=("naive", "learned"), default="learned")
    segment.add_argument("--seed", type=int, default=None, help="fix the random draws (testing only; default: OS randomness)")
    segment.add_argument("--save-uploaded", type=Path, default=None, help="also write the mixed volume the server received")
    segment.set_defaults(_mixup=_segment)

    evaluate = sub.add_parser("eval", help="Table-1-shaped Dice report (baseline, naive, learned, ± TTA) and ICC")
    evaluate.add_argument("--image", action="append", default=[], help="held-out image (repeat)")
    evaluate.add_argument("--label", action="append", default=[], help="its labelmap (repeat, same order)")
    evaluate.add_argument("--synthetic", type=int, default=0, help="add N held-out synthetic subjects (never used in training)")
    add_server_arguments(evaluate, 300.0, "seconds to wait for each server answer")
    evaluate.add_argument("--key-dir", type=Path, default=None)
    _add_privacy_arguments(evaluate)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", type=Path, required=True, help="report.json")
    evaluate.set_defaults(_mixup=_eval)

    train = sub.add_parser("train", help="train the segmentation, unmixing and baseline networks (seeded)")
    train.add_argument("--preset", choices=("cpu-small", "gpu-paper", "smoke"), default="cpu-small")
    train.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    train.add_argument("--dataset", default=None, help="nnU-Net/MSD folder (dataset.json, imagesTr/, labelsTr/) instead of synthetic data")
    train.add_argument("--init-from", default=None, metavar="MODELS_DIR", help="continue from these weights (second stage, fresh schedule)")
    train.add_argument("--arch", choices=("unet", "unetplusplus"), default=None, help="segmentation network (paper: unetplusplus)")
    train.add_argument("--iterations", type=int, default=None)
    train.add_argument(
        "--stop-after", type=int, default=None, metavar="N",
        help="end after N iterations of the --iterations learning-rate schedule (reproduces a stage that was cut short)",
    )
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=None, help="Adam learning rate (cosine-decayed to 5 %%)")
    train.add_argument("--patch-size", type=int, default=None)
    train.add_argument("--subjects", type=int, default=None, help="training subjects")
    train.add_argument(
        "--reference-oversampling", type=int, default=None, metavar="N",
        help="train with the most textured of N reference draws, as keygen builds banks (N=4); default 1: uniform",
    )
    train.add_argument(
        "--target-sampling", choices=("box", "private"), default=None,
        help="box: targets inside the analysis box (the first stages); private: cut, turned, filled and deformed as the "
        "privacy levels cut them (the server model must be trained for it)",
    )
    train.add_argument("--fill-probability", type=float, default=None, help="with --target-sampling private: share of targets filled outside the brain region")
    train.add_argument("--warp-rms", type=float, default=None, help="with --target-sampling private: largest RMS deformation (voxels) applied to targets")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    train.add_argument(
        "--calibration-subjects", type=int, default=None, metavar="N",
        help="validation subjects to fit the decision weights on after training (default 4; 0 skips)",
    )
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(_mixup=_train)

    calibrate = sub.add_parser("calibrate", help="fit the per-class decision weights of trained models on validation subjects")
    calibrate.add_argument("--models", type=Path, default=None, help="models folder (default: Resources/Models)")
    calibrate.add_argument("--subjects", type=int, default=4, help="validation subjects (default 4)")
    calibrate.add_argument("--tta", type=int, default=None, help="TTA copies of the private path being calibrated (default: the default level's)")
    calibrate.add_argument("--reference-subjects", type=int, default=4, help="synthetic subjects of the calibration key (default 4)")
    calibrate.add_argument("--privacy", choices=tuple(LEVELS), default=None, help="privacy level to fit the private path's weights at (default: the default level)")
    calibrate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    calibrate.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    calibrate.set_defaults(_mixup=_calibrate)


    audit = sub.add_parser(
        "audit",
        help="measure what a curious server could recover from a scan's uploads (placement, averaging, separation, re-identification)",
    )
    audit.add_argument("input", nargs="?", default=None, help="the scan (default: the demo's held-out sample brain)")
    audit.add_argument("--uploads", type=Path, default=None, metavar="AUDIT_DIR",
                       help="attack what a server saved with --audit-dir instead of making the uploads here (no placement truth then)")
    audit.add_argument("--key-dir", type=Path, default=None, help="private reference bank (default: ~/.medprivacy/mixup-key)")
    audit.add_argument("--seeded-key", action="store_true", help="use the seeded calibration key instead of yours (reproducible figures)")
    _add_privacy_arguments(audit)
    audit.add_argument("--reid-subjects", type=int, default=10, help="subjects scanned twice for re-identification (0 skips; default 10)")
    audit.add_argument("--pairing-queries", type=int, default=4, help="uploads whose overlap partners are searched (0 skips; default 4)")
    audit.add_argument("--attacks", default="template,separated,rematched", help="attack variants (comma-separated)")
    audit.add_argument("--sample", type=int, default=None, metavar="N",
                       help="attack N randomly drawn uploads per scan instead of all (placement costs about a second per upload on a CPU); the oracle bound always uses all")
    audit.add_argument("--reid-sample", type=int, default=None, metavar="N", help="uploads attacked per re-identification scan (default: --sample)")
    audit.add_argument("--models", type=Path, default=None, help="folder holding the attacker's separator (default: Resources/Models)")
    audit.add_argument("--seed", type=int, default=None, help="fix the client's secret draws (default: OS randomness)")
    audit.add_argument("--out", type=Path, required=True, help="report.json")
    audit.add_argument("--png", type=Path, default=None, help="picture: patient | template | strongest rebuild | bound")
    audit.set_defaults(_mixup=_audit)

    attacker = sub.add_parser("train-attacker", help="train the audit's single-upload separator (the attacker's network)")
    attacker.add_argument("--out", type=Path, default=None, help="models folder (default: Resources/Models)")
    attacker.add_argument("--iterations", type=int, default=1500)
    attacker.add_argument("--subjects", type=int, default=4, help="attacker-seeded synthetic patients")
    attacker.add_argument("--seed", type=int, default=0)
    attacker.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: default)")
    attacker.add_argument("--quiet", action="store_true")
    attacker.set_defaults(_mixup=_train_attacker)


def _add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    from .privacy import DEFAULT_LEVEL

    parser.add_argument(
        "--privacy", choices=tuple(LEVELS), default=None,
        help=f"defences against a curious server (default {DEFAULT_LEVEL}; README, 'What a curious server can recover', measures each)",
    )
    parser.add_argument("--tta", type=int, default=None, help="mixed copies per patch, averaged (default: the level's, 16)")


def run(args: argparse.Namespace) -> int:
    return args._mixup(args)


def _client(args):
    return client_from_args(args)


def _keygen(args) -> int:
    from .bank import generate_bank, import_bank

    if len(args.from_image) != len(args.from_label):
        from ..errors import InputError

        raise InputError("give one --from-label for each --from-image")
    kwargs = {k: v for k, v in (("subjects", args.subjects), ("patches", args.patches)) if v is not None}
    if args.from_image:
        bank = import_bank(args.key_dir, list(zip(args.from_image, args.from_label)), force=args.force, progress=_print_progress, **kwargs)
    else:
        bank = generate_bank(args.key_dir, force=args.force, progress=_print_progress, **kwargs)
    print(f"wrote a private reference bank of {len(bank)} patches to {bank.directory} (keep it secret, never upload it)")
    return 0


def _segment(args) -> int:
    from ..files import check_writable_folder
    from .bank import ReferenceBank
    from .io import check_labelmap_path, plausibility_warnings, read_image, write_image, write_labelmap
    from .pipeline import segment_private

    # Every output place is tried before the scan is read: a read-only folder must not cost a whole run.
    check_labelmap_path(args.output)
    if args.save_uploaded is not None:
        check_writable_folder(args.save_uploaded.parent, "folder of --save-uploaded")
    image = read_image(args.input)
    for note in plausibility_warnings(image, str(args.input)):
        print(f"medprivacy: warning: {note}", file=sys.stderr)
    bank = ReferenceBank.load(args.key_dir)
    client = _client(args)
    with _ProgressBar() as bar:
        result = segment_private(image, client, bank, privacy=args.privacy, tta=args.tta, unmix=args.unmix, seed=args.seed, keep_uploaded=args.save_uploaded is not None, progress=bar.update)
    write_labelmap(result.labelmap, args.output)
    if args.save_uploaded is not None:
        write_image(result.uploaded, args.save_uploaded)
    stats = result.stats
    print(
        f"wrote {args.output} ({stats['patches_sent']} mixed patches sent, {stats['bytes_sent'] / 1e6:.1f} MB up, "
        f"{stats['bytes_received'] / 1e6:.1f} MB down, {stats['seconds']:.1f} s)"
    )
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate, format_report

    report = evaluate(
        images=args.image, labels=args.label, synthetic=args.synthetic, client=_client(args), key_dir=args.key_dir, tta=args.tta, seed=args.seed, progress=_print_progress,
        privacy=args.privacy,
    )
    from ..files import write_json

    write_json(report, args.out)
    print(format_report(report))
    print(f"report written to {args.out}")
    return 0


def _train(args) -> int:
    import logging

    from ..nets import DEFAULT_MODELS_DIR
    from .train import TrainConfig, train

    config = TrainConfig.preset(args.preset)
    overrides = {
        "arch": args.arch, "iterations": args.iterations, "batch_size": args.batch_size, "patch_size": args.patch_size,
        "train_subjects": args.subjects, "dataset": args.dataset, "init_from": args.init_from,
        "learning_rate": args.learning_rate, "reference_oversampling": args.reference_oversampling,
        "calibration_subjects": args.calibration_subjects, "stop_after": args.stop_after,
        "target_sampling": args.target_sampling, "fill_probability": args.fill_probability, "warp_rms": args.warp_rms,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.seed, config.device, config.threads = args.seed, args.device, args.threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or DEFAULT_MODELS_DIR
    command = "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train") + 1:]) if "train" in sys.argv else None
    result = train(config, out, progress=not args.quiet, command=command)
    print(f"trained in {result['seconds']:.0f} s; validation patch Dice {result['metrics']}; models in {out}")
    return 0


def _calibrate(args) -> int:
    from ..nets import DEFAULT_MODELS_DIR, resolve_device
    from .calibrate import calibrate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = calibrate(
        args.models or DEFAULT_MODELS_DIR, subjects=args.subjects, tta=args.tta, device=resolve_device(args.device), progress=_print_progress,
        reference_subjects=args.reference_subjects, privacy=args.privacy,
    )
    for name in ("plain-seg", "mixup-unmix"):
        entry = record[name]
        print(f"{name}: decision weights {entry['decision_weights']} (validation mean Dice {entry['dice_before']:.4f} -> {entry['dice_after']:.4f})")
    return 0


def _audit(args) -> int:
    from . import audit
    from .audit.report import format_audit
    from .bank import ReferenceBank

    for flag, value in (("--sample", args.sample), ("--reid-sample", args.reid_sample)):
        if value is not None and value < 1:
            from ..errors import InputError

            raise InputError(f"{flag} {value}: give at least 1 upload to attack, or leave it out to attack them all")
    if args.seeded_key:
        from .bank import client_patch_size
        from .calibrate import calibration_bank

        bank = calibration_bank(client_patch_size())
    else:
        bank = ReferenceBank.load(args.key_dir)
    if args.input is not None:
        from .io import read_image

        image, name = read_image(args.input), str(args.input)
    else:
        from ..data.synth import synthesize_subject, to_scanner_space
        from ..demo import DEMO_SEED

        image, name = to_scanner_space(synthesize_subject(DEMO_SEED), DEMO_SEED)[0], f"the demo's held-out sample brain (seed {DEMO_SEED})"
    report, _ = audit.run_audit(
        image, name=name, bank=bank, uploads_dir=args.uploads, privacy=args.privacy, tta=args.tta, reid_subjects=args.reid_subjects,
        pairing_queries=args.pairing_queries, variants=tuple(v for v in args.attacks.split(",") if v), sample=args.sample, reid_sample=args.reid_sample, seed=args.seed,
        models_dir=args.models, out_json=args.out, out_png=args.png, progress=_print_progress,
    )
    print(format_audit(report))
    print(f"report written to {args.out}" + (f", picture to {args.png}" if args.png else ""))
    return 0


def _train_attacker(args) -> int:
    from ..nets import DEFAULT_MODELS_DIR
    from .audit.separator import train_separator

    command = "medprivacy mixup train-attacker " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train-attacker") + 1:]) if "train-attacker" in sys.argv else None
    metrics = train_separator(
        args.out or DEFAULT_MODELS_DIR, iterations=args.iterations, subjects=args.subjects, seed=args.seed, threads=args.threads,
        progress=not args.quiet, command=command,
    )
    print(f"attacker's separator trained: {metrics}")
    return 0


def _print_progress(message: str, fraction: float | None = None) -> None:
    suffix = f" {100 * fraction:5.1f}%" if fraction is not None else ""
    print(f"  {message}{suffix}", file=sys.stderr, flush=True)


class _ProgressBar:
    """tqdm bar driven by the pipeline's (stage, fraction) callbacks; drawn only once work starts, so an early
    error (unreachable server, wrong token) stays a single line."""

    def __enter__(self):
        self._bar = None
        return self

    def update(self, stage: str, fraction: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=100, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}", file=sys.stderr)
        self._bar.set_description_str(stage)
        self._bar.n = round(100 * fraction)
        self._bar.refresh()

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False
