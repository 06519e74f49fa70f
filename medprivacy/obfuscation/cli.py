"""``medprivacy obfuscate keygen | apply | train | classify | job | models | eval | train-models``.

One site key (``--key-dir``, default ``~/.medprivacy/obfuscation-key`` or MEDPRIVACY_OBFUSCATION_KEY_DIR) is used
for everything: ``train`` obfuscates the labelled dataset with it and the server's classifier learns the key's
codes; ``classify`` must obfuscate new frames with the same key, or the model cannot read them (the server refuses
frames of another key). ``apply`` writes obfuscated files: exactly what would leave the computer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import add_server_arguments, client_from_args
from ..errors import InputError

SAME_KEY = (
    "Use the same --key-dir for the training set and for every later classification: a model only "
    "understands frames made with the key of its training frames."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="obfuscate_command", required=True)

    keygen = sub.add_parser(
        "keygen",
        help="create the site's secret key folder (mapping table, seeds, VAE)",
        description="Create the site's secret key: a many-to-one intensity mapping shuffled by the operating "
        "system's CSPRNG, a 32-byte secret that seeds every frame's noise, and the VAE, in a 0700 "
        "folder of 0600 files that is never uploaded. " + SAME_KEY,
    )
    _key_dir(keygen)
    keygen.add_argument(
        "--force", action="store_true", help="replace an existing key (models trained with the old one stop working)"
    )
    keygen.add_argument(
        "--vae-from",
        nargs="+",
        type=Path,
        default=None,
        metavar="PATH",
        help="fine-tune the VAE on the site's own unlabelled frames (files or folders) instead of copying the "
        "shipped one; its weights then stay secret in the key",
    )
    keygen.add_argument("--vae-steps", type=int, default=1000, help="fine-tuning steps with --vae-from (default 1000)")
    keygen.add_argument("--levels", type=int, default=None, help="quantisation levels (default: the shipped default)")
    keygen.add_argument(
        "--codes", type=int, default=None, help="output codes, fewer than levels (default: the shipped default)"
    )
    keygen.add_argument(
        "--dither", type=float, default=None, help="per-pixel noise before quantising, in levels (default: shipped)"
    )
    keygen.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="per-frame latent noise, in units of the spread of real frames (default: shipped)",
    )
    keygen.set_defaults(_obfuscate=_keygen)

    apply = sub.add_parser(
        "apply",
        help="obfuscate frames into files: exactly what would leave this computer",
        description="Obfuscate frames (PNG, TIFF, DICOM single or multi-frame, NIfTI, NRRD) with the site key. "
        "Runs keep their frame order and field of view; outputs carry no patient metadata. " + SAME_KEY,
    )
    apply.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    apply.add_argument("-o", "--out", required=True, type=Path, help="output folder (created if missing)")
    _key_dir(apply)
    apply.add_argument("--overwrite", action="store_true", help="replace existing files in the output folder")
    apply.set_defaults(_obfuscate=_apply)

    train = sub.add_parser(
        "train",
        help="train a classifier on the server from a labelled dataset, obfuscated here",
        description="Obfuscate a labelled dataset here and have the server train a classifier on it as a "
        "background job. DATASET: a folder with one subfolder per class, or a CSV of path,label. " + SAME_KEY,
    )
    train.add_argument("dataset", type=Path, metavar="DATASET")
    add_server_arguments(train, 60.0, "seconds to wait for each request")
    _key_dir(train)
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the server's default)")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--learning-rate", type=float, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--name", default="", help="a label for the model on the server")
    train.add_argument(
        "--detach", action="store_true", help="print the job id and return at once (follow it with 'obfuscate job')"
    )
    train.set_defaults(_obfuscate=_train)

    classify = sub.add_parser(
        "classify",
        help="classify frames on the server with a model trained on this key",
        description="Obfuscate frames here and classify them on the server. " + SAME_KEY,
    )
    classify.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    add_server_arguments(classify, 300.0, "seconds to wait for each request")
    classify.add_argument("--model", required=True, help="model id from 'obfuscate train' (see 'obfuscate models')")
    _key_dir(classify)
    classify.add_argument(
        "--out", type=Path, default=None, help="also write the results as CSV (file,frame,class,probabilities)"
    )
    classify.set_defaults(_obfuscate=_classify)

    job = sub.add_parser("job", help="show (or wait for, or cancel) a training job on the server")
    job.add_argument("job_id", metavar="JOB")
    add_server_arguments(job, 60.0, "seconds to wait for each request")
    action = job.add_mutually_exclusive_group()
    action.add_argument("--wait", action="store_true", help="follow the job until it ends")
    action.add_argument("--cancel", action="store_true", help="cancel the job")
    job.set_defaults(_obfuscate=_job)

    models = sub.add_parser("models", help="list the classifiers trained on the server")
    add_server_arguments(models, 60.0, "seconds to wait for the answer")
    models.set_defaults(_obfuscate=_models)

    from .evaluate import add_eval_arguments, run_eval

    evaluate = sub.add_parser(
        "eval",
        help="utility (plain vs obfuscated classifier) and privacy (attacks a and b) on held-out frames",
        description="The paper's evaluation on seeded held-out frames: classifier accuracy, AUC, sensitivity and "
        "specificity trained on plain vs obfuscated frames; SSIM, PSNR and vessel Dice of the "
        "reconstruction attacks of threat models (a) and (b) on angiograms and fundus crops.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(_obfuscate=run_eval)

    from .train import add_train_arguments, run_train

    train_models = sub.add_parser(
        "train-models",
        help="regenerate the shipped VAE and threat-(a) attack networks (seeded)",
        description="Train the shipped VAE (client) and the threat-(a) attack networks (evaluation) "
        "and record them in the model manifest.",
    )
    add_train_arguments(train_models)
    train_models.set_defaults(_obfuscate=run_train)


def _key_dir(parser) -> None:
    parser.add_argument(
        "--key-dir",
        type=Path,
        default=None,
        help="the site key folder (default ~/.medprivacy/obfuscation-key or $MEDPRIVACY_OBFUSCATION_KEY_DIR)",
    )


def run(args: argparse.Namespace) -> int:
    return args._obfuscate(args)


def _progress_bar(total: int, description: str, unit: str = "file"):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=None)


# --- keygen, apply ---------------------------------------------------------------------------------------------


def _keygen(args) -> int:
    from dataclasses import replace

    from .keygen import create_site_key, default_params

    params = default_params()
    overrides = {
        k: v
        for k, v in (
            ("levels", args.levels),
            ("codes", args.codes),
            ("dither", args.dither),
            ("temperature", args.temperature),
        )
        if v is not None
    }
    params = replace(params, **overrides).check()
    if args.vae_steps < 1:
        raise InputError("--vae-steps must be at least 1")
    key = create_site_key(
        args.key_dir,
        force=args.force,
        params=params,
        vae_from=args.vae_from,
        vae_steps=args.vae_steps,
        progress=lambda text, fraction: print(f"  {text}", file=sys.stderr),
    )
    print(
        f"wrote the obfuscation key to {key.directory} (0700; keep a backup: frames made with it can only be "
        "classified with it)"
    )
    print(key.describe())
    return 0


def _apply(args) -> int:
    from . import io as oio
    from .key import SiteKey
    from .transform import Obfuscator

    key = SiteKey.load(args.key_dir)
    targets = []
    for path in args.inputs:
        target = args.out / oio.output_name(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist or is not a file")
        if target.exists() and not args.overwrite:
            raise InputError(f"{target} already exists; pass --overwrite or choose another output folder")
        if path.resolve() == target.resolve():
            raise InputError(f"refusing to overwrite the input {path}; choose another output folder")
        if target in [t for _, t in targets]:
            raise InputError(f"two inputs would both be written to {target}; obfuscate them into different folders")
        targets.append((path, target))
    frames = [(oio.read_frames(path), target) for path, target in targets]  # every input is checked before any output
    for item, target in frames:
        if item.count > 1 and target.name.lower().endswith(".png"):
            raise InputError(
                f"{item.path.name} holds {item.count} frames; a PNG holds one (give it as TIFF, DICOM, NIfTI or NRRD)"
            )
    obfuscator = Obfuscator(key)
    args.out.mkdir(parents=True, exist_ok=True)
    bar = _progress_bar(len(frames), "obfuscating")
    try:
        for item, target in frames:
            oio.write_frames(obfuscator.obfuscate(item.pixels), target, item)
            bar.update(1)
    finally:
        bar.close()
    print(
        f"obfuscated {sum(f.count for f, _ in frames)} frame(s) from {len(frames)} file(s) into {args.out} with key "
        f"{key.key_id}"
    )
    return 0


# --- server commands -------------------------------------------------------------------------------------------


def _client(args):
    from ..transport.obfuscation_client import ObfuscationClient

    return client_from_args(args, ObfuscationClient)


def _train(args) -> int:
    from .dataset import dataset_files, obfuscate_dataset
    from .key import SiteKey
    from .transform import Obfuscator

    files = dataset_files(args.dataset)
    key = SiteKey.load(args.key_dir)
    client = _client(args)
    client.info()  # an unreachable server or a wrong token shows before the dataset is obfuscated
    counts = ", ".join(f"{name} {count}" for name, count in files.counts().items())
    print(
        f"dataset {args.dataset}: {len(files.paths)} file(s) ({counts}); obfuscating with key {key.key_id}",
        file=sys.stderr,
    )
    bar = _progress_bar(len(files.paths), "obfuscating")
    try:
        codes, labels = obfuscate_dataset(files, Obfuscator(key), progress=lambda text, fraction: bar.update(1))
    finally:
        bar.close()
    job = client.submit_training(
        codes,
        labels,
        files.classes,
        key.key_id,
        name=args.name,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    print(
        f"training job {job['job']} queued on {client.url}: {len(codes)} obfuscated frames, {client.bytes_sent} "
        "bytes sent"
    )
    if args.detach:
        print(f"follow it with: medprivacy obfuscate job {job['job']} --server {client.url} --wait")
        return 0
    state = _follow(client, job["job"])
    print(
        f"model {state['model']} trained (validation accuracy {state['progress'].get('validation_accuracy')}); "
        "classify with: "
        f"medprivacy obfuscate classify FRAMES --server {client.url} --model {state['model']}"
    )
    return 0


def _follow(client, job_id: str) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=None, desc="training on the server", unit="step", file=sys.stderr, disable=None)
    last = {"step": 0}

    def show(state: dict) -> None:
        progress = state.get("progress") or {}
        if progress.get("steps") and bar.total is None:
            bar.total = progress["steps"]
        step = int(progress.get("step", 0))
        if step > last["step"]:
            bar.update(step - last["step"])
            last["step"] = step
        if "validation_accuracy" in progress:
            bar.set_postfix(validation=progress["validation_accuracy"], loss=progress.get("loss"))

    try:
        return client.wait(job_id, progress=show)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job goes on on the server. Cancel it with: medprivacy obfuscate job {job_id} "
            f"--server {client.url} --cancel",
            file=sys.stderr,
        )
        raise
    finally:
        bar.close()


def _classify(args) -> int:
    import csv

    from . import io as oio
    from .key import SiteKey
    from .transform import Obfuscator

    key = SiteKey.load(args.key_dir)
    inputs = [oio.read_frames(path) for path in args.inputs]
    client = _client(args)
    obfuscator = Obfuscator(key)
    rows = []
    for item in inputs:
        answer = client.classify(obfuscator.obfuscate(item.pixels), args.model, key.key_id)
        classes = answer["classes"]
        for index, (predicted, probabilities) in enumerate(zip(answer["predicted"], answer["probabilities"])):
            rows.append((item.path.name, index, classes[int(predicted)], probabilities))
            shown = ", ".join(f"{name} {p:.3f}" for name, p in zip(classes, probabilities))
            frame = f" frame {index}" if item.count > 1 else ""
            print(f"{item.path.name}{frame}: {classes[int(predicted)]} ({shown})")
    if args.out is not None:
        from ..files import write_atomically

        def write(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["file", "frame", "class"] + [f"p_{c}" for c in classes])
                for name, index, label, probabilities in rows:
                    writer.writerow([name, index, label] + [f"{p:.6f}" for p in probabilities])

        write_atomically(args.out, write)
        print(f"wrote {args.out}")
    return 0


def _job(args) -> int:
    client = _client(args)
    if args.cancel:
        state = client.cancel(args.job_id)
    elif args.wait:
        state = _follow(client, args.job_id)
    else:
        state = client.job(args.job_id)
    print(json.dumps(state, indent=1))
    return 0


def _models(args) -> int:
    client = _client(args)
    models = client.models()
    if not models:
        print(f"{client.url} holds no classifier trained on obfuscated frames yet")
    for model in models:
        size = "x".join(map(str, model["frame_size"]))
        print(
            f"{model['id']}: classes {', '.join(model['classes'])}; frames {size}; key {model['key_id']}; "
            f"validation accuracy {model.get('validation_accuracy')}; {model.get('train_frames')} training frames; "
            f"created {model.get('created')}{'; ' + model['name'] if model.get('name') else ''}"
        )
    return 0
