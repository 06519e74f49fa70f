"""``medprivacy obfuscate eval``: the paper's evaluation on seeded, held-out frames, with the shipped VAE and attackers.

A victim key is made the way ``keygen`` makes one (shipped VAE, default parameters), except that its table and
secret come from ``--key-seed`` so the report can be reproduced. Frames (``medprivacy.obfuscation.data``):

- public data (what attackers and the VAE learn from): the ``train`` split, seeds 1000+;
- the victim's labelled training set: the ``train`` split from seed 61000 on, disjoint from the public frames;
- leaked pairs (threat b): the victim's frames of the ``validation`` split;
- the victim's private frames, attacked and classified: the ``test`` split (900000+), never seen by any training.

Utility (angiograms, task ``--task``, default the view LCA/RCA): the same classifier body and budget trained on
the plain frames (intensity front end) and on the obfuscated frames (code-histogram front end, what the server
trains), scored on the held-out test frames: accuracy, AUC, sensitivity, specificity, and the ratio of the
accuracies. Privacy (angiograms and fundus crops): every attack of :mod:`medprivacy.obfuscation.attacks`, scored
with SSIM, PSNR and vessel Dice against the two baselines, and the issue's targets: SSIM at most the mean-frame
baseline + 0.05 and vessel Dice at most 0.3 for the strongest attack of each threat model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InputError

REPORT_FORMAT = "medprivacy-obfuscation-eval"
PRESETS = ("cpu-small", "smoke")
SSIM_MARGIN = 0.05
DICE_TARGET = 0.3
UTILITY_TARGET = 0.9
#: The victim's labelled training frames start here in the train split, after the public frames.
VICTIM_TRAIN_OFFSET = 60_000
THREAT_A = ("a",)
THREAT_B = ("b-lut", "b-window", "b-finetune", "b-keyfit")


@dataclass
class EvalConfig:
    preset: str = "cpu-small"
    size: int = 64
    data_seed: int = 0
    key_seed: int = 0
    task: str = "view"
    train_frames: int = 8000
    test_frames: int = 1000
    classifier_steps: int = 1500
    privacy_frames: int = 200
    public_frames: dict = field(default_factory=lambda: {"angio": 8000, "fundus": 3000})
    leaked: tuple = (1, 10, 100)
    leaked_for_networks: int = 10
    attack_steps: int = 2000
    finetune_steps: int = 300
    attack_channels: tuple = (32, 64, 128, 256)
    attack_batch: int = 16
    domains: tuple = ("angio", "fundus")
    params: dict = field(default_factory=dict)  # mapping parameter overrides (trade-off curves)
    attacks: tuple = ("a", "b", "oracle")  # which threat models to run (a subset skips the others' training)
    retrain_attack_a: int = (
        0  # steps: retrain the threat-(a) attackers for these parameters instead of loading the shipped ones
    )
    grid_frames: int = 3
    device: str = "auto"
    threads: int = 0

    @classmethod
    def preset_config(cls, name: str, **overrides) -> EvalConfig:
        if name == "cpu-small":
            config = cls(preset=name)
        elif name == "smoke":
            config = cls(
                preset=name,
                size=32,
                train_frames=48,
                test_frames=16,
                classifier_steps=4,
                privacy_frames=4,
                public_frames={"angio": 24, "fundus": 12},
                leaked=(1, 2),
                leaked_for_networks=2,
                attack_steps=3,
                finetune_steps=2,
                attack_channels=(4, 8, 16),
                attack_batch=4,
                grid_frames=1,
            )
        else:
            raise InputError(f"unknown preset {name!r}; use {' or '.join(PRESETS)}")
        return replace(config, **overrides)

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("leaked", "attack_channels", "domains", "attacks"):
            out[key] = list(out[key])
        return out


def run_evaluation(config: EvalConfig, models_dir=None, grid: Path | None = None, progress=print) -> dict:
    import torch

    from ..nets import resolve_device

    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _evaluate(config, models_dir, grid, progress, resolve_device(config.device))
    finally:
        torch.set_num_threads(previous)


def _evaluate(config: EvalConfig, models_dir, grid, progress, device: str) -> dict:
    import random as pyrandom

    from ..nets.registry import load_model
    from .data import TASKS
    from .eval_privacy import privacy
    from .key import MappingParams
    from .keygen import VAE_MODEL, create_site_key, default_params
    from .train import public_frames
    from .transform import Obfuscator

    if config.task not in TASKS:
        raise InputError(f"unknown task {config.task!r}; use {' or '.join(TASKS)}")
    started = time.time()
    vae, vae_spec = load_model(VAE_MODEL, models_dir, device)
    if tuple(vae_spec.patch_size) != (config.size, config.size):
        raise InputError(
            f"the VAE in the models folder works on {vae_spec.patch_size[0]}x{vae_spec.patch_size[1]} frames, "
            f"not {config.size}x{config.size}; pick the matching preset"
        )
    params = MappingParams(**{**asdict(default_params(vae_spec.patch_size)), **config.params}).check()
    report = {
        "format": REPORT_FORMAT,
        "config": config.to_json(),
        "mapping": params.to_json(),
        "vae": {"sha256": vae_spec.sha256, "latent_size": vae_spec.arch["latent_size"]},
        "device": device,
    }
    with tempfile.TemporaryDirectory(prefix="obfuscation-eval-") as folder:
        secret = np.random.default_rng([config.key_seed, 1]).bytes(32)
        key = create_site_key(
            Path(folder) / "victim-key",
            params=params,
            models_dir=models_dir,
            device=device,
            random=pyrandom.Random(config.key_seed),
            secret=secret,
        )
        obfuscator = Obfuscator(key, device)
        report["victim_key"] = {"key_id": key.key_id, "seed": config.key_seed}
        progress(f"victim key {key.key_id}: {key.describe()}")
        if "angio" in config.domains and config.train_frames > 0:
            report["utility"] = _utility(config, obfuscator, device, progress)
        report["privacy"] = {}
        examples = {}
        for domain in config.domains:
            public = public_frames(domain, "train", config.public_frames[domain], config.size, config.data_seed)
            report["privacy"][domain], examples[domain] = privacy(
                config, domain, public, key, obfuscator, vae, vae_spec, params, models_dir, device, progress
            )
    report["targets"] = _targets(report)
    report["seconds"] = round(time.time() - started, 1)
    if grid is not None:
        write_grid(examples, grid)
        report["grid"] = str(grid)
    return report


# --- utility ---------------------------------------------------------------------------------------------------


def _utility(config: EvalConfig, obfuscator, device: str, progress) -> dict:
    from .classifier import DEFAULT_ARCH, TrainSettings, binary_metrics, predict_probabilities, train_classifier
    from .data import TASKS, make_split
    from .transform import normalise, resize

    classes = list(TASKS[config.task])
    progress(f"utility: rendering {config.train_frames} training and {config.test_frames} test angiograms")
    train = make_split("angio", "train", config.train_frames, config.size, config.data_seed, start=VICTIM_TRAIN_OFFSET)
    test = make_split("angio", "test", config.test_frames, config.size, config.data_seed)
    prepared = {
        "train": resize(normalise(train.images), (config.size, config.size)),
        "test": resize(normalise(test.images), (config.size, config.size)),
    }
    labels = {"train": train.labels[config.task], "test": test.labels[config.task]}
    settings = TrainSettings(steps=config.classifier_steps, seed=config.key_seed)
    out = {
        "task": config.task,
        "classes": classes,
        "train_frames": config.train_frames,
        "test_frames": config.test_frames,
        "steps": config.classifier_steps,
    }
    for name, arch in (("plain", dict(DEFAULT_ARCH, input="intensity")), ("obfuscated", dict(DEFAULT_ARCH))):
        t0 = time.time()
        if name == "plain":
            frames = {split: np.round(prepared[split] * 255).astype(np.uint8) for split in prepared}
        else:
            progress("utility: obfuscating the training and test frames with the victim key")
            frames = {split: obfuscator.obfuscate_prepared(prepared[split]) for split in prepared}
        progress(f"utility: training the {name} classifier ({config.classifier_steps} steps)")
        result = train_classifier(frames["train"], labels["train"], classes, settings, device=device, arch=arch)
        probabilities = predict_probabilities(result.net, frames["test"], device)[:, 1]
        out[name] = dict(
            binary_metrics(probabilities, labels["test"]),
            validation_accuracy=result.metrics["validation_accuracy"],
            seconds=round(time.time() - t0, 1),
        )
        progress(f"utility: {name} {out[name]}")
    out["accuracy_ratio"] = round(out["obfuscated"]["accuracy"] / max(out["plain"]["accuracy"], 1e-9), 4)
    return out


def _targets(report: dict) -> dict:
    out = {}
    utility = report.get("utility")
    if utility:
        out["utility"] = {
            "accuracy_ratio": utility["accuracy_ratio"],
            "target": UTILITY_TARGET,
            "met": utility["accuracy_ratio"] >= UTILITY_TARGET,
        }
    for domain, privacy in report.get("privacy", {}).items():
        ceiling = privacy["baselines"]["mean-frame"]["ssim"] + SSIM_MARGIN
        rows = {}
        for threat, prefixes in (("a", THREAT_A), ("b", THREAT_B), ("oracle", ("oracle",))):
            attacks = {k: v for k, v in privacy["attacks"].items() if k.split("/")[0] in prefixes}
            if not attacks:  # a threat model left out with --attacks
                continue
            worst_ssim = max(attacks.items(), key=lambda kv: kv[1]["ssim"])
            worst_dice = max(attacks.items(), key=lambda kv: kv[1]["vessel_dice"])
            rows[threat] = {
                "ssim": worst_ssim[1]["ssim"],
                "ssim_attack": worst_ssim[0],
                "ssim_ceiling": round(ceiling, 4),
                "ssim_met": worst_ssim[1]["ssim"] <= ceiling,
                "vessel_dice": worst_dice[1]["vessel_dice"],
                "dice_attack": worst_dice[0],
                "dice_target": DICE_TARGET,
                "dice_met": worst_dice[1]["vessel_dice"] <= DICE_TARGET,
            }
        out[domain] = rows
    return out


# --- example grid ----------------------------------------------------------------------------------------------

GRID_COLUMNS = ("original", "vae-output", "obfuscated", "mean-frame", "a")


def write_grid(examples: dict, path: Path) -> None:
    """One row per example frame: original | VAE output | obfuscated | mean frame | attack a | best b | oracle."""
    import SimpleITK as sitk

    from ..files import write_atomically

    rows = []
    for shown in examples.values():
        b_names = [k for k in shown if k.startswith("b-keyfit")] or [k for k in shown if k.startswith("b-")]
        columns = list(GRID_COLUMNS) + b_names[-1:] + (["oracle"] if "oracle" in shown else [])
        for i in range(len(shown["original"])):
            rows.append([shown[c][i] for c in columns if c in shown])
    if not rows:
        return
    size = rows[0][0].shape[0]
    scale = max(1, 128 // size)
    gap = 2
    width = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * (size * scale + gap), width * (size * scale + gap)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = np.kron(np.clip(image, 0, 1), np.ones((scale, scale)))
            top, left = r * (size * scale + gap), c * (size * scale + gap)
            canvas[top : top + size * scale, left : left + size * scale] = tile
    pixels = np.round(canvas * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(pixels), str(tmp)))


# --- CLI -------------------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="report (JSON) to write")
    parser.add_argument(
        "--grid", type=Path, default=None, help="also write a PNG of example frames and reconstructions"
    )
    parser.add_argument(
        "--preset", choices=PRESETS, default="cpu-small", help="cpu-small (about an hour on one core) or smoke (tests)"
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="models folder (default: Resources/Models)")
    parser.add_argument(
        "--task", choices=("view", "stenosis"), default="view", help="classification task (default view: LCA vs RCA)"
    )
    parser.add_argument("--key-seed", type=int, default=0, help="seed of the victim key's table and secret (default 0)")
    parser.add_argument("--domains", default="angio,fundus", help="privacy domains (default angio,fundus)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="override the mapping default (trade-off curves)"
    )
    parser.add_argument("--dither", type=float, default=None)
    parser.add_argument("--levels", type=int, default=None)
    parser.add_argument("--codes", type=int, default=None)
    parser.add_argument(
        "--attack-steps", type=int, default=None, help="steps of the b-keyfit and key-known networks (default 2000)"
    )
    parser.add_argument(
        "--attack-channels",
        default=None,
        help="U-Net widths of the attack networks, e.g. 16,32,64,128 (default 32,64,128,256)",
    )
    parser.add_argument(
        "--retrain-attack-a",
        type=int,
        default=0,
        metavar="STEPS",
        help="train the threat-(a) attackers for the given parameters instead of loading the shipped ones",
    )
    parser.add_argument(
        "--attacks",
        default="a,b,oracle",
        help="threat models to run: a subset of a,b,oracle (default all; b needs the (a) network too)",
    )
    parser.add_argument("--skip-utility", action="store_true", help="privacy only")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0)


def run_eval(args) -> int:
    overrides = {
        k: v
        for k, v in (
            ("temperature", args.temperature),
            ("dither", args.dither),
            ("levels", args.levels),
            ("codes", args.codes),
        )
        if v is not None
    }
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    if not domains or set(domains) - {"angio", "fundus"}:
        raise InputError("--domains takes angio, fundus or both (comma-separated)")
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    if not attacks or set(attacks) - {"a", "b", "oracle"}:
        raise InputError(f"--attacks takes a, b, oracle or a comma-separated subset (got {args.attacks!r})")
    budget = {"attacks": attacks}
    if args.attack_steps is not None:
        if args.attack_steps < 1:
            raise InputError("--attack-steps must be at least 1")
        budget["attack_steps"] = args.attack_steps
    if args.attack_channels:
        try:
            budget["attack_channels"] = tuple(int(v) for v in args.attack_channels.split(","))
        except ValueError:
            raise InputError(
                f"--attack-channels takes comma-separated widths, e.g. 16,32,64,128 (got {args.attack_channels!r})"
            ) from None
    config = EvalConfig.preset_config(
        args.preset,
        task=args.task,
        key_seed=args.key_seed,
        domains=domains,
        params=overrides,
        retrain_attack_a=args.retrain_attack_a,
        device=args.device,
        threads=args.threads,
        **budget,
    )
    if args.skip_utility:
        config = replace(config, train_frames=0)
    if not args.out.parent.is_dir():
        raise InputError(f"the folder of --out {args.out} does not exist; create it first")
    report = run_evaluation(config, args.models_dir, args.grid, progress=lambda text: print(text, flush=True))
    from ..files import write_json

    write_json(report, args.out)
    print(summary(report))
    print(f"wrote {args.out}" + (f" and {args.grid}" if args.grid else ""))
    return 0


def summary(report: dict) -> str:
    lines = []
    utility = report.get("utility")
    if utility:
        for name in ("plain", "obfuscated"):
            m = utility[name]
            lines.append(
                f"utility ({utility['task']}) {name}: accuracy {m['accuracy']}, AUC {m['auc']}, sensitivity "
                f"{m['sensitivity']}, specificity {m['specificity']}"
            )
        lines.append(f"accuracy ratio obfuscated/plain {utility['accuracy_ratio']} (target >= {UTILITY_TARGET})")
    for domain, privacy in report.get("privacy", {}).items():
        for name, row in {**privacy["baselines"], **privacy["reference"], **privacy["attacks"]}.items():
            lines.append(
                f"privacy/{domain} {name}: SSIM {row['ssim']}, PSNR {row['psnr']}, vessel Dice {row['vessel_dice']}"
            )
        for threat, row in report["targets"][domain].items():
            lines.append(
                f"targets/{domain} threat {threat}: SSIM {row['ssim']} ({row['ssim_attack']}) vs ceiling "
                f"{row['ssim_ceiling']} "
                f"{'met' if row['ssim_met'] else 'MISSED'}; vessel Dice {row['vessel_dice']} ({row['dice_attack']}) "
                f"{'met' if row['dice_met'] else 'MISSED'}"
            )
    return "\n".join(lines)
