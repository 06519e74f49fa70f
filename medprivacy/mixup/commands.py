"""What ``medprivacy mixup keygen | segment | eval | train | calibrate | audit | train-attacker`` do, once
``mixup.cli`` has parsed their arguments.
"""

from __future__ import annotations

import shlex
import sys

from ..cli import client_from_args


def _client(args):
    return client_from_args(args)


def run_keygen(args) -> int:
    from .bank import generate_bank, import_bank

    if len(args.from_image) != len(args.from_label):
        from ..errors import InputError

        raise InputError("give one --from-label for each --from-image")
    kwargs = {k: v for k, v in (("subjects", args.subjects), ("patches", args.patches)) if v is not None}
    if args.from_image:
        bank = import_bank(
            args.key_dir,
            list(zip(args.from_image, args.from_label)),
            force=args.force,
            progress=_print_progress,
            **kwargs,
        )
    else:
        bank = generate_bank(args.key_dir, force=args.force, progress=_print_progress, **kwargs)
    print(
        f"wrote a private reference bank of {len(bank)} patches to {bank.directory} (keep it secret, never upload it)"
    )
    return 0


def run_segment(args) -> int:
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
        result = segment_private(
            image,
            client,
            bank,
            privacy=args.privacy,
            tta=args.tta,
            unmix=args.unmix,
            seed=args.seed,
            keep_uploaded=args.save_uploaded is not None,
            progress=bar.update,
        )
    write_labelmap(result.labelmap, args.output)
    if args.save_uploaded is not None:
        write_image(result.uploaded, args.save_uploaded)
    stats = result.stats
    print(
        f"wrote {args.output} ({stats['patches_sent']} mixed patches sent, {stats['bytes_sent'] / 1e6:.1f} MB up, "
        f"{stats['bytes_received'] / 1e6:.1f} MB down, {stats['seconds']:.1f} s)"
    )
    return 0


def run_eval(args) -> int:
    from .evaluate import evaluate, format_report

    report = evaluate(
        images=args.image,
        labels=args.label,
        synthetic=args.synthetic,
        client=_client(args),
        key_dir=args.key_dir,
        tta=args.tta,
        seed=args.seed,
        progress=_print_progress,
        privacy=args.privacy,
    )
    from ..files import write_json

    write_json(report, args.out)
    print(format_report(report))
    print(f"report written to {args.out}")
    return 0


def run_train(args) -> int:
    import logging

    from ..nets import DEFAULT_MODELS_DIR
    from .train import TrainConfig, train

    config = TrainConfig.preset(args.preset)
    overrides = {
        "arch": args.arch,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "patch_size": args.patch_size,
        "train_subjects": args.subjects,
        "dataset": args.dataset,
        "init_from": args.init_from,
        "learning_rate": args.learning_rate,
        "reference_oversampling": args.reference_oversampling,
        "calibration_subjects": args.calibration_subjects,
        "stop_after": args.stop_after,
        "target_sampling": args.target_sampling,
        "fill_probability": args.fill_probability,
        "warp_rms": args.warp_rms,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.seed, config.device, config.threads = args.seed, args.device, args.threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or DEFAULT_MODELS_DIR
    command = (
        "medprivacy mixup train " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train") + 1 :])
        if "train" in sys.argv
        else None
    )
    result = train(config, out, progress=not args.quiet, command=command)
    print(f"trained in {result['seconds']:.0f} s; validation patch Dice {result['metrics']}; models in {out}")
    return 0


def run_calibrate(args) -> int:
    from ..nets import DEFAULT_MODELS_DIR, resolve_device
    from .calibrate import DEFAULT_SUBJECTS, calibrate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    record = calibrate(
        args.models or DEFAULT_MODELS_DIR,
        subjects=DEFAULT_SUBJECTS if args.subjects is None else args.subjects,
        tta=args.tta,
        device=resolve_device(args.device),
        progress=_print_progress,
        reference_subjects=args.reference_subjects,
        privacy=args.privacy,
    )
    for name in ("plain-seg", "mixup-unmix"):
        entry = record[name]
        print(
            f"{name}: decision weights {entry['decision_weights']} (validation mean Dice {entry['dice_before']:.4f} -> "
            f"{entry['dice_after']:.4f})"
        )
    return 0


def run_audit(args) -> int:
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

        image, name = (
            to_scanner_space(synthesize_subject(DEMO_SEED), DEMO_SEED)[0],
            f"the demo's held-out sample brain (seed {DEMO_SEED})",
        )
    report, _ = audit.run_audit(
        image,
        name=name,
        bank=bank,
        uploads_dir=args.uploads,
        privacy=args.privacy,
        tta=args.tta,
        reid_subjects=args.reid_subjects,
        pairing_queries=args.pairing_queries,
        variants=tuple(v for v in args.attacks.split(",") if v),
        sample=args.sample,
        reid_sample=args.reid_sample,
        seed=args.seed,
        models_dir=args.models,
        out_json=args.out,
        out_png=args.png,
        progress=_print_progress,
    )
    print(format_audit(report))
    print(f"report written to {args.out}" + (f", picture to {args.png}" if args.png else ""))
    return 0


def run_train_attacker(args) -> int:
    from ..nets import DEFAULT_MODELS_DIR
    from .audit.separator import train_separator

    command = (
        "medprivacy mixup train-attacker "
        + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train-attacker") + 1 :])
        if "train-attacker" in sys.argv
        else None
    )
    metrics = train_separator(
        args.out or DEFAULT_MODELS_DIR,
        iterations=args.iterations,
        subjects=args.subjects,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        command=command,
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
