"""``medprivacy obfuscate train-models``: regenerate the shipped ObfuscationPrivacy weights, seeded.

- ``obf-vae`` (role client): the VAE of the transform, trained on public frames of both domains (synthetic
  angiograms and fundus crops, normalised like the transform normalises), plus its latent noise scale.
- ``obf-attack-angio``, ``obf-attack-fundus`` (role attack: evaluation only, never in the client): the threat-(a)
  attackers, one per domain, trained on public frames obfuscated with a fresh random key per frame, with the default
  mapping parameters. ``obfuscate eval`` loads them when its mapping parameters and VAE are the ones they learnt.

The classifiers are not shipped: each site's classifier is trained by the server on that site's key, and the
evaluation trains its own (plain and obfuscated, same budget). The run is recorded in the manifest's
``obfuscation_training`` entry (command, data, config, per-model metrics and durations); other entries are kept.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("medprivacy.obfuscation.train")

PRESETS = ("cpu-small", "smoke")
MANIFEST_KEY = "obfuscation_training"
VAE_NAME, VAE_FILE = "obf-vae", "obf_vae.safetensors"
ATTACK_NAMES = {
    "angio": ("obf-attack-angio", "obf_attack_angio.safetensors"),
    "fundus": ("obf-attack-fundus", "obf_attack_fundus.safetensors"),
}


@dataclass
class ObfuscationTrainConfig:
    preset: str = "cpu-small"
    size: int = 64
    data_seed: int = 0
    angio_frames: int = 8000
    fundus_frames: int = 3000
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    latent_size: int = 32
    vae_steps: int = 4000
    vae_sigma: float = 0.05
    attack_steps: int = 3000
    attack_channels: tuple = (32, 64, 128, 256)
    attack_batch: int = 16
    models: tuple = ("vae", "attack-angio", "attack-fundus")
    params: dict = field(
        default_factory=dict
    )  # mapping parameters of the attackers' keys (default: the shipped defaults)

    @classmethod
    def preset_config(cls, name: str, **overrides) -> ObfuscationTrainConfig:
        if name == "cpu-small":
            config = cls(preset=name)
        elif name == "smoke":
            config = cls(
                preset=name,
                size=32,
                angio_frames=48,
                fundus_frames=16,
                latent_size=8,
                vae_steps=20,
                attack_steps=6,
                attack_channels=(4, 8, 16),
                attack_batch=4,
            )
        else:
            raise InputError(f"unknown preset {name!r}; use {' or '.join(PRESETS)}")
        return replace(config, **overrides)

    def mapping(self):
        from .key import MappingParams
        from .keygen import default_params

        base = default_params(frame_size=(self.size, self.size))
        return MappingParams(**{**asdict(base), **self.params, "frame_size": (self.size, self.size)}).check()

    def to_json(self) -> dict:
        out = asdict(self)
        out["attack_channels"] = list(self.attack_channels)
        out["models"] = list(self.models)
        return out


def public_frames(domain: str, split: str, count: int, size: int, data_seed: int, start: int = 0) -> np.ndarray:
    """Seeded frames of a domain, normalised and at the model size exactly as the transform prepares them."""
    from .data import make_split
    from .transform import normalise, resize

    frames = make_split(domain, split, count, size=size, data_seed=data_seed, start=start).images
    return resize(normalise(frames), (size, size))


def train_models(config: ObfuscationTrainConfig, out_dir, progress: bool = True, command: str | None = None) -> dict:
    import torch

    from ..nets import resolve_device

    previous = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, Path(out_dir), progress, command, resolve_device(config.device))
    finally:
        torch.set_num_threads(previous)


def _train(config: ObfuscationTrainConfig, out_dir: Path, progress: bool, command: str | None, device: str) -> dict:
    import torch

    unknown = [m for m in config.models if m not in ("vae", "attack-angio", "attack-fundus")]
    if unknown:
        raise InputError(f"unknown model(s) {unknown}; choose from vae, attack-angio, attack-fundus")
    started = time.time()
    t0 = time.time()
    # Only the domains a model of this run learns from are rendered (the VAE needs both; an attacker its own).
    needed = {"angio", "fundus"} if "vae" in config.models else {m.split("-")[1] for m in config.models}
    counts = {"angio": config.angio_frames, "fundus": config.fundus_frames}
    frames = {
        domain: public_frames(domain, "train", counts[domain], config.size, config.data_seed)
        for domain in sorted(needed)
    }
    record = {
        "command": command or f"medprivacy obfuscate train-models --preset {config.preset} --seed {config.seed}",
        "config": config.to_json(),
        "data": (
            f"public frames, {config.size}x{config.size}, data seed {config.data_seed}: {config.angio_frames} "
            "synthetic "
            f"coronary angiograms (medprivacy.obfuscation.data, train seeds 1000+) and {config.fundus_frames} crops of "
            "scikit-image's retina() fundus photograph (green channel), normalised like the transform"
        ),
        "data_seconds": round(time.time() - t0, 1),
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "models": {},
    }
    if "vae" in config.models:
        record["models"][VAE_NAME] = _train_vae(config, frames, out_dir, device, progress)
        _write_record(out_dir, record, started)
    params = config.mapping()
    for domain in ("angio", "fundus"):
        if f"attack-{domain}" in config.models:
            provenance = {"command": record["command"], "data": record["data"]}
            record["models"][ATTACK_NAMES[domain][0]] = _train_attacker(
                config, domain, frames[domain], params, out_dir, device, progress, provenance
            )
            _write_record(out_dir, record, started)
    return record


def _train_vae(config, frames: dict, out_dir: Path, device: str, progress: bool) -> dict:
    from ..nets import ModelSpec, save_model
    from .attacks import scores
    from .vae import VAESettings, latent_scale, train_vae, vae_arch

    arch = vae_arch((config.size, config.size), config.latent_size)
    training = np.concatenate([frames["angio"], frames["fundus"]])
    settings = VAESettings(steps=config.vae_steps, sigma=config.vae_sigma, seed=config.seed)
    bar = _bar(progress, config.vae_steps, "training the VAE")
    net, metrics = train_vae(
        training, arch, settings, device, progress=lambda step, steps, loss: _advance(bar, step, loss)
    )
    if bar is not None:
        bar.close()
    scale = latent_scale(net, training, device)
    # How much of a held-out frame survives the VAE alone (no noise, no mapping): the ceiling of any attack.
    from .transform import vae_sample

    held_out = {}
    for domain in ("angio", "fundus"):
        test = public_frames(domain, "validation", 64 if config.preset != "smoke" else 4, config.size, config.data_seed)
        decoded = vae_sample(net, test, np.zeros((len(test), config.latent_size), np.float32), 0.0, scale, device)
        held_out[domain] = scores(decoded, test)
    metrics.update(
        {"validation_vae_output_vs_original": held_out, "parameters": int(sum(p.numel() for p in net.parameters()))}
    )
    spec = ModelSpec(
        name=VAE_NAME,
        file=VAE_FILE,
        arch=arch,
        role="client",
        patch_size=[config.size, config.size],
        labels={},
        extra={
            "task": "obfuscation-vae",
            "latent_scale": scale,
            "input": (
                f"gray frame normalised to [0, 1] (0.5th-99.5th percentile), resized to {config.size}x{config.size}"
            ),
            "preset": config.preset,
            "seed": config.seed,
        },
    )
    save_model(net, spec, out_dir)
    log.info("obf-vae: %s", metrics)
    return metrics


def _train_attacker(
    config, domain: str, frames: np.ndarray, params, out_dir: Path, device: str, progress: bool, provenance: dict
) -> dict:
    import random as pyrandom

    from ..nets import ModelSpec, load_model, save_model
    from .attacks import AttackSettings, build_attack_net, reconstruct, scores, train_attack
    from .key import random_mapping
    from .transform import obfuscate_with

    vae, spec = load_model(VAE_NAME, out_dir, device)
    scale = spec.extra["latent_scale"]
    arch = {
        "name": "obf-attack",
        "input": "invariant",
        "channels": list(config.attack_channels),
        "strides": [2] * (len(config.attack_channels) - 1),
        "num_res_units": 1,
    }
    import torch

    torch.manual_seed(config.seed)
    net = build_attack_net(arch)
    rng = np.random.default_rng([config.seed, 21, 0 if domain == "angio" else 1])
    keys = pyrandom.Random(config.seed * 7 + (0 if domain == "angio" else 1))

    def batches(step: int, size: int):
        index = rng.integers(len(frames), size=size)
        codes = np.empty((size,) + frames.shape[1:], dtype=np.uint8)
        for i, j in enumerate(index):  # a fresh random key for every frame
            assignment, values = random_mapping(params, keys)
            codes[i] = obfuscate_with(
                vae, frames[j : j + 1], values[assignment].astype(np.uint8), params, scale, rng, device
            )[0]
        return codes, frames[index]

    bar = _bar(progress, config.attack_steps, f"training the {domain} attacker (threat a)")
    metrics = train_attack(
        net,
        batches,
        AttackSettings(steps=config.attack_steps, batch_size=config.attack_batch, seed=config.seed),
        device,
        progress=lambda step, steps, loss: _advance(bar, step, loss),
    )
    if bar is not None:
        bar.close()
    test = public_frames(domain, "validation", 64 if config.preset != "smoke" else 4, config.size, config.data_seed)
    assignment, values = random_mapping(params, pyrandom.Random(10_000 + config.seed))
    codes = obfuscate_with(
        vae, test, values[assignment].astype(np.uint8), params, scale, np.random.default_rng(99), device
    )
    metrics["validation_unseen_key"] = scores(reconstruct(net, codes, device), test)
    metrics["mapping"] = params.to_json()
    name, file = ATTACK_NAMES[domain]
    save_model(
        net,
        ModelSpec(
            name=name,
            file=file,
            arch=arch,
            role="attack",
            patch_size=[config.size, config.size],
            labels={},
            extra={
                "task": "obfuscation-attack",
                "threat_model": "a",
                "domain": domain,
                "mapping": params.to_json(),
                "trained_against": {VAE_NAME: spec.sha256},
                "preset": config.preset,
                "seed": config.seed,
                "steps": config.attack_steps,
                "validation_unseen_key": metrics["validation_unseen_key"],
                **provenance,
            },
        ),
        out_dir,
    )
    log.info("%s: %s", name, metrics)
    return metrics


def _bar(progress: bool, total: int, description: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False)


def _advance(bar, step: int, loss: float) -> None:
    if bar is not None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()


def _write_record(out_dir: Path, record: dict, started: float) -> None:
    """Read-modify-write of the manifest: only the ``obfuscation_training`` entry changes (a subset run merges)."""
    from ..nets.registry import load_manifest, write_manifest

    try:
        manifest = load_manifest(out_dir)
    except InputError:
        manifest = {"models": {}}
    record["seconds"] = round(time.time() - started, 1)
    for metrics in record["models"].values():
        metrics.setdefault("command", record["command"])
    previous = manifest.get(MANIFEST_KEY)
    if isinstance(previous, dict) and isinstance(previous.get("models"), dict):
        record = dict(record, models={**previous["models"], **record["models"]})
    manifest[MANIFEST_KEY] = record
    write_manifest(manifest, out_dir)


# ------------------------------------------------------------------------------------------------------ CLI


def add_train_arguments(parser) -> None:
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="cpu-small",
        help="cpu-small: 64x64 frames, about an hour on one CPU core; smoke: a few steps at 32x32 (tests)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="models folder (default: Resources/Models or $MEDPRIVACY_MODELS_DIR)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of vae,attack-angio,attack-fundus (default all; "
        "the attackers need the VAE of the same folder)",
    )
    parser.add_argument(
        "--attack-steps", type=int, default=None, help="training steps of the threat-(a) attackers (preset default)"
    )
    parser.add_argument(
        "--attack-channels",
        default=None,
        help="U-Net widths of the threat-(a) attackers, e.g. 16,32,64,128 (preset default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def command_line(args) -> str:
    parts = ["medprivacy", "obfuscate", "train-models", "--preset", args.preset]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    parts += ["--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads)]
    if args.models:
        parts += ["--models", args.models]
    if args.attack_steps is not None:
        parts += ["--attack-steps", str(args.attack_steps)]
    if args.attack_channels:
        parts += ["--attack-channels", args.attack_channels]
    return " ".join(shlex.quote(p) for p in parts)


def run_train(args) -> int:
    from ..nets import models_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads < 0 or args.seed < 0:
        raise InputError("--threads and --seed must not be negative")
    overrides = {}
    if args.models:
        overrides["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.attack_steps is not None:
        if args.attack_steps < 1:
            raise InputError("--attack-steps must be at least 1")
        overrides["attack_steps"] = args.attack_steps
    if args.attack_channels:
        try:
            overrides["attack_channels"] = tuple(int(v) for v in args.attack_channels.split(","))
        except ValueError:
            raise InputError(
                f"--attack-channels takes comma-separated widths, e.g. 16,32,64,128 (got {args.attack_channels!r})"
            ) from None
        if len(overrides["attack_channels"]) < 2 or min(overrides["attack_channels"]) < 1:
            raise InputError("--attack-channels takes at least two positive widths, e.g. 16,32,64,128")
    config = ObfuscationTrainConfig.preset_config(
        args.preset, seed=args.seed, device=args.device, threads=args.threads, **overrides
    )
    out = models_dir(args.out)
    record = train_models(config, out, progress=not args.quiet, command=command_line(args))
    for name, metrics in record["models"].items():
        print(f"{name}: {metrics.get('seconds')} s; " + json_short(metrics))
    print(f"trained in {record['seconds']:.0f} s; models in {out}")
    return 0


def json_short(metrics: dict) -> str:
    keep = {k: v for k, v in metrics.items() if k.startswith("validation") or k in ("final_mse", "final_loss")}
    import json

    return json.dumps(keep)
